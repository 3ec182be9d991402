"""Running ``dicom-assets sync`` as a real process, and checking what it left: the helpers of
the crash-safety, stop and flaky-network tests.

A sync runs as a subprocess with its own ``DAGSTER_HOME`` and a config naming the bundled PACS
(or anything else listening on loopback); the checks read the state DB (PostgreSQL), the
download directory (every file parsed) and the archives (``unzip -t``).
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import time
import zipfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import pydicom
import pytest
import sqlalchemy as sa
import yaml
from sqlalchemy.pool import NullPool

from dicom_assets.devpacs import CohortSpec, CohortSummary, DevPacs, generate_cohort
from dicom_assets.layout import archive_name, instances_on_disk, patient_key
from dicom_assets_tests.conftest import free_port

RECEIVER_AE = "DICOM_ASSETS"
HIDDEN_DCM_PART = re.compile(r"^\.[0-9.]{1,64}\.dcm\.[0-9a-f]+\.part$")
HIDDEN_ZIP_PART = re.compile(r"^\..+\.zip\.[0-9a-f]+\.part$|^\.[0-9a-f]{32}\.zip\.[0-9a-f]+\.part$")


def make_cohort(directory: Path, patients: int, series: int, slices: int, size: int, seed: int) -> CohortSummary:
    spec = CohortSpec(
        patients=patients, studies_per_patient=1, series_per_study=series, slices_per_series=slices,
        rows=size, columns=size, patient_id_prefix="CRASH", seed=seed,
    )  # fmt: skip
    return generate_cohort(directory, spec)


def write_config(root: Path, pacs_port: int, receiver_port: int, db_url: str, **pacs: Any) -> Path:
    config = {
        "pacs": {"host": "127.0.0.1", "port": pacs_port, "called_ae_title": "DEVPACS", "calling_ae_title": RECEIVER_AE,
                 "timeout_s": 10, "straggler_timeout_s": 1, **pacs},
        "receiver": {"ae_title": RECEIVER_AE, "bind_address": "127.0.0.1", "port": receiver_port},
        "selection": {"patient_id_regex": "^CRASH"},
        "paths": {"download_dir": "downloads", "archive_dir": "archives", "report_dir": "reports"},
        "database": {"url": db_url},
    }  # fmt: skip
    path = root / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def dagster_home(root: Path) -> Path:
    home = root / "dagster_home"
    home.mkdir(exist_ok=True)
    (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    return home


def start_sync(root: Path, config: Path, log: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, "DAGSTER_HOME": str(dagster_home(root)), "PYTHONUNBUFFERED": "1"}
    with open(log, "wb") as out:  # the child keeps its own descriptor
        return subprocess.Popen(
            [sys.executable, "-m", "dicom_assets.cli", "sync", "--config", str(config), "--no-progress"],
            cwd=root, env=env, stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip


def finish_sync(proc: subprocess.Popen[bytes], log: Path, timeout: float) -> tuple[int, str]:
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        pytest.fail(f"dicom-assets sync did not end within {timeout} s:\n{log.read_text(errors='replace')[-4000:]}")
    return proc.returncode, log.read_text(errors="replace")


def run_sync(root: Path, config: Path, name: str, timeout: float = 120) -> tuple[int, str]:
    log = root / f"{name}.log"
    return finish_sync(start_sync(root, config, log), log, timeout)


def db_engine(url: str) -> sa.engine.Engine:
    return sa.create_engine(url, poolclass=NullPool, connect_args={"connect_timeout": 5})


def series_rows(url: str) -> list[dict[str, Any]]:
    engine = db_engine(url)
    try:
        with engine.connect() as conn:
            rows = conn.execute(sa.text(
                "SELECT series_instance_uid, patient_id, download_status, attempts, network_faults, claimed_by, expected_instances, "
                "downloaded_instances, last_error FROM series ORDER BY series_instance_uid"
            ))  # fmt: skip
            return [dict(r._mapping) for r in rows]
    finally:
        engine.dispose()


def wait_for_port(port: int, proc: subprocess.Popen[bytes] | None = None, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"the process meant to listen on {port} exited with {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    pytest.fail(f"nothing listens on 127.0.0.1:{port} after {timeout} s")


@contextmanager
def pacs_subprocess(cohort_dir: Path, receiver_port: int, log: Path) -> Iterator[tuple[subprocess.Popen[bytes], int]]:
    """``dicom-assets pacs serve`` in its own process: it outlives every killed sync."""
    port = free_port()
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "dicom_assets.cli", "pacs", "serve", "--dir", str(cohort_dir), "--port", str(port),
             "--move-destination", f"{RECEIVER_AE}=127.0.0.1:{receiver_port}"],
            stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        wait_for_port(port, proc)
        yield proc, port
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def check_complete(url: str, cohort: CohortSummary) -> list[dict[str, Any]]:
    rows = series_rows(url)
    assert sorted(r["series_instance_uid"] for r in rows) == sorted(s.series_instance_uid for s in cohort.series)
    bad = [r for r in rows if r["download_status"] != "complete" or r["claimed_by"] is not None]
    assert not bad, f"series not complete, or still claimed: {bad}"
    expected = {s.series_instance_uid: s.instances for s in cohort.series}
    assert {r["series_instance_uid"]: r["downloaded_instances"] for r in rows} == expected
    return rows


def check_downloads(download_dir: Path, cohort: CohortSummary) -> list[Path]:
    """Every ``.dcm`` parses and is named by its SOPInstanceUID; every instance is there. Returns
    the temp files left behind (each must be a hidden ``.…part`` file that is never counted)."""
    wanted = {
        (patient_key(s.patient_id), s.study_instance_uid, s.series_instance_uid, sop)
        for s in cohort.series
        for sop in s.sop_instance_uids
    }
    found = set()
    for path in download_dir.rglob("*.dcm"):
        assert not path.name.startswith("."), path
        ds = pydicom.dcmread(path)  # whole file, pixel data included: a truncated file raises
        assert ds.SOPInstanceUID == path.stem, path
        assert ds.SeriesInstanceUID == path.parent.name and ds.StudyInstanceUID == path.parent.parent.name, path
        assert len(ds.PixelData) == ds.Rows * ds.Columns * ds.SamplesPerPixel * (ds.BitsAllocated // 8), path
        found.add((path.parent.parent.parent.name, path.parent.parent.name, path.parent.name, path.stem))
    assert found == wanted, f"{len(wanted - found)} missing, {len(found - wanted)} unexpected"
    leftovers = [p for p in download_dir.rglob("*") if p.is_file() and not p.name.endswith(".dcm")]
    for p in leftovers:
        assert HIDDEN_DCM_PART.match(p.name), f"unexpected file in the download directory: {p}"
    for s in cohort.series:  # a leftover temp file is never counted as an instance
        directory = download_dir / patient_key(s.patient_id) / s.study_instance_uid / s.series_instance_uid
        assert sorted(instances_on_disk(directory)) == sorted(s.sop_instance_uids)
    return leftovers


def check_archives(archive_dir: Path, cohort: CohortSummary) -> list[Path]:
    """Exactly one zip per patient, intact (``unzip -t`` and zipfile), holding every instance.
    Returns temp files left behind (hidden ``.…part``)."""
    names = sorted(p.name for p in archive_dir.glob("*.zip"))
    per_patient: dict[str, list[Any]] = {}
    for s in cohort.series:
        per_patient.setdefault(s.patient_id, []).append(s)
    assert names == sorted(archive_name(pid, "__seriesCount", len(series)) for pid, series in per_patient.items())
    unzip = shutil.which("unzip")
    for pid, series in per_patient.items():
        path = archive_dir / archive_name(pid, "__seriesCount", len(series))
        with zipfile.ZipFile(path) as zf:
            assert zf.testzip() is None, path
            members = sorted(n for n in zf.namelist() if not n.endswith("/"))
        key = patient_key(pid)
        assert members == sorted(
            f"{key}/{s.study_instance_uid}/{s.series_instance_uid}/{sop}.dcm" for s in series for sop in s.sop_instance_uids
        ), path
        if unzip:
            done = subprocess.run([unzip, "-tq", str(path)], capture_output=True, text=True, timeout=60)
            assert done.returncode == 0, done.stdout + done.stderr
    leftovers = [p for p in archive_dir.iterdir() if not p.name.endswith(".zip")]
    for p in leftovers:
        assert HIDDEN_ZIP_PART.match(p.name), f"unexpected file in the archive directory: {p}"
    return leftovers


def port_bindable(port: int, reuse: bool) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        if reuse:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def sync_phase(log_text: str) -> str:
    if "writing the inventory" in log_text:
        return "inventory"
    if "running the per-patient pipeline" in log_text:
        return "pipeline"
    if "discovering patients" in log_text:
        return "discovery"
    return "startup"


class CountingPacs(DevPacs):
    """The bundled PACS, noting every instance a C-MOVE/C-GET hands to its sending association
    (one it only planned to send, before the association went away, is not noted): what was
    fetched twice shows as a repeated (SeriesInstanceUID, SOPInstanceUID)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.sent: list[tuple[str, str]] = []

    def _sub_operations(self, event: Any, instances: Any) -> Iterator[Any]:  # type: ignore[override]
        for status, dataset in DevPacs._sub_operations(event, instances):
            if dataset is not None:
                ids = dataset.devpacs_instance.ids
                self.sent.append((ids[2], ids[3]))
            yield status, dataset
