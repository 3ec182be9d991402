"""Where and with what a benchmark ran: machine, load, tool and library versions, date."""

from __future__ import annotations

import datetime as dt
import os
import platform
import re
import shutil
import subprocess
from importlib import metadata
from pathlib import Path

import sqlalchemy as sa

from dicom_assets_tests.orthanc import dicomweb_plugin, orthanc_binary

REPO_ROOT = Path(__file__).resolve().parent.parent


def _first_line(argv: list[str], pattern: str | None = None) -> str:
    """First line of a command's output (or the first match of ``pattern`` in it); "absent" on failure."""
    if shutil.which(argv[0]) is None and not os.path.isfile(argv[0]):
        return "absent"
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=20, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return "absent"
    text = done.stdout + done.stderr
    if pattern:
        match = re.search(pattern, text)
        return match.group(1) if match else "unknown"
    return text.strip().splitlines()[0] if text.strip() else "unknown"


def _proc_value(path: str, key: str) -> str:
    try:
        for line in Path(path).read_text().splitlines():
            if line.startswith(key):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def load_average() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "unknown"


def machine() -> dict[str, str]:
    mem_kb = _proc_value("/proc/meminfo", "MemTotal").split()[0]
    return {
        "cpu": _proc_value("/proc/cpuinfo", "model name"),
        "cores": str(os.cpu_count()),
        "ram_gb": f"{int(mem_kb) / 1e6:.1f}" if mem_kb.isdigit() else "unknown",
        "kernel": f"{platform.system()} {platform.release()}",
        "os": _os_release(),
    }


def _os_release() -> str:
    try:
        for line in Path("/etc/os-release").read_text().splitlines():
            if line.startswith("PRETTY_NAME="):
                return line.split("=", 1)[1].strip('"')
    except OSError:
        pass
    return "unknown"


def _git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=20, check=False).stdout.strip()
    except OSError:
        return ""


def project_commit() -> str:
    """The checked-out commit, marked when the working tree has uncommitted changes."""
    commit = _git("rev-parse", "--short", "HEAD") or "unknown"
    return commit + (" + uncommitted changes" if _git("status", "--porcelain", "--untracked-files=no") else "")


def _package(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "absent"


def postgresql_version(server_url: str) -> str:
    engine = sa.create_engine(server_url)
    try:
        with engine.connect() as conn:
            return str(conn.exec_driver_sql("SHOW server_version").scalar_one())
    except Exception as exc:  # noqa: BLE001 - a version line must never stop the benchmark
        return f"unknown ({type(exc).__name__})"
    finally:
        engine.dispose()


def versions(pg_server_url: str) -> dict[str, str]:
    orthanc = orthanc_binary()
    return {
        "python": platform.python_version(),
        "dicom_assets": project_commit(),
        "pynetdicom": _package("pynetdicom"),
        "pydicom": _package("pydicom"),
        "dagster": _package("dagster"),
        "isal": _package("isal"),
        "orthanc": _first_line([orthanc, "--version"], r"Orthanc\s+(\S+)") if orthanc else "absent",
        "orthanc-dicomweb": _first_line(["dpkg-query", "-W", "-f=${Version}\n", "orthanc-dicomweb"], r"^(\d\S*)")
        if dicomweb_plugin() else "absent",
        "dcmtk": _first_line(["storescp", "--version"], r"storescp\s+v(\S+)"),
        "zip": _first_line(["zip", "-v"], r"Zip\s+(\d+\.\d+\S*)"),
        "unzip": _first_line(["unzip", "-v"], r"UnZip\s+(\d+\.\d+\S*)"),
        "postgresql": postgresql_version(pg_server_url),
    }


def now_utc() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
