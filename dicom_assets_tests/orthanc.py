"""A throwaway Orthanc (the real PACS of Debian's ``orthanc`` package) for integration tests.

:func:`running_orthanc` writes its own configuration into a temp directory (storage, index,
free loopback ports, our receiver registered as a modality), starts ``Orthanc <config>`` as a
subprocess, waits until ``GET /system`` answers on 127.0.0.1 and stops it on exit. Its output
goes to a log file that failure messages quote (:meth:`OrthancHandle.log_tail`).

Orthanc not installed: the test is skipped, or fails under ``CI=true`` (``require_service``).
``scripts/ensure-services.sh`` installs it (``apt-get install orthanc dcmtk``).

``dicomweb=True`` also loads Debian's DICOMweb plugin (package ``orthanc-dicomweb``, 1.7 on
bookworm) with QIDO-RS/WADO-RS under :attr:`OrthancHandle.dicomweb_url`; a missing plugin skips
the test like a missing Orthanc (fails it under CI). ``users={"name": "password"}`` turns on
Orthanc's HTTP basic authentication (``RegisteredUsers``) for tests of 401 answers; the handle's
own REST helpers then authenticate as the first user.
"""

from __future__ import annotations

import atexit
import base64
import json
import os
import shutil
import signal
import subprocess
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import pytest

from dicom_assets_tests.conftest import free_port, require_service

ORTHANC_AET = "ORTHANC"
RECEIVER_AET = "DICOM_ASSETS"
DEFAULT_BINARY = "/usr/sbin/Orthanc"
#: Where Debian's ``orthanc-dicomweb`` puts the plugin (a symlink to /usr/lib/orthanc/libOrthancDicomWeb.so.1.7).
DEFAULT_DICOMWEB_PLUGIN = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"
DICOMWEB_ROOT = "/dicom-web/"
STARTUP_TIMEOUT_S = 30.0

#: Never let an http(s)_proxy from the environment see requests meant for 127.0.0.1.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def orthanc_binary() -> str | None:
    """``$ORTHANC_BINARY`` when set (only it), else ``Orthanc`` on PATH or Debian's /usr/sbin/Orthanc;
    None when absent."""
    override = os.environ.get("ORTHANC_BINARY")
    candidates = (override,) if override else (shutil.which("Orthanc"), DEFAULT_BINARY)
    for candidate in candidates:
        if candidate and os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    return None


def require_orthanc() -> str:
    """The Orthanc binary; skips the test without it (fails it under CI=true)."""
    binary = orthanc_binary()
    require_service(binary is not None, "Orthanc (Debian package 'orthanc', /usr/sbin/Orthanc; see scripts/ensure-services.sh)")
    assert binary is not None
    return binary


def dicomweb_plugin() -> str | None:
    """``$ORTHANC_DICOMWEB_PLUGIN`` when set (only it), else Debian's plugin path; None when absent."""
    override = os.environ.get("ORTHANC_DICOMWEB_PLUGIN")
    candidate = override or DEFAULT_DICOMWEB_PLUGIN
    return candidate if os.path.isfile(candidate) else None


def require_dicomweb_plugin() -> str:
    """The DICOMweb plugin's path; skips the test without it (fails it under CI=true)."""
    plugin = dicomweb_plugin()
    require_service(plugin is not None, f"Orthanc's DICOMweb plugin (Debian package 'orthanc-dicomweb', "
                                        f"{DEFAULT_DICOMWEB_PLUGIN}; see scripts/ensure-services.sh)")  # fmt: skip
    assert plugin is not None
    return plugin


def dicomweb_config(plugin: str) -> dict[str, Any]:
    """The keys that load the DICOMweb plugin: QIDO-RS/WADO-RS/STOW-RS under /dicom-web/, no WADO-URI."""
    return {
        "Plugins": [plugin],
        "DicomWeb": {
            "Enable": True,
            "Root": DICOMWEB_ROOT,
            "EnableWado": False,  # WADO-URI: not used
            "Ssl": False,
            "StudiesMetadata": "Full",
            "SeriesMetadata": "Full",
        },
    }


def orthanc_config(
    root: Path,
    dicom_port: int,
    http_port: int,
    receiver_port: int,
    synchronous_move: bool = True,
    receiver_ae_title: str = RECEIVER_AET,
    aet: str = ORTHANC_AET,
    *,
    modality_options: dict[str, Any] | None = None,
    dicomweb_plugin_path: str | None = None,
    users: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Orthanc's JSON configuration: loopback only, no auth, our receiver as the one modality.

    ``modality_options`` are added to (or replace keys of) our modality's entry, e.g.
    ``{"AllowTranscoding": True}`` for an Orthanc that transcodes on C-GET like its default.
    ``dicomweb_plugin_path`` loads the DICOMweb plugin (:func:`dicomweb_config`); ``users``
    enables HTTP basic authentication with these ``RegisteredUsers``.
    """
    config: dict[str, Any] = {
        "Name": f"dicom-assets-test-{dicom_port}",
        "StorageDirectory": str(root / "storage"),
        "IndexDirectory": str(root / "index"),
        "StorageCompression": False,
        "Plugins": [],  # never load Debian's /usr/share/orthanc/plugins
        "ConcurrentJobs": 2,
        "SaveJobs": False,  # no job history survives a restart
        "JobsHistorySize": 1000,  # tests count C-MOVE jobs
        "HttpServerEnabled": True,
        "HttpPort": http_port,
        "RemoteAccessAllowed": False,  # HTTP from 127.0.0.1 only
        "AuthenticationEnabled": False,
        "SslEnabled": False,
        "HttpDescribeErrors": True,
        "ExecuteLuaEnabled": False,
        "RestApiWriteToFileSystemEnabled": False,
        "DicomServerEnabled": True,
        "DicomAet": aet,
        "DicomPort": dicom_port,
        "DicomCheckCalledAet": True,  # a wrong pacs.called_ae_title fails at association
        # Only the registered modality may talk to us, and only from its registered host.
        "DicomCheckModalityHost": True,
        "DicomAlwaysAllowEcho": False,
        "DicomAlwaysAllowStore": False,
        "DicomAlwaysAllowFind": False,
        "DicomAlwaysAllowGet": False,
        "DicomAlwaysAllowMove": False,
        "DicomModalitiesInDatabase": False,
        "DicomModalities": {
            "dicom_assets": {
                "AET": receiver_ae_title,
                "Host": "127.0.0.1",
                "Port": receiver_port,
                "AllowEcho": True,
                "AllowFind": True,
                "AllowMove": True,
                "AllowGet": True,
                "AllowStore": False,
                "AllowStorageCommitment": False,
                "AllowTranscoding": False,  # send instances exactly as stored
            }
        },
        "SynchronousCMove": synchronous_move,
        "DicomScuTimeout": 10,
        "DicomScpTimeout": 30,
        "DicomAssociationCloseDelay": 0,  # no idle C-STORE association left open to our receiver
        "UnknownSopClassAccepted": False,
        "LimitFindResults": 0,
        "LimitFindInstances": 0,
        "DefaultEncoding": "Utf8",
        "DeidentifyLogs": False,
        "StableAge": 1,
        "OverwriteInstances": False,
        "TcpNoDelay": True,
    }
    config["DicomModalities"]["dicom_assets"].update(modality_options or {})
    if dicomweb_plugin_path:
        config.update(dicomweb_config(dicomweb_plugin_path))
    if users:
        config["AuthenticationEnabled"] = True
        config["RegisteredUsers"] = dict(users)
    return config


def _http_json(
    method: str,
    url: str,
    body: bytes | None = None,
    content_type: str | None = None,
    timeout: float = 30.0,
    auth: tuple[str, str] | None = None,
) -> Any:
    request = urllib.request.Request(url, data=body, method=method)
    if content_type:
        request.add_header("Content-Type", content_type)
    if auth is not None:
        token = base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    with _OPENER.open(request, timeout=timeout) as response:
        raw = response.read()
    return json.loads(raw) if raw else None


@dataclass
class OrthancHandle:
    """A running Orthanc: its ports, REST helpers, and its log for failure messages."""

    dicom_port: int
    http_port: int
    aet: str
    root: Path
    config_file: Path
    log_file: Path
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)
    dicomweb: bool = False
    #: (user, password) the REST helpers send when Orthanc was started with ``users``.
    auth: tuple[str, str] | None = field(default=None, repr=False)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def dicomweb_url(self) -> str:
        """The DICOMweb base URL (``http://127.0.0.1:<http_port>/dicom-web``), for ``dicomweb.url``."""
        if not self.dicomweb:
            raise AssertionError("this Orthanc was started without dicomweb=True")
        return self.base_url + DICOMWEB_ROOT.rstrip("/")

    def get(self, path: str) -> Any:
        return _http_json("GET", self.base_url + path, auth=self.auth)

    def post(self, path: str, payload: Any) -> Any:
        body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        return _http_json("POST", self.base_url + path, body, "application/json", auth=self.auth)

    def delete(self, path: str) -> Any:
        return _http_json("DELETE", self.base_url + path, auth=self.auth)

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def load(self, directory: Path) -> int:
        """POST every ``.dcm`` under ``directory`` to /instances; returns how many were stored."""
        stored = 0
        for path in sorted(Path(directory).rglob("*.dcm")):
            if path.name.startswith("."):
                continue
            try:
                answer = _http_json("POST", self.base_url + "/instances", path.read_bytes(), "application/dicom", auth=self.auth)
            except urllib.error.HTTPError as exc:
                raise AssertionError(f"Orthanc refused {path}: {exc} {exc.read()[:500]!r}\n{self.log_tail()}") from exc
            if answer.get("Status") not in ("Success", "AlreadyStored"):
                raise AssertionError(f"Orthanc did not store {path}: {answer}\n{self.log_tail()}")
            stored += 1
        return stored

    def instance_count(self) -> int:
        return int(self.get("/statistics")["CountInstances"])

    def jobs(self, job_type: str | None = None) -> list[dict[str, Any]]:
        """Orthanc's jobs (e.g. ``DicomModalityStore``: the C-STOREs of each C-MOVE it served)."""
        jobs = self.get("/jobs?expand") or []
        return [j for j in jobs if job_type is None or j.get("Type") == job_type]

    def log_tail(self, lines: int = 60) -> str:
        try:
            text = self.log_file.read_text(errors="replace").splitlines()
        except OSError:
            return f"(no Orthanc log at {self.log_file})"
        return f"--- last {min(lines, len(text))} lines of {self.log_file} ---\n" + "\n".join(text[-lines:])

    def stop(self, timeout_s: float = 10.0, wait: bool = True) -> None:
        """SIGTERM (Orthanc shuts down cleanly), then SIGKILL if it does not exit in time.

        Orthanc 1.10.1 needs ~3 s to stop (fixed poll intervals of its HTTP and DICOM servers).
        ``wait=False`` sends SIGTERM and leaves the wait (and the SIGKILL) to the end of the
        Python process, so consecutive tests overlap those seconds; the ports are never reused.
        """
        proc, self.process = self.process, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        if wait:
            _reap(proc, timeout_s)
        else:
            _STOPPING.append((proc, timeout_s))


_STOPPING: list[tuple[subprocess.Popen[bytes], float]] = []


def _reap(proc: subprocess.Popen[bytes], timeout_s: float) -> None:
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=timeout_s)


@atexit.register
def _reap_stopping() -> None:
    """Wait for (or kill) every Orthanc stopped with ``wait=False``."""
    while _STOPPING:
        _reap(*_STOPPING.pop())


def distinct_free_ports(count: int) -> list[int]:
    ports: list[int] = []
    while len(ports) < count:
        candidate = free_port()
        if candidate not in ports:
            ports.append(candidate)
    return ports


def start_orthanc(
    root: Path,
    receiver_port: int,
    synchronous_move: bool = True,
    receiver_ae_title: str = RECEIVER_AET,
    verbose: bool = False,
    *,
    modality_options: dict[str, Any] | None = None,
    dicomweb: bool = False,
    users: dict[str, str] | None = None,
) -> OrthancHandle:
    """Start Orthanc with a fresh config under ``root``; returns once its REST API answers
    (and, with ``dicomweb``, once the plugin is loaded). ``modality_options``, ``users``: see
    :func:`orthanc_config`."""
    binary = require_orthanc()
    plugin = require_dicomweb_plugin() if dicomweb else None
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    dicom_port, http_port = distinct_free_ports(2)
    config = orthanc_config(root, dicom_port, http_port, receiver_port, synchronous_move, receiver_ae_title,
                            modality_options=modality_options, dicomweb_plugin_path=plugin, users=users)  # fmt: skip
    config_file = root / "orthanc.json"
    config_file.write_text(json.dumps(config, indent=2))
    log_file = root / "orthanc.log"
    args = [binary, *(["--verbose"] if verbose else []), str(config_file)]
    with open(log_file, "wb") as log:
        process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=root)
    auth = next(iter(users.items())) if users else None
    handle = OrthancHandle(dicom_port, http_port, ORTHANC_AET, root, config_file, log_file, process, dicomweb, auth)
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"Orthanc exited with status {process.returncode} at startup\n{handle.log_tail()}")
        try:
            system = handle.get("/system")
            if system and system.get("DicomAet") == ORTHANC_AET and _plugin_ready(handle):
                return handle
        except (urllib.error.URLError, OSError, ValueError) as exc:
            last_error = exc
        time.sleep(0.1)
    handle.stop()
    pytest.fail(f"Orthanc did not answer GET /system within {STARTUP_TIMEOUT_S:.0f} s ({last_error})\n{handle.log_tail()}")


def _plugin_ready(handle: OrthancHandle) -> bool:
    """True unless the DICOMweb plugin was asked for and Orthanc does not list it (yet)."""
    if not handle.dicomweb:
        return True
    plugins = handle.get("/plugins") or []
    if "dicom-web" in plugins:
        return True
    pytest.fail(f"Orthanc started without its DICOMweb plugin (loaded: {plugins})\n{handle.log_tail()}")


@contextmanager
def running_orthanc(
    tmp_path: Path,
    receiver_port: int,
    synchronous_move: bool = True,
    receiver_ae_title: str = RECEIVER_AET,
    verbose: bool = False,
    wait_on_stop: bool = True,
    *,
    modality_options: dict[str, Any] | None = None,
    dicomweb: bool = False,
    users: dict[str, str] | None = None,
) -> Iterator[OrthancHandle]:
    """An Orthanc for the duration of the block (under ``tmp_path/orthanc``), always stopped
    (``wait_on_stop=False``: SIGTERM now, wait at interpreter exit, see :meth:`OrthancHandle.stop`).
    ``dicomweb=True`` loads the DICOMweb plugin (:attr:`OrthancHandle.dicomweb_url`); ``users``
    turns on HTTP basic authentication.

    An exception escaping the block gets the tail of Orthanc's log attached as a note.
    """
    handle = start_orthanc(Path(tmp_path) / "orthanc", receiver_port, synchronous_move, receiver_ae_title, verbose,
                           modality_options=modality_options, dicomweb=dicomweb, users=users)  # fmt: skip
    try:
        yield handle
    except BaseException as exc:
        if hasattr(exc, "add_note"):
            exc.add_note(handle.log_tail())
        raise
    finally:
        handle.stop(wait=wait_on_stop)
