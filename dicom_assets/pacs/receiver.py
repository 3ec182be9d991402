"""Receiving instances: the storage SCP for C-MOVE, and the sink C-GET's C-STOREs go to.

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

The storage SCP (:class:`StorageReceiver`) streams: each instance is routed from the first
bytes of its dataset (:mod:`dicom_assets.pacs.routing`) and then written to its temp file
fragment by fragment as the PDUs arrive (:mod:`dicom_assets.pacs.upper_layer`), so memory does
not grow with instance or series size and no byte is copied on its way to the file.
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import os
import socket
import struct
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from pynetdicom import PYNETDICOM_IMPLEMENTATION_UID, PYNETDICOM_IMPLEMENTATION_VERSION

from dicom_assets import stopping
from dicom_assets.layout import UnsafeNameError, check_uid, instance_file, series_dir, temp_name, temp_token
from dicom_assets.pacs import upper_layer as ul
from dicom_assets.pacs.contexts import receiver_contexts
from dicom_assets.pacs.routing import MalformedDataset, routing_uids
from dicom_assets.pacs.throughput import RECEIVED

log = logging.getLogger("dicom_assets.receiver")

STATUS_SUCCESS = 0x0000
STATUS_OUT_OF_RESOURCES = 0xA700  # disk full / permission denied: the PACS may retry later
STATUS_NOT_EXPECTED = 0xC001  # nobody asked for this instance: refused, never written
STATUS_CANNOT_UNDERSTAND = 0xC002  # dataset unreadable or its UIDs are unusable

C_STORE_RQ, C_STORE_RSP, C_ECHO_RQ, C_ECHO_RSP = 0x0001, 0x8001, 0x0030, 0x8030
#: Bytes of a dataset held in memory at most while looking for its routing UIDs.
ROUTING_HEAD_LIMIT = 64 << 20
#: A storage association idle this long (seconds) is closed.
NETWORK_TIMEOUT_S = 120.0


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
    #: Each instance written by this retrieve: SOP Instance UID -> (SOP class, transfer syntax as
    #: received, bytes); recorded in the state DB (``instances``) to show what the PACS sent.
    arrived: dict[str, tuple[str, str, int]] = field(default_factory=dict)
    _cond: threading.Condition = field(default_factory=threading.Condition, repr=False)
    _made: bool = field(default=False, repr=False)

    def note_arrival(self, size: int, duplicate: bool, instance: "IncomingInstance | None" = None) -> None:
        with self._cond:
            if duplicate:
                self.duplicates += 1
            else:
                self.received += 1
                self.bytes += size
                if instance is not None:
                    self.arrived[instance.sop_uid] = (instance.sop_class_uid, instance.transfer_syntax, size)
            self.last_arrival = time.monotonic()
            self._cond.notify_all()

    def make_directory(self) -> None:
        """Create the series directory, once per retrieve (not once per instance)."""
        if not self._made:
            self.directory.mkdir(parents=True, exist_ok=True)
            self._made = True

    def note_write_error(self, path: Path, exc: OSError) -> None:
        self.last_error = f"cannot write {path}: {exc.strerror or exc}"
        self.last_errno = exc.errno
        log.error(self.last_error)

    def patience(self, timeout_s: float) -> "callable[[], float]":  # type: ignore[valid-type]
        """For a C-MOVE without Pending responses: the seconds left until ``timeout_s`` has passed
        since the last instance arrived (<= 0: the PACS has gone quiet for a whole timeout)."""
        return lambda: timeout_s - (time.monotonic() - self.last_arrival)

    def wait_for_stragglers(self, done: "callable[[], bool]", idle_s: float) -> None:  # type: ignore[valid-type]
        """Wait until ``done()`` or until nothing has arrived for ``idle_s`` seconds.

        Some PACS report the C-MOVE final status before the last C-STOREs arrive on the other
        association; counting too early would mark a complete series incomplete.
        """
        with self._cond:
            while not done():
                stopping.PROCESS.check()
                idle = time.monotonic() - self.last_arrival
                if idle >= idle_s:
                    return
                self._cond.wait(timeout=min(idle_s - idle, 0.5))  # a stop request is seen within 0.5 s


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

    def route(self, sop_uid: str, uids: Mapping[str, str], who: str) -> InFlightRetrieve | int:
        """The retrieve in flight an instance belongs to, or the status refusing it."""
        try:
            check_uid(sop_uid, "SOPInstanceUID")
            if uids.get("SOPInstanceUID", sop_uid) != sop_uid:
                raise UnsafeNameError("SOPInstanceUID in the dataset differs from the C-STORE request")
        except UnsafeNameError as exc:
            self.refuse(who, f"unreadable instance {sop_uid!r}: {exc}")
            return STATUS_CANNOT_UNDERSTAND
        series_uid, study_uid = uids.get("SeriesInstanceUID", ""), uids.get("StudyInstanceUID", "")
        with self._lock:
            flight = self._in_flight.get(series_uid)
        if flight is None or flight.study_uid != study_uid:
            self.refuse(who, f"instance {sop_uid} of series {series_uid!r} was not requested")
            return STATUS_NOT_EXPECTED
        return flight

    def open_instance(self, sop_class_uid: str, sop_uid: str, transfer_syntax: str, who: str) -> "IncomingInstance":
        """A C-STORE whose dataset is about to stream in (storage SCP, or a C-GET's association)."""
        return IncomingInstance(self, sop_class_uid, sop_uid, transfer_syntax, who)

    def refuse(self, who: str, why: str) -> None:
        self.refused += 1
        log.warning("refused C-STORE from %s: %s", who, why)


class IncomingInstance:
    """One C-STORE's dataset streamed to disk: routed by the UIDs at its start, then written.

    Until routed, fragments are kept (only the first few KB, normally); then the file meta
    header and those bytes go to a temp file, and every later fragment is written straight
    from the network buffer. A refused or duplicate instance is read and dropped. ``finish``
    renames the complete file into place and returns the C-STORE status; ``abort`` (the
    connection failed midway) removes the temp file.
    """

    def __init__(self, sink: InstanceSink, sop_class_uid: str, sop_uid: str, transfer_syntax: str, who: str) -> None:
        self.sink = sink
        self.sop_class_uid = sop_class_uid
        self.sop_uid = sop_uid
        self.transfer_syntax = transfer_syntax
        self.who = who
        self.head = bytearray()
        self.status: int | None = None  # decided before the end: refused, duplicate or failed
        self.flight: InFlightRetrieve | None = None
        self.final: Path | None = None
        self.tmp: Path | None = None
        self.fd: int | None = None
        self.size = 0

    def write(self, piece: memoryview) -> None:
        RECEIVED.add(len(piece))  # the throughput that adaptive concurrency measures
        if self.fd is not None:
            self._append(piece)
        elif self.status is None:
            self.head += piece
            self._route(complete=False)

    def _route(self, complete: bool) -> None:
        try:
            uids = routing_uids(self.head, self.transfer_syntax, complete)
        except MalformedDataset as exc:
            self.sink.refuse(self.who, f"unreadable instance {self.sop_uid!r}: {exc}")
            self._decide(STATUS_CANNOT_UNDERSTAND)
            return
        if uids is None:
            if len(self.head) > ROUTING_HEAD_LIMIT:
                self.sink.refuse(self.who, f"instance {self.sop_uid!r}: no Series Instance UID in its first {ROUTING_HEAD_LIMIT} bytes")
                self._decide(STATUS_CANNOT_UNDERSTAND)
            return
        routed = self.sink.route(self.sop_uid, uids, self.who)
        if isinstance(routed, int):
            self._decide(routed)
            return
        self.flight = routed
        self.final = instance_file(routed.directory, self.sop_uid)
        if self.final.exists():
            self._decide(STATUS_SUCCESS)
            return
        self._open_file()

    def _decide(self, status: int) -> None:
        self.status = status
        self.head = bytearray()

    def _open_file(self) -> None:
        assert self.flight is not None and self.final is not None
        self.tmp = temp_name(self.final, temp_token())
        meta = file_meta(self.sop_class_uid, self.sop_uid, self.transfer_syntax)
        try:
            self.flight.make_directory()
            self.fd = os.open(self.tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
            self._append(memoryview(meta))
            self._append(memoryview(self.head))
        except OSError as exc:
            self._failed(exc)
        self.head = bytearray()

    def _append(self, piece: memoryview) -> None:
        if self.fd is None:  # an earlier write failed (disk full ...): the file is gone, drop the rest
            return
        try:
            while piece:
                written = os.write(self.fd, piece)  # type: ignore[arg-type]
                self.size += written
                piece = piece[written:]
        except OSError as exc:
            self._failed(exc)

    def _failed(self, exc: OSError) -> None:
        assert self.flight is not None and self.final is not None
        self.flight.note_write_error(self.final, exc)
        self._close_and_remove()
        self.status = STATUS_OUT_OF_RESOURCES

    def _close_and_remove(self) -> None:
        fd, self.fd = self.fd, None
        if fd is not None:
            try:
                os.close(fd)  # released even when close reports an error: never closed twice
            except OSError:
                pass
        if self.tmp is not None:
            _unlink_quietly(self.tmp)
            self.tmp = None

    def finish(self) -> int:
        """The dataset is complete: put the file in place; returns the C-STORE status."""
        if self.status is None and self.fd is None:
            self._route(complete=True)
        if self.status is not None:
            if self.status == STATUS_SUCCESS and self.flight is not None:
                self.flight.note_arrival(0, duplicate=True)
            return self.status
        assert self.flight is not None and self.final is not None and self.tmp is not None
        fd, self.fd = self.fd, None
        try:
            os.close(fd)  # type: ignore[arg-type]  # a late write error (NFS, quota) surfaces here
            os.replace(self.tmp, self.final)
        except OSError as exc:
            self._failed(exc)
            return STATUS_OUT_OF_RESOURCES
        self.tmp = None
        self.flight.note_arrival(self.size, duplicate=False, instance=self)
        return STATUS_SUCCESS

    def abort(self) -> None:
        self._close_and_remove()


def _element(group_element: int, vr: bytes, value: bytes) -> bytes:
    """One explicit VR little endian element with a 2-byte length (OB: reserved + 4-byte)."""
    tag = struct.pack("<HH", group_element >> 16, group_element & 0xFFFF)
    if vr == b"OB":
        return tag + vr + b"\x00\x00" + struct.pack("<L", len(value)) + value
    return tag + vr + struct.pack("<H", len(value)) + value


def _padded(value: str, pad: bytes) -> bytes:
    raw = value.encode("ascii")
    return raw + pad if len(raw) % 2 else raw


def file_meta(sop_class_uid: str, sop_uid: str, transfer_syntax: str) -> bytes:
    """Preamble, ``DICM`` and the file meta group (PS3.10) of a received instance.

    The same elements pynetdicom writes (its ``create_file_meta``), encoded directly: building
    them as a pydicom dataset took 0.3 ms an instance, a sixth of receiving one.
    """
    body = b"".join((
        _element(0x00020001, b"OB", b"\x00\x01"),
        _element(0x00020002, b"UI", _padded(sop_class_uid, b"\x00")),
        _element(0x00020003, b"UI", _padded(sop_uid, b"\x00")),
        _element(0x00020010, b"UI", _padded(transfer_syntax, b"\x00")),
        _element(0x00020012, b"UI", _padded(PYNETDICOM_IMPLEMENTATION_UID, b"\x00")),
        _element(0x00020013, b"SH", _padded(PYNETDICOM_IMPLEMENTATION_VERSION, b" ")),
    ))  # fmt: skip
    return b"\x00" * 128 + b"DICM" + _element(0x00020000, b"UL", struct.pack("<L", len(body))) + body


class _Discard:
    """The dataset of a message we do not store (not a C-STORE): read and dropped."""

    def write(self, piece: memoryview) -> None:
        pass

    def abort(self) -> None:
        pass


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


class StorageReceiver:
    """The storage SCP a C-MOVE sends to: listens on ``receiver.bind_address:port``.

    Only associations whose calling AE title is in ``allowed_ae_titles`` (for a run: the PACS's,
    see :func:`dicom_assets.config.receiver_allowed_ae_titles`) and, when ``allowed_hosts`` is
    given, whose peer address is in it, are accepted. Each association is served by a thread of
    its own; their data path is :mod:`dicom_assets.pacs.upper_layer`.
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
        self.sink = InstanceSink(download_dir)
        self.ae_title = ae_title
        self.bind_address = bind_address
        self.port = port
        self._allowed = [t.strip() for t in allowed_ae_titles] if allowed_ae_titles else None
        self._allowed_hosts = frozenset(_normalise_ip(h) for h in allowed_hosts) if allowed_hosts else None
        self._contexts = receiver_contexts()
        self._requests = ul.AssociationCache()  # the PACS's requests, answered once (one per series)
        self._listener: socket.socket | None = None
        self._connections: set[socket.socket] = set()
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()

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
        family = socket.AF_INET6 if ":" in self.bind_address else socket.AF_INET
        try:
            self._listener = socket.create_server((self.bind_address, self.port), family=family, backlog=64)
        except OSError as exc:
            raise OSError(
                f"cannot listen on receiver.bind_address:receiver.port {self.bind_address}:{self.port}: "
                f"{exc.strerror or exc} (is another dicom-assets run using this port?)"
            ) from exc
        self.port = self._listener.getsockname()[1]
        thread = threading.Thread(target=self._accept_loop, name=f"storage-scp-{self.port}", daemon=True)
        thread.start()
        self._threads.append(thread)
        log.info("storage SCP %s listening on %s:%s", self.ae_title, self.bind_address, self.port)
        return self

    def stop(self) -> None:
        listener, self._listener = self._listener, None
        if listener is None:
            return
        _shutdown(listener)
        listener.close()
        with self._lock:
            connections = list(self._connections)
        for conn in connections:
            _shutdown(conn)
        for thread in self._threads:
            thread.join(timeout=5)
        self._threads = []

    def __enter__(self) -> "StorageReceiver":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _accept_loop(self) -> None:
        listener = self._listener
        while listener is not None and self._listener is listener:
            try:
                conn, address = listener.accept()
            except OSError:
                return  # stopped
            if self._allowed_hosts is not None and _normalise_ip(str(address[0])) not in self._allowed_hosts:
                log.warning("refused connection from %s: not in receiver.allowed_hosts %s", address[0], sorted(self._allowed_hosts))
                conn.close()
                continue
            thread = threading.Thread(target=self._serve, args=(conn, address), name=f"storage-scp-{address[1]}", daemon=True)
            with self._lock:
                self._connections.add(conn)
                self._threads = [t for t in self._threads if t.is_alive()]
                self._threads.append(thread)
            thread.start()

    def _serve(self, conn: socket.socket, address: tuple[Any, ...]) -> None:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conn.settimeout(NETWORK_TIMEOUT_S)
        try:
            request, raw = ul.read_association_request(conn, self._requests)
            if not self._acceptable(conn, request, address):
                return
            assoc = ul.accept(conn, request, self._contexts)
            self._requests.keep(raw, request)
            self._exchange(assoc, f"{request.calling_ae_title}@{address[0]}")
        except ul.ProtocolError as exc:
            log.warning("aborting the association from %s: %s", address[0], exc)
            ul.abort_unaccepted(conn)
        except (ul.ConnectionClosed, OSError) as exc:
            log.debug("storage association from %s ended: %s", address[0], exc)
        finally:
            with self._lock:
                self._connections.discard(conn)
            conn.close()

    def _acceptable(self, conn: socket.socket, request: ul.AssociationRequest, address: tuple[Any, ...]) -> bool:
        if request.called_ae_title != self.ae_title:
            reason, why = 7, f"called AE title {request.called_ae_title!r} is not receiver.ae_title {self.ae_title!r}"
        elif self._allowed and request.calling_ae_title not in self._allowed:
            reason, why = 3, "not in receiver.allowed_ae_titles / the PACS's AE title"
        else:
            return True
        log.warning("rejected association from AE %r at %s (%s)", request.calling_ae_title, address[0], why)
        ul.reject(conn, reason)
        return False

    def _exchange(self, assoc: ul.Association, who: str) -> None:
        def open_dataset(context_id: int, command: ul.Command) -> Any:
            if command.field != C_STORE_RQ:
                return _Discard()
            sop_class = command.uid(0x00000002) or assoc.abstract_syntax(context_id)
            return self.sink.open_instance(sop_class, command.uid(0x00001000), assoc.transfer_syntax(context_id), who)

        for context_id, command, dataset in assoc.messages(open_dataset):
            if command.field == C_STORE_RQ and isinstance(dataset, IncomingInstance):
                status = dataset.finish()
                reply = _response(C_STORE_RSP, command, status, command.uid(0x00001000))
            elif command.field == C_ECHO_RQ:
                reply = _response(C_ECHO_RSP, command, STATUS_SUCCESS)
            else:
                raise ul.ProtocolError(f"unsupported DIMSE command 0x{command.field or 0:04x}")
            assoc.send_command(context_id, reply)


def _response(field_: int, request: ul.Command, status: int, sop_uid: str | None = None) -> bytes:
    values: dict[int, int | str] = {
        0x00000002: request.uid(0x00000002),
        0x00000100: field_,
        0x00000120: request.message_id,
        0x00000800: 0x0101,
        0x00000900: status,
    }
    if sop_uid is not None:
        values[0x00001000] = sop_uid
    return ul.encode_command(values)


def _shutdown(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
