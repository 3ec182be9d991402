"""A small Query/Retrieve SCP that serves a folder of DICOM files: the development PACS.

It exists so the demo, the fast tests and offline users have a PACS that behaves like a real one
where it matters to a retriever: C-ECHO, C-FIND (Patient Root and Study Root, every level, the
standard matching rules, computed counts, an optional result cap), C-MOVE to registered
destinations and C-GET, with files sent exactly as stored.

How it is put together (one module per concern):

* :mod:`~dicom_assets.devpacs.catalog`: the live index of the folder (``path -> header
  attributes``, rescanned at most every ``rescan_interval_s``) and the immutable catalog
  snapshots queries run against, without locks.
* :mod:`~dicom_assets.devpacs.query`: a C-FIND/C-MOVE/C-GET identifier compiled into
  per-attribute filters (single value, ``*``/``?`` wildcards, UID lists, date/time ranges).
* :mod:`~dicom_assets.devpacs.sending`: how C-STORE sub-operations send an instance: as stored
  (the file's own bytes) when the peer accepted its (SOP class, stored syntax); otherwise
  re-encoded between uncompressed Little Endian syntaxes, or, with ``transcode_to_explicit=True``,
  decoded like Orthanc does (:mod:`~dicom_assets.devpacs.transcode`); else the sub-operation fails.
* This module: the SCP itself (:class:`DevPacs`): associations, the Q/R handlers, and request
  counting with fault injection. Every association and every request passes through
  :meth:`DevPacs._request`, which counts it in a sliding window (``peak_requests_per_minute``)
  and injects the site's faults: ``reset_above_per_minute=N`` aborts every open association
  when more than N requests arrived in the last ``window_s`` (60) seconds, like the hospital
  PACS, including the one whose request went over; ``drop_every_s`` aborts every open
  association periodically, like a nightly network reset. Counters: ``resets_triggered``,
  ``drops``, ``associations_aborted``. A reset or drop aborts associations from another thread
  than theirs, so every association queues nothing after its A-ABORT (:func:`_nothing_after_abort`),
  and one whose A-ASSOCIATE-RQ has not arrived yet is aborted when it does.
"""

from __future__ import annotations

import collections
import logging
import signal
import threading
import time
import weakref
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any, Iterator, Mapping, Sequence

from pydicom import dcmread
from pydicom.dataset import Dataset
from pynetdicom import ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, _config, evt
from pynetdicom.association import Association
from pynetdicom.events import Event
from pynetdicom.pdu_primitives import A_ABORT, A_P_ABORT
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from dicom_assets.devpacs.catalog import _FolderIndex, _Instance, _parse_instance
from dicom_assets.devpacs.query import _MODEL_LEVELS, QueryError, _Query
from dicom_assets.devpacs.sending import (
    UNABLE_TO_PROCESS,
    CannotSend,
    SendPolicy,
    _DevPacsAE,
    _move_contexts,
    _send_files_as_stored,
    _StoredFile,
)
from dicom_assets.pacs.sockets import enable_tcp_nodelay

__all__ = ["DevPacs", "serve_forever"]

LOGGER = logging.getLogger("dicom_assets.devpacs")

# Statuses (PS3.4 C.4).
PENDING = 0xFF00
CANCELLED = 0xFE00
#: An acceptor picks the first of its own syntaxes the requestor proposed. For C-GET storage
#: contexts, Explicit VR Little Endian first: it is what the generated cohort is stored in, so
#: those files go out as stored whenever the requestor allows it, and it is what a PACS that
#: transcodes (Orthanc) picks when a context offers several syntaxes.
_STORAGE_SYNTAXES = ["1.2.840.10008.1.2.1"] + [ts for ts in ALL_TRANSFER_SYNTAXES if ts != "1.2.840.10008.1.2.1"]


def _read_whole_file(path: Path) -> Dataset:
    """Every full read (pixel data included) of a served file: only to convert or transcode one
    the peer did not accept as stored. One function, so a test can forbid it."""
    return dcmread(path)


def _nothing_after_abort(assoc: Association) -> None:
    """Make ``assoc`` queue nothing for its peer once an A-ABORT is queued (idempotent).

    A reset or a drop aborts an association from another thread (``devpacs-drops``,
    ``devpacs-reset``) while the association's own thread may be answering a request: it checked
    ``is_established`` a moment before and is queueing C-FIND/C-MOVE responses or a C-STORE's
    P-DATA. pynetdicom's DUL sends the A-ABORT (state Sta13: awaiting the transport close); a
    P-DATA (Evt9) or A-RELEASE response (Evt14) queued behind it has no transition in Sta13,
    and ``InvalidEventError`` kills the DUL's reactor thread with a traceback. After an A-ABORT
    request the association no longer exists (PS3.8 9.2), so what its thread still hands over
    is dropped here, under a lock the abort also takes: nothing can be queued behind it.
    """
    dul = assoc.dul
    if getattr(dul, "_devpacs_nothing_after_abort", False):
        return
    queue_primitive = dul.send_pdu
    guard = threading.Lock()
    state = {"aborted": False, "dropped": 0}

    def send_pdu(primitive: Any) -> None:
        with guard:
            if state["aborted"]:
                if not state["dropped"]:
                    LOGGER.debug(
                        "association from %s:%s aborted: not sending the rest of its %s",
                        assoc.requestor.address, assoc.requestor.port, type(primitive).__name__,
                    )  # fmt: skip
                state["dropped"] += 1
                return
            if isinstance(primitive, (A_ABORT, A_P_ABORT)):
                state["aborted"] = True
            queue_primitive(primitive)

    dul.send_pdu = send_pdu  # type: ignore[method-assign]
    dul._devpacs_nothing_after_abort = True  # type: ignore[attr-defined]


def _quiet_pynetdicom() -> None:
    """pynetdicom logs every PDU at INFO; keep it at WARNING unless the user chose a level."""
    logger = logging.getLogger("pynetdicom")
    if logger.level == logging.NOTSET:
        logger.setLevel(logging.WARNING)


class DevPacs:
    """A Query/Retrieve SCP serving the DICOM files under ``storage_dir`` (see module doc).

    ``port=0`` binds a free port; :attr:`port` holds the bound one after :meth:`start`.
    ``move_destinations`` maps AE titles to ``(host, port)`` for C-MOVE; any other destination
    gets 0xA801. ``max_find_results > 0`` caps C-FIND matches like many hospital PACSes do
    (the final status stays Success, as theirs does). ``rescan_interval_s`` bounds how often
    the folder is rescanned for new or changed files.

    Fault injection (0 = off): ``reset_above_per_minute=N`` aborts every open association when a
    request (an association or a C-ECHO/C-FIND/C-MOVE/C-GET) arrives with more than N requests in
    the last ``window_s`` seconds; ``drop_every_s`` aborts every open association that often.
    ``window_s`` (60) is shortened by tests only. ``max_retrieves_at_once=N`` answers a C-MOVE or
    C-GET that arrives while N are running with 0xA702 (out of resources), as PACS that limit
    their retrieves do.

    ``transcode_to_explicit=True`` plays a PACS that transcodes, like Orthanc: an instance whose
    stored syntax the peer did not accept is decoded and sent in the accepted uncompressed syntax
    (a C-GET context offering several syntaxes gets Explicit VR Little Endian), and a C-GET
    meeting one it cannot decode ends with 0xC000 "Cannot transcode". Off (the default), such an
    instance fails its sub-operation unless only the element encoding differs (implicit/explicit/
    deflated Little Endian). See :mod:`dicom_assets.devpacs.sending`.
    """

    def __init__(
        self,
        storage_dir: Path,
        ae_title: str = "DEVPACS",
        host: str = "127.0.0.1",
        port: int = 0,
        move_destinations: Mapping[str, tuple[str, int]] | None = None,
        max_find_results: int = 0,
        *,
        rescan_interval_s: float = 0.5,
        reset_above_per_minute: int = 0,
        drop_every_s: float = 0,
        window_s: float = 60.0,
        transcode_to_explicit: bool = False,
        max_retrieves_at_once: int = 0,
    ) -> None:
        if reset_above_per_minute < 0 or drop_every_s < 0:
            raise ValueError("reset_above_per_minute and drop_every_s must be >= 0 (0 = off)")
        if window_s <= 0:
            raise ValueError("window_s must be > 0")
        self.storage_dir = Path(storage_dir)
        self.ae_title = ae_title
        self.host = host
        self.port = port
        self.max_find_results = max_find_results
        self._destinations: dict[str, tuple[str, int]] = dict(move_destinations or {})
        self._index = _FolderIndex(self.storage_dir, rescan_interval_s, _parse_instance)
        self.transcode_to_explicit = bool(transcode_to_explicit)
        self.max_retrieves_at_once = int(max_retrieves_at_once)
        self._retrieving = 0
        self._refused_busy = 0
        self._policy = SendPolicy(self.transcode_to_explicit, _read_whole_file)
        self._lock = threading.Lock()
        self._served = 0
        self._served_by_kind: dict[str, int] = {}
        self._ae: _DevPacsAE | None = None
        self._server: Any = None
        # Fault injection and the request-rate counters behind it.
        self.reset_above_per_minute = int(reset_above_per_minute)
        self.drop_every_s = float(drop_every_s)
        self.window_s = float(window_s)
        self._arrivals: collections.deque[float] = collections.deque()
        self._peak = 0
        self._resets = 0
        self._drops = 0
        self._aborted = 0
        self._stop_drops = threading.Event()
        self._drop_thread: threading.Thread | None = None
        # Associations whose A-ASSOCIATE-RQ arrived (only those can be aborted), and those a reset
        # or drop caught before it did (aborted when it arrives); under _lock.
        self._requested: weakref.WeakSet[Association] = weakref.WeakSet()
        self._abort_when_requested: weakref.WeakSet[Association] = weakref.WeakSet()

    # ---- lifecycle

    def start(self) -> "DevPacs":
        """Index the folder and start serving in background threads; returns self."""
        if self._ae is not None:
            raise RuntimeError("DevPacs is already running")
        _quiet_pynetdicom()
        enable_tcp_nodelay()
        # Process-wide: send_c_store(<path>) streams the file's bytes instead of re-encoding it.
        _config.STORE_SEND_CHUNKED_DATASET = True
        self.storage_dir.mkdir(parents=True, exist_ok=True)
        catalog = self._index.catalog(force=True)
        ae = self._make_ae()
        server = ae.start_server((self.host, self.port), block=False, evt_handlers=self._handlers())
        assert server is not None
        self._ae = ae
        self._server = server
        self.port = int(server.server_address[1])
        if self.drop_every_s > 0:
            self._stop_drops.clear()
            self._drop_thread = threading.Thread(target=self._drop_loop, name="devpacs-drops", daemon=True)
            self._drop_thread.start()
        LOGGER.info(
            "DevPacs %s serving %d instances from %s on %s:%d",
            self.ae_title, len(catalog.instances), self.storage_dir, self.host, self.port,
        )  # fmt: skip
        return self

    def stop(self) -> None:
        """Stop listening and end every association (idempotent)."""
        ae, self._ae = self._ae, None
        self._stop_drops.set()
        drop_thread, self._drop_thread = self._drop_thread, None
        if drop_thread is not None:
            drop_thread.join()
        self._server = None
        if ae is not None:
            ae.shutdown()
            LOGGER.info("DevPacs %s on port %d stopped", self.ae_title, self.port)

    def __enter__(self) -> "DevPacs":
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()

    # ---- configuration and introspection

    def add_move_destination(self, ae_title: str, host: str, port: int) -> None:
        """Register (or replace) a C-MOVE destination; takes effect for the next C-MOVE."""
        with self._lock:
            self._destinations = {**self._destinations, ae_title.strip(): (host, int(port))}

    @property
    def requests_served(self) -> int:
        """Associations requested plus C-ECHO/C-FIND/C-MOVE/C-GET requests received."""
        with self._lock:
            return self._served

    def requests_by_kind(self) -> dict[str, int]:
        """The same count split by kind (``ASSOCIATION``, ``C-ECHO``, ``C-FIND``, ...)."""
        with self._lock:
            return dict(self._served_by_kind)

    @property
    def peak_requests_per_minute(self) -> int:
        """The most requests (as counted by :attr:`requests_served`) seen in any ``window_s``
        window so far, the requests that triggered a reset included."""
        with self._lock:
            return self._peak

    @property
    def resets_triggered(self) -> int:
        """Requests that arrived with more than ``reset_above_per_minute`` in the window (each
        aborted every open association)."""
        with self._lock:
            return self._resets

    @property
    def drops(self) -> int:
        """Periodic drops done by ``drop_every_s`` (each aborted every open association)."""
        with self._lock:
            return self._drops

    @property
    def associations_aborted(self) -> int:
        """Associations aborted by resets and drops."""
        with self._lock:
            return self._aborted

    def drop_all(self) -> int:
        """Abort every open association now (what a reset or a drop does); returns how many."""
        return self._abort_all()

    def rescan(self) -> int:
        """Rescan the folder now (ignoring the interval); returns the number of instances served."""
        return len(self._index.catalog(force=True).instances)

    # ---- internals

    def _make_ae(self) -> _DevPacsAE:
        ae = _DevPacsAE(ae_title=self.ae_title, policy=self._policy)
        ae.maximum_associations = 64
        ae.add_supported_context(Verification, ALL_TRANSFER_SYNTAXES)
        for model in _MODEL_LEVELS:
            ae.add_supported_context(model, ALL_TRANSFER_SYNTAXES)
        # C-GET: the requestor proposes storage contexts in which it is the SCP; accept that role.
        for cx in AllStoragePresentationContexts:
            ae.add_supported_context(cx.abstract_syntax, _STORAGE_SYNTAXES, scp_role=True, scu_role=False)
        return ae

    def _handlers(self) -> list[Any]:
        return [
            (evt.EVT_REQUESTED, self._on_association),
            (evt.EVT_C_ECHO, self._on_echo),
            (evt.EVT_C_FIND, self._on_find),
            (evt.EVT_C_MOVE, self._on_move),
            (evt.EVT_C_GET, self._on_get),
        ]

    def _request(self, kind: str, event: Event) -> bool:
        """Count one association or request; True when it went over ``reset_above_per_minute``.

        Then every open association is aborted: the others by a helper thread (a blocking abort
        waits for the association to end), the caller's own here without blocking (this is its
        thread); the handler then answers nothing more.
        """
        now = time.monotonic()
        with self._lock:
            self._served += 1
            self._served_by_kind[kind] = self._served_by_kind.get(kind, 0) + 1
            arrivals = self._arrivals
            arrivals.append(now)
            while now - arrivals[0] >= self.window_s:
                arrivals.popleft()
            in_window = len(arrivals)
            self._peak = max(self._peak, in_window)
            reset = 0 < self.reset_above_per_minute < in_window
            if reset:
                self._resets += 1
        LOGGER.debug("%s from %s", kind, event.assoc.requestor.ae_title)
        if reset:
            LOGGER.warning(
                "%d requests in %g s (limit %d): resetting every association",
                in_window, self.window_s, self.reset_above_per_minute,
            )  # fmt: skip
            threading.Thread(target=self._abort_all, args=(event.assoc,), name="devpacs-reset", daemon=True).start()
            event.assoc.abort(block=False)  # queue the A-ABORT; this thread is the association's
            with self._lock:
                self._aborted += 1
        return reset

    def _abort_all(self, spare: Association | None = None) -> int:
        """Abort every association a client opened with us (not ``spare``); returns how many.

        A connection whose A-ASSOCIATE-RQ has not arrived yet cannot take an A-ABORT (pynetdicom:
        ``InvalidEventError`` for Evt15 in Sta2, in its reactor thread): it is aborted when the
        request arrives (:meth:`_on_association`), and not counted here.
        """
        server = self._server
        if server is None:
            return 0
        now = []
        with self._lock:
            for assoc in list(server.active_associations):
                if assoc is spare or assoc.is_aborted or assoc.is_released:
                    continue
                if assoc in self._requested:
                    now.append(assoc)
                else:
                    self._abort_when_requested.add(assoc)
        aborted = 0
        for assoc in now:
            try:
                assoc.abort()
            except Exception as exc:  # noqa: BLE001 - one association that will not die stops no other
                LOGGER.debug("abort of an association failed: %s", exc)
                continue
            aborted += 1
        with self._lock:
            self._aborted += aborted
        return aborted

    def _drop_loop(self) -> None:
        while not self._stop_drops.wait(self.drop_every_s):
            with self._lock:
                self._drops += 1
            n = self._abort_all()
            LOGGER.warning("periodic drop: aborted %d association(s)", n)

    def _destination(self, ae_title: str | None) -> tuple[str, int] | None:
        with self._lock:
            return self._destinations.get((ae_title or "").strip())

    def _on_association(self, event: Event) -> None:
        # An abort here (a reset, or a drop that came before the request) means pynetdicom never
        # accepts the association.
        assoc = event.assoc
        _nothing_after_abort(assoc)  # before anything can abort it
        with self._lock:
            self._requested.add(assoc)
            dropped = assoc in self._abort_when_requested
        if self._request("ASSOCIATION", event) or not dropped:
            return
        LOGGER.debug(
            "association from %s:%s aborted: a drop came before its request", assoc.requestor.address, assoc.requestor.port
        )
        assoc.abort(block=False)  # this thread is the association's
        with self._lock:
            self._aborted += 1

    def _on_echo(self, event: Event) -> int:
        if self._request("C-ECHO", event):
            return 0xC000  # never sent: the association is aborted
        return 0x0000

    def _on_find(self, event: Event) -> Iterator[tuple[int, Dataset | None]]:
        if self._request("C-FIND", event):
            return
        try:
            query = _Query.parse(event.identifier, event.context.abstract_syntax)
        except QueryError as exc:
            LOGGER.warning("C-FIND refused: %s", exc)
            yield exc.status, None
            return
        catalog = self._index.catalog()
        matches = query.matches(catalog)
        if self.max_find_results > 0:
            matches = matches[: self.max_find_results]
        for group in matches:
            if event.is_cancelled:
                yield CANCELLED, None
                return
            yield PENDING, query.response(catalog, group, self.ae_title)

    def _on_move(self, event: Event) -> Iterator[Any]:
        if self._request("C-MOVE", event):
            yield None, None  # pynetdicom sees the association is gone and stops here
            return
        destination = self._destination(event.move_destination)
        if destination is None:
            LOGGER.warning("C-MOVE to unknown destination %r refused", event.move_destination)
            yield None, None
            return
        try:
            instances = self._retrieve_set(event)
        except QueryError as exc:
            LOGGER.warning("C-MOVE refused: %s", exc)
            # pynetdicom only sends a failure status after associating with the destination;
            # propose what we serve, which a storage SCP accepts, then fail the one sub-operation.
            yield (*destination, {"contexts": _move_contexts(self._index.catalog().instances, self.transcode_to_explicit)})
            yield 1
            yield exc.status, None
            return
        yield (*destination, {"contexts": _move_contexts(instances, self.transcode_to_explicit)})
        if not self._begin_retrieve():
            yield from _refused_busy()
            return
        try:
            yield len(instances)
            yield from self._sub_operations(event, instances)
        finally:
            self._end_retrieve()

    def _on_get(self, event: Event) -> Iterator[Any]:
        if self._request("C-GET", event):
            yield 0  # no sub-operations; the response goes nowhere, the association is gone
            return
        _send_files_as_stored(event.assoc, self._policy)
        try:
            instances = self._retrieve_set(event)
        except QueryError as exc:
            LOGGER.warning("C-GET refused: %s", exc)
            yield 1
            yield exc.status, None
            return
        if not self._begin_retrieve():
            yield from _refused_busy()
            return
        try:
            yield len(instances)
            if self.transcode_to_explicit:
                yield from self._get_sub_operations_like_orthanc(event, instances)
            else:
                yield from self._sub_operations(event, instances)
        finally:
            self._end_retrieve()

    def _begin_retrieve(self) -> bool:
        """Count a C-MOVE/C-GET in progress; False (answer A702) when ``max_retrieves_at_once``
        are already running, as a PACS that limits its retrieves answers."""
        with self._lock:
            if self.max_retrieves_at_once and self._retrieving >= self.max_retrieves_at_once:
                self._refused_busy += 1
                return False
            self._retrieving += 1
            return True

    def _end_retrieve(self) -> None:
        with self._lock:
            self._retrieving -= 1

    @property
    def refused_busy(self) -> int:
        """C-MOVE/C-GETs answered A702 because ``max_retrieves_at_once`` were running."""
        with self._lock:
            return self._refused_busy

    def _retrieve_set(self, event: Event) -> list[_Instance]:
        query = _Query.parse(event.identifier, event.context.abstract_syntax)
        return query.instances(self._index.catalog())

    @staticmethod
    def _sub_operations(event: Event, instances: Sequence[_Instance]) -> Iterator[tuple[int, Dataset | None]]:
        """One Pending per instance (pynetdicom sends it and reports the counts), or Cancel."""
        for instance in instances:
            if event.is_cancelled:
                yield CANCELLED, None
                return
            yield PENDING, _StoredFile(instance)

    def _get_sub_operations_like_orthanc(
        self, event: Event, instances: Sequence[_Instance]
    ) -> Iterator[tuple[int | Dataset, Dataset | None]]:
        """C-GET sub-operations of a transcoding PACS: what to send is decided before each one,
        and the first instance that cannot be sent ends the C-GET with 0xC000, no C-STORE for it
        or for the rest (Orthanc 1.10's behaviour; pynetdicom counts them all as failed)."""
        for position, instance in enumerate(instances):
            if event.is_cancelled:
                yield CANCELLED, None
                return
            item = _StoredFile(instance)
            try:
                item.prepare(self._policy.outgoing(event.assoc, instance))
            except CannotSend as exc:
                LOGGER.warning("C-GET ends: %s", exc)
                yield _unable_to_process(exc.short), _failed_list(instances[position:])
                return
            yield PENDING, item


#: Refused: Out of Resources - Unable to perform sub-operations (PS3.4 C.4.2.1.5).
OUT_OF_RESOURCES_SUB_OPERATIONS = 0xA702


def _refused_busy() -> Iterator[Any]:
    """A C-MOVE/C-GET handler's answer "out of resources": one failed sub-operation, 0xA702."""
    yield 1
    yield OUT_OF_RESOURCES_SUB_OPERATIONS, None


def _unable_to_process(comment: str) -> Dataset:
    status = Dataset()
    status.Status = UNABLE_TO_PROCESS
    status.ErrorComment = comment
    return status


def _failed_list(instances: Sequence[_Instance]) -> Dataset:
    identifier = Dataset()
    identifier.FailedSOPInstanceUIDList = [instance.ids[3] for instance in instances]
    return identifier


def serve_forever(
    storage_dir: Path,
    port: int,
    ae_title: str = "DEVPACS",
    host: str = "127.0.0.1",
    move_destinations: Mapping[str, tuple[str, int]] | None = None,
    reset_above_per_minute: int = 0,
    drop_every_s: float = 0,
    window_s: float = 60.0,
    transcode_to_explicit: bool = False,
) -> None:
    """Serve ``storage_dir`` until SIGINT or SIGTERM (the ``dicom-assets pacs serve`` command);
    the fault-injection and transcoding arguments are :class:`DevPacs`'s."""
    stop = threading.Event()
    previous: dict[int, Any] = {}
    if threading.current_thread() is threading.main_thread():

        def _on_signal(signum: int, frame: FrameType | None) -> None:
            LOGGER.info("received signal %d, stopping", signum)
            stop.set()

        for signum in (signal.SIGINT, signal.SIGTERM):
            previous[signum] = signal.signal(signum, _on_signal)
    try:
        with DevPacs(
            storage_dir, ae_title=ae_title, host=host, port=port, move_destinations=move_destinations,
            reset_above_per_minute=reset_above_per_minute, drop_every_s=drop_every_s, window_s=window_s,
            transcode_to_explicit=transcode_to_explicit,
        ):  # fmt: skip
            try:
                stop.wait()
            except KeyboardInterrupt:
                pass
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
