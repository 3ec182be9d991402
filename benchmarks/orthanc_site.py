"""The PACS of the benchmark: a throwaway Orthanc on loopback that knows every client we use.

Built on the test suite's Orthanc helper (``dicom_assets_tests/orthanc.py``: configuration,
REST, log, stop), with more than one modality: the project (``DICOM_ASSETS``: C-FIND/C-MOVE/
C-GET caller and C-MOVE destination) and DCMTK (``DCMTK``: ``movescu``/``getscu`` caller and the
``storescp`` destination), each at its own receiver port on 127.0.0.1. With ``dicomweb=True``
the same Orthanc also loads Debian's DICOMweb plugin (``orthanc-dicomweb``), so the same cohort
is served over WADO-RS (:attr:`Site.dicomweb_url`) as over DIMSE.
"""

from __future__ import annotations

import json
import subprocess
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from dicom_assets_tests.orthanc import (
    DEFAULT_DICOMWEB_PLUGIN,
    ORTHANC_AET,
    OrthancHandle,
    dicomweb_plugin,
    distinct_free_ports,
    orthanc_binary,
    orthanc_config,
)

PROJECT_AET = "DICOM_ASSETS"
DCMTK_AET = "DCMTK"
STARTUP_TIMEOUT_S = 30.0
LOAD_THREADS = 4

_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never via an http_proxy


@dataclass(frozen=True)
class Site:
    """The running Orthanc and the receiver ports it sends C-MOVEs to."""

    orthanc: OrthancHandle
    project_receiver_port: int
    dcmtk_receiver_port: int

    @property
    def dicom_port(self) -> int:
        return self.orthanc.dicom_port

    @property
    def dicomweb_url(self) -> str:
        """The DICOMweb base URL of the same Orthanc (``dicomweb.url``); an error when the plugin is not loaded."""
        if not self.orthanc.dicomweb:
            raise RuntimeError(f"Orthanc was started without its DICOMweb plugin (package orthanc-dicomweb, {DEFAULT_DICOMWEB_PLUGIN})")
        return self.orthanc.dicomweb_url


def _modality(aet: str, port: int) -> dict[str, object]:
    return {
        "AET": aet, "Host": "127.0.0.1", "Port": port, "AllowEcho": True, "AllowFind": True, "AllowMove": True,
        "AllowGet": True, "AllowStore": False, "AllowStorageCommitment": False, "AllowTranscoding": False,
    }  # fmt: skip


def start_site(root: Path, dicomweb: bool = False, dicom_threads: int | None = None) -> Site:
    """Start Orthanc under ``root`` (storage, index, config, log); returns once REST answers.

    ``dicomweb``: also load the DICOMweb plugin when it is installed (without it, the site has
    no :attr:`Site.dicomweb_url` and only a WADO-RS variant fails, saying why). ``dicom_threads``:
    Orthanc's ``DicomThreadsCount`` (associations it serves at once; its default is 4)."""
    binary = orthanc_binary()
    if binary is None:
        raise RuntimeError("Orthanc is not installed (apt-get install orthanc; see scripts/ensure-services.sh)")
    root.mkdir(parents=True, exist_ok=True)
    dicom_port, http_port, project_port, dcmtk_port = distinct_free_ports(4)
    plugin = dicomweb_plugin() if dicomweb else None
    config = orthanc_config(root, dicom_port, http_port, project_port, receiver_ae_title=PROJECT_AET, dicomweb_plugin_path=plugin)
    config["DicomModalities"] = {"dicom_assets": _modality(PROJECT_AET, project_port), "dcmtk": _modality(DCMTK_AET, dcmtk_port)}
    config["JobsHistorySize"] = 10
    if dicom_threads is not None:
        config["DicomThreadsCount"] = dicom_threads
    config_file = root / "orthanc.json"
    config_file.write_text(json.dumps(config, indent=2))
    log_file = root / "orthanc.log"
    with open(log_file, "wb") as log:
        process = subprocess.Popen([binary, str(config_file)], stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=root)
    handle = OrthancHandle(dicom_port, http_port, ORTHANC_AET, root, config_file, log_file, process, dicomweb=plugin is not None)
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"Orthanc exited with status {process.returncode} at startup\n{handle.log_tail()}")
        try:
            if handle.get("/system").get("DicomAet") == ORTHANC_AET:
                if plugin and "dicom-web" not in (handle.get("/plugins") or []):
                    handle.stop()
                    raise RuntimeError(f"Orthanc did not load its DICOMweb plugin {plugin}\n{handle.log_tail()}")
                return Site(handle, project_port, dcmtk_port)
        except (urllib.error.URLError, OSError, ValueError):
            time.sleep(0.1)
    handle.stop()
    raise RuntimeError(f"Orthanc did not answer within {STARTUP_TIMEOUT_S:.0f} s\n{handle.log_tail()}")


def post_instance(base_url: str, path: Path, timeout_s: float = 60) -> None:
    """POST one file to Orthanc, streamed from disk (a multi-GB instance is never read whole)."""
    with open(path, "rb") as f:
        request = urllib.request.Request(base_url + "/instances", data=f, method="POST")
        request.add_header("Content-Type", "application/dicom")
        request.add_header("Content-Length", str(path.stat().st_size))
        with _OPENER.open(request, timeout=timeout_s) as response:
            status = json.loads(response.read()).get("Status")
    if status not in ("Success", "AlreadyStored"):
        raise RuntimeError(f"Orthanc did not store {path}: {status}")


def load_directory(site: Site, directory: Path) -> int:
    """POST every ``.dcm`` under ``directory`` to Orthanc (a few in parallel); returns how many."""
    files = sorted(p for p in directory.rglob("*.dcm") if not p.name.startswith("."))
    with ThreadPoolExecutor(max_workers=LOAD_THREADS, thread_name_prefix="orthanc-load") as pool:
        list(pool.map(lambda p: post_instance(site.orthanc.base_url, p), files))
    return len(files)
