"""Receiving instances: the storage SCP for C-MOVE and the C-STORE handler for C-GET.

Both paths end in :class:`InstanceSink`, which only stores instances that belong to a retrieve
in flight (a series we asked for), writes them exactly as received (no decode/re-encode of
pixel data) to a hidden temp file, and renames it into place, so a crash never leaves a
truncated ``.dcm``. An instance already on disk is acknowledged and not written again.

Nothing from the network chooses a path: an instance is routed by its Series/Study Instance UIDs
to a retrieve in flight (whose directory was built from checked UIDs), and its SOP Instance UID
must be a valid UID (digits and dots, at most 64) equal to the C-STORE request's; anything else
is refused (0xC002) and never written. The storage SCP accepts associations only from the
allowed calling AE titles and, when set, the allowed host addresses; others are rejected and
logged.
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydicom.dataset import Dataset
from pynetdicom import AE, evt, transport

from dicom_assets.layout import UnsafeNameError, check_uid, instance_file, series_dir, temp_name, temp_token
from dicom_assets.pacs.contexts import receiver_contexts
from dicom_assets.pacs.sockets import enable_tcp_nodelay

log = logging.getLogger("dicom_assets.receiver")

STATUS_SUCCESS = 0x0000
STATUS_OUT_OF_RESOURCES = 0xA700  # disk full / permission denied: the PACS may retry later
STATUS_NOT_EXPECTED = 0xC001  # nobody asked for this instance: refused, never written
STATUS_CANNOT_UNDERSTAND = 0xC002  # dataset unreadable or its UIDs are unusable


@dataclass
class InFlightRetrieve:
    """One series being retrieved: where its instances go and what has arrived."""

    patient_id: str
    study_uid: str
    series_uid: str
    directory: Path
    received: int = 0
    duplicates: int = 0
    bytes: int = 0
    refused: int = 0
    last_error: str | None = None
    last_errno: int | None = None
    last_arrival: float = field(default_factory=time.monotonic)
    _cond: threading.Condition = field(default_factory=threading.Condition, repr=False)

    def note_arrival(self, size: int, duplicate: bool) -> None:
        with self._cond:
            if duplicate:
                self.duplicates += 1
            else:
                self.received += 1
                self.bytes += size
            self.last_arrival = time.monotonic()
            self._cond.notify_all()

    def wait_for_stragglers(self, done: "callable[[], bool]", idle_s: float) -> None:  # type: ignore[valid-type]
        """Wait until ``done()`` or until nothing has arrived for ``idle_s`` seconds.

        Some PACS report the C-MOVE final status before the last C-STOREs arrive on the other
        association; counting too early would mark a complete series incomplete.
        """
        with self._cond:
            while not done():
                idle = time.monotonic() - self.last_arrival
                if idle >= idle_s:
                    return
                self._cond.wait(timeout=idle_s - idle)


class InstanceSink:
    """Routes incoming C-STOREs to the retrieve in flight for their series, and writes them."""

    def __init__(self, download_dir: Path) -> None:
        self.download_dir = Path(download_dir)
        self._in_flight: dict[str, InFlightRetrieve] = {}
        self._lock = threading.Lock()
        self.refused = 0

    def expect(self, patient_id: str, study_uid: str, series_uid: str) -> InFlightRetrieve:
        """Register a series about to be retrieved; instances of other series are refused."""
        directory = series_dir(self.download_dir, patient_id, study_uid, series_uid)
        flight = InFlightRetrieve(patient_id, study_uid, series_uid, directory)
        with self._lock:
            self._in_flight[series_uid] = flight
        return flight

    def done(self, flight: InFlightRetrieve) -> None:
        with self._lock:
            if self._in_flight.get(flight.series_uid) is flight:
                del self._in_flight[flight.series_uid]

    def handle_store(self, event: Any) -> int:
        """EVT_C_STORE handler: returns the DIMSE status."""
        sop_uid = str(event.request.AffectedSOPInstanceUID or "")
        try:
            header = _routing_header(event)
            series_uid = str(header.get("SeriesInstanceUID", ""))
            study_uid = str(header.get("StudyInstanceUID", ""))
            check_uid(sop_uid, "SOPInstanceUID")
            if str(header.get("SOPInstanceUID", sop_uid)) != sop_uid:
                raise UnsafeNameError("SOPInstanceUID in the dataset differs from the C-STORE request")
        except Exception as exc:  # noqa: BLE001 - anything unreadable is refused, never written
            self._refuse(event, f"unreadable instance {sop_uid!r}: {exc}")
            return STATUS_CANNOT_UNDERSTAND
        with self._lock:
            flight = self._in_flight.get(series_uid)
        if flight is None or flight.study_uid != study_uid:
            self._refuse(event, f"instance {sop_uid} of series {series_uid!r} was not requested")
            return STATUS_NOT_EXPECTED
        return self._write(event, flight, sop_uid)

    def _write(self, event: Any, flight: InFlightRetrieve, sop_uid: str) -> int:
        final = instance_file(flight.directory, sop_uid)
        if final.exists():
            flight.note_arrival(0, duplicate=True)
            return STATUS_SUCCESS
        tmp = temp_name(final, temp_token())
        try:
            flight.directory.mkdir(parents=True, exist_ok=True)
            data = event.encoded_dataset()
            with open(tmp, "wb") as handle:
                handle.write(data)
            os.replace(tmp, final)
        except OSError as exc:
            _unlink_quietly(tmp)
            flight.last_error = f"cannot write {final}: {exc.strerror or exc}"
            flight.last_errno = exc.errno
            log.error(flight.last_error)
            return STATUS_OUT_OF_RESOURCES
        flight.note_arrival(len(data), duplicate=False)
        return STATUS_SUCCESS

    def _refuse(self, event: Any, why: str) -> None:
        self.refused += 1
        calling = getattr(getattr(event, "assoc", None), "requestor", None)
        who = f"{getattr(calling, 'ae_title', '?')}@{getattr(calling, 'address', '?')}"
        log.warning("refused C-STORE from %s: %s", who, why)


def _routing_header(event: Any) -> Dataset:
    """The few UIDs needed to route an instance, read without touching the pixel data."""
    ds = event.dataset
    return Dataset({tag: ds[tag] for tag in (0x0020000D, 0x0020000E, 0x00080018) if tag in ds})


def _unlink_quietly(path: Path) -> None:
    try:
        path.unlink()
    except OSError:
        pass


DISK_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM})


def _normalise_ip(address: str) -> str:
    """``::ffff:10.0.0.1`` -> ``10.0.0.1``; anything unparsable stays as it is (and never matches)."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return address
    mapped = getattr(ip, "ipv4_mapped", None)
    return str(mapped or ip)


_filter_lock = threading.Lock()
_filter_installed = False


def _install_host_filter() -> None:
    """Let an AE refuse TCP connections from hosts not in its ``_allowed_hosts`` (idempotent).

    pynetdicom has no address filter; socketserver's ``verify_request`` runs before anything is
    read from the connection, so a refused host never gets to send a PDU.
    """
    global _filter_installed
    with _filter_lock:
        if _filter_installed:
            return
        original = transport.AssociationServer.verify_request

        def verify_request(self, request, client_address):  # type: ignore[no-untyped-def]
            allowed = getattr(getattr(self, "ae", None), "_allowed_hosts", None)
            if allowed is not None and _normalise_ip(str(client_address[0])) not in allowed:
                log.warning(
                    "refused connection from %s: not in receiver.allowed_hosts %s", client_address[0], sorted(allowed)
                )
                return False
            return original(self, request, client_address)

        transport.AssociationServer.verify_request = verify_request
        _filter_installed = True


class StorageReceiver:
    """The storage SCP a C-MOVE sends to: listens on ``receiver.bind_address:port``.

    Only associations whose calling AE title is in ``allowed_ae_titles`` (for a run: the PACS's,
    see :func:`dicom_assets.config.receiver_allowed_ae_titles`) and, when ``allowed_hosts`` is
    given, whose peer address is in it, are accepted.
    """

    def __init__(
        self,
        ae_title: str,
        bind_address: str,
        port: int,
        download_dir: Path,
        allowed_ae_titles: list[str] | None = None,
        allowed_hosts: list[str] | None = None,
    ) -> None:
        enable_tcp_nodelay()
        self.sink = InstanceSink(download_dir)
        self.ae_title = ae_title
        self.bind_address = bind_address
        self.port = port
        self._allowed = [t.strip() for t in allowed_ae_titles] if allowed_ae_titles else None
        self._allowed_hosts = frozenset(_normalise_ip(h) for h in allowed_hosts) if allowed_hosts else None
        self._server: Any = None

    @classmethod
    def from_settings(cls, settings: Any) -> "StorageReceiver":
        """The locked-down receiver of a run: ``receiver.*`` and the PACS's AE title."""
        from dicom_assets.config import receiver_allowed_ae_titles

        r = settings.receiver
        return cls(
            r.ae_title, r.bind_address, r.port, settings.paths.download_dir,
            allowed_ae_titles=receiver_allowed_ae_titles(settings), allowed_hosts=r.allowed_hosts,
        )  # fmt: skip

    def start(self) -> "StorageReceiver":
        ae = AE(ae_title=self.ae_title)
        ae.supported_contexts = receiver_contexts()
        ae.maximum_pdu_size = 0  # unlimited: fewer, larger PDUs
        ae.require_called_aet = True
        if self._allowed:
            ae.require_calling_aet = self._allowed
        if self._allowed_hosts is not None:
            _install_host_filter()
            ae._allowed_hosts = self._allowed_hosts  # type: ignore[attr-defined]
        handlers = [(evt.EVT_C_STORE, self.sink.handle_store), (evt.EVT_REJECTED, _log_rejected)]
        try:
            self._server = ae.start_server((self.bind_address, self.port), block=False, evt_handlers=handlers)
        except OSError as exc:
            raise OSError(
                f"cannot listen on receiver.bind_address:receiver.port {self.bind_address}:{self.port}: "
                f"{exc.strerror or exc} (is another dicom-assets run using this port?)"
            ) from exc
        self.port = self._server.server_address[1]
        log.info("storage SCP %s listening on %s:%s", self.ae_title, self.bind_address, self.port)
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None

    def __enter__(self) -> "StorageReceiver":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _log_rejected(event: Any) -> None:
    requestor = event.assoc.requestor
    log.warning(
        "rejected association from AE %r at %s (not in receiver.allowed_ae_titles / the PACS's AE title)",
        requestor.ae_title, requestor.address,
    )  # fmt: skip
