"""Retrieval: bring every not-yet-complete series of some patients to local disk.

Workers (up to ``pacs.max_concurrent_associations`` threads, each with its own association,
as many at once as the adaptive count allows, :mod:`dicom_assets.pacs.concurrency`) claim
series one at a time in the state DB, so concurrent runs never fetch the same series and a
claim left by a crashed process expires. A series is ``complete`` only when the retrieve's final
status is success with no failed sub-operation AND every expected instance is on disk;
otherwise it is ``incomplete`` (something is missing) or ``failed`` (given up), with the reason
recorded. A Warning final (B000) counts as success only when every expected instance is on disk.

Attempts measure the series, not the network. A worker keeps at a claimed series while it
makes progress:

* an attempt that brought new instances to disk is progress: it uses up no attempt, resets the
  backoff and the series is tried again at once (only its missing instances);
* an attempt that brought nothing and broke on the connection (reset, refused, timeout, abort)
  is an outage: it is waited out with a capped backoff for as long as ``pacs.wait_for_pacs_s``
  allows since the PACS last made progress (:class:`~dicom_assets.pacs.faults.OutageClock`),
  then the run stops with :class:`~dicom_assets.pacs.errors.PacsUnreachable`, no attempt used;
* an attempt that brought nothing and ended in an answer of the PACS (A7xx/C0xx, a failed or
  partial retrieve) is counted in ``series.attempts``; A7xx/C0xx are retried after a backoff
  (every worker holds back), and after ``pacs.max_attempts`` such attempts the series is
  ``failed`` ("gave up ...") and no longer claimed (``dicom-assets retry --failed``).

A stop request (SIGTERM/SIGINT, :mod:`dicom_assets.stopping`) ends the workers at once: the
series in hand goes back unclaimed and uncounted, its partial instance files removed. A full or
read-only download directory stops the run with an error naming the path.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import queue
import socket
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from dicom_assets import stopping
from dicom_assets.config import Settings
from dicom_assets.dicomweb.http import DicomwebAuthError
from dicom_assets.dicomweb.retrieve import WadoSeriesRetriever
from dicom_assets.layout import pid_alive
from dicom_assets.pacs.adaptive_concurrency import ConcurrencyPolicy
from dicom_assets.pacs.client import PacsClient, PacsSession
from dicom_assets.pacs.concurrency import ConcurrencyReport, RetrieveGate
from dicom_assets.pacs.errors import MoveDestinationUnknown, PacsUnreachable
from dicom_assets.pacs.faults import Backoff
from dicom_assets.series_attempt import SeriesOutcome, SeriesRetriever
from dicom_assets.pacs.receiver import DISK_ERRNOS, InstanceSink, StorageReceiver
from dicom_assets.store import SeriesState, StateStore

log = logging.getLogger("dicom_assets.retrieval")

CLAIM_LEASE_S = 600.0
#: Patients per claim query. A run's patients go to the state DB with every claim; for 20,000
#: (one run over a whole cohort) that cost ~6 ms of the claim's 8-11 ms (the ID list parsed
#: and searched as an index condition), for 500 well under 1 ms. Production runs hold 200.
CLAIM_BLOCK = 500


class DownloadDirError(RuntimeError):
    """The download directory cannot take files (full, read-only, permission denied): run stops."""


@dataclass
class RetrievalStats:
    outcomes: list[SeriesOutcome] = field(default_factory=list)
    seconds: float = 0.0
    requests: int = 0
    connection_faults: int = 0  # connection faults seen by the run's workers (resets, refusals, timeouts)
    concurrency: ConcurrencyReport | None = None  # the count of concurrent retrieves reached

    def count(self, status: str) -> int:
        return sum(1 for o in self.outcomes if o.status == status)

    @property
    def bytes_received(self) -> int:
        return sum(o.bytes_received for o in self.outcomes)

    @property
    def instances(self) -> int:
        return sum(o.instances for o in self.outcomes)

    @property
    def bytes_on_disk(self) -> int:
        return sum(o.bytes_on_disk for o in self.outcomes)

    def metadata(self) -> dict[str, float | int]:
        mb = self.bytes_received / 1e6
        return {
            "series_attempted": len(self.outcomes),
            "series_complete": self.count("complete"),
            "series_incomplete": self.count("incomplete"),
            "series_failed": self.count("failed"),
            "instances_on_disk": self.instances,
            "bytes_received": self.bytes_received,
            "bytes_on_disk": self.bytes_on_disk,
            "pacs_requests": self.requests,
            "connection_faults": self.connection_faults,
            "seconds": round(self.seconds, 3),
            "mb_per_s": round(mb / self.seconds, 3) if self.seconds > 0 else 0.0,
            **({} if self.concurrency is None else {
                "concurrent_retrieves_final": self.concurrency.final,
                "concurrent_retrieves_peak": self.concurrency.peak,
                "concurrent_retrieves_cuts": self.concurrency.cuts,
            }),  # fmt: skip
        }


def worker_name() -> str:
    """``host:pid:thread``: lets a later run on the same host see that a claimer has died."""
    return f"{socket.gethostname()}:{os.getpid()}:{threading.get_ident()}"


def release_dead_claims(store: StateStore) -> int:
    """Release claims whose holder is dead: expired leases, and dead processes on this host.

    A process killed with ``kill -9`` cannot release its claims; waiting for the lease to
    expire would stall the next run for minutes, so claims of this host's dead PIDs go at once.
    """
    host = socket.gethostname()
    dead = []
    for holder in store.claim_holders():
        parts = holder.rsplit(":", 2)
        if len(parts) == 3 and parts[0] == host and parts[1].isdigit() and not pid_alive(int(parts[1])):
            dead.append(holder)
    return store.release_expired_claims() + store.release_claims_of(dead)


class RunClaims:
    """The claims of one retrieval run, shared by its workers (thread-safe).

    A run claims each series at most once (going again after progress, a connection fault or
    an A7xx/C0xx answer happens inside :func:`_settle`), so a series that ended incomplete is
    not retried in a loop:
    the state DB records the run in the claimed row (``series.claimed_in_run``) and the claim
    skips rows of this run, one indexed comparison however many series the run has tried.
    Claims go in patient order and resume at the patient of the previous claim, so a claim does
    not re-read the run's earlier failures; only when nothing is left from there on does it look
    again from the first patient (a series behind may have become claimable: an expired claim).
    A run of more than :data:`CLAIM_BLOCK` patients claims block by block (in the order given),
    the same way inside each block, and looks at every block before it says nothing is left.
    """

    def __init__(self, store: StateStore, patient_ids: Sequence[str], max_attempts: int) -> None:
        self.store = store
        self.patient_ids = list(dict.fromkeys(patient_ids))
        self.max_attempts = max_attempts
        self.run_id = uuid.uuid4().hex
        self._blocks = [self.patient_ids[i : i + CLAIM_BLOCK] for i in range(0, len(self.patient_ids), CLAIM_BLOCK)] or [[]]
        self._block = 0
        self._resume_at: str | None = None
        self._lock = threading.Lock()

    def next(self, worker: str) -> SeriesState | None:
        """Claim the next series for ``worker``, or None when the run has nothing left."""
        with self._lock:
            series = self._claim(worker, self._blocks[self._block], self._resume_at)
            if series is None:
                series = self._next_block(worker, again_from_start=self._resume_at is not None)
            if series is not None:
                self._resume_at = series.patient_id
            return series

    def _next_block(self, worker: str, again_from_start: bool) -> SeriesState | None:
        """The following blocks from their start, then this one again from its start."""
        n = len(self._blocks)
        for step in range(1, n + 1 if again_from_start else n):
            index = (self._block + step) % n
            series = self._claim(worker, self._blocks[index], None)
            if series is not None:
                self._block = index
                return series
        return None

    def _claim(self, worker: str, patient_ids: list[str], from_patient: str | None) -> SeriesState | None:
        return self.store.claim_next_series(
            patient_ids, worker, CLAIM_LEASE_S, run_id=self.run_id, max_attempts=self.max_attempts,
            from_patient=from_patient,
        )  # fmt: skip


class OutcomeWriter:
    """Writes what complete series brought (instance rows, status) to the state DB on a thread
    of its own, so the worker's next retrieve does not wait for it.

    With one association every series waited ~10 ms for these writes before its C-MOVE went out,
    time in which the PACS sent nothing; a complete series needs nothing from them to go on
    (the claim stays held until the write releases it, so no other worker takes the series).
    Outcomes that are not complete are written by the worker itself: what it does next depends
    on them. :meth:`close` waits for every write before the run returns and raises the first
    that failed; a worker meeting a failed write raises it at its next series. A process killed
    before a write leaves the series claimed with its files on disk; the next run completes it
    from the disk, without a retrieve.
    """

    def __init__(self) -> None:
        self._queue: queue.SimpleQueue[Callable[[], object] | None] = queue.SimpleQueue()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="outcome-writer", daemon=True)
        self._thread.start()

    def submit(self, write: Callable[[], object]) -> None:
        self.check()
        self._queue.put(write)

    def check(self) -> None:
        """Raise the first write that failed (the state DB went away, say)."""
        if self._error is not None:
            raise RuntimeError(f"recording a complete series in the state DB failed: {self._error}") from self._error

    def close(self, raise_failure: bool = True) -> None:
        """Wait for the writes submitted so far; then raise the first that failed (unless the
        run is already ending with an error of its own, which it must not hide)."""
        self._queue.put(None)
        self._thread.join()
        if raise_failure:
            self.check()

    def _run(self) -> None:
        while (write := self._queue.get()) is not None:
            if self._error is not None:
                continue  # after a failure nothing more is written: the run ends with it
            try:
                write()
            except BaseException as exc:  # noqa: BLE001 - handed to the workers and the run
                self._error = exc
                log.error("recording a complete series failed: %s", exc)


def retrieve_gate(settings: Settings, client: PacsClient, store: StateStore) -> RetrieveGate:
    """The gate of this retrieval's workers: adaptive between 1 and the ceiling
    (``pacs.max_concurrent_associations``), shared through the state DB under the budget's key
    of the PACS, or fixed at the ceiling with ``pacs.adaptive_concurrency: false``."""
    p = settings.pacs
    policy = ConcurrencyPolicy(ceiling=p.max_concurrent_associations, start=p.start_concurrent_associations)
    return RetrieveGate(policy, p.adaptive_concurrency, store, getattr(client.budget, "pacs_key", None),
                        faults=lambda: client.outage.faults + getattr(client.budget, "resets_noted", 0),
                        association_open_s=lambda: getattr(client, "association_open_s", None))


def check_download_dir(download_dir: Path) -> None:
    """Fail early, naming the path, when the download directory cannot take a file."""
    probe = download_dir / f".write-test.{uuid.uuid4().hex[:12]}"
    try:
        download_dir.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"x")
        probe.unlink()
    except OSError as exc:
        raise DownloadDirError(
            f"paths.download_dir {download_dir} cannot take files: {exc.strerror or exc} "
            f"(check free space, permissions and that it is a directory)"
        ) from exc


def retrieve_patients(
    settings: Settings,
    client: PacsClient,
    store: StateStore,
    patient_ids: Sequence[str],
    on_outcome: Callable[[SeriesOutcome], None] | None = None,
) -> RetrievalStats:
    """Retrieve every retrievable series of these patients with up to N concurrent associations.

    Raises :class:`~dicom_assets.pacs.errors.PacsUnreachable` when the PACS made no progress for
    ``pacs.wait_for_pacs_s`` (no series attempt burned), :class:`DownloadDirError` when the
    download directory cannot take files, MoveDestinationUnknown (A801), and
    :class:`~dicom_assets.stopping.Stopped` on a stop request. An interrupt in the calling
    thread (Ctrl-C, Dagster terminating the run) is turned into a stop request, so the workers
    end within seconds instead of finishing their series.
    """
    started = time.monotonic()
    stats = RetrievalStats()
    max_attempts = settings.pacs.max_attempts
    if not store.has_claimable_series(patient_ids, max_attempts):  # an idle run sends no request
        return stats
    check_download_dir(settings.paths.download_dir)
    lock = threading.Lock()
    stop = threading.Event()  # one worker hit a fatal error: the others claim nothing more
    claims = RunClaims(store, patient_ids, max_attempts)
    receiver: StorageReceiver | None = None
    dicomweb = settings.pacs.protocol == "dicomweb"  # WADO-RS writes the files itself: no storage SCP
    if settings.pacs.retrieve_method == "c-move" and not dicomweb:
        receiver = StorageReceiver.from_settings(settings).start()
    faults_before = client.outage.faults
    gate = retrieve_gate(settings, client, store).start()
    writer = OutcomeWriter()

    def work(index: int) -> None:
        me = worker_name()
        try:
            while gate.enter(index, me):
                try:
                    if not serve(index, me):
                        break
                finally:
                    gate.leave(me)
        except BaseException:
            stop.set()
            gate.finish()
            raise

    def serve(index: int, me: str) -> bool:
        """Retrieve with one association until the gate takes this worker's turn away (True:
        wait for it again) or nothing is left (False)."""
        sink = None if dicomweb else receiver.sink if receiver else InstanceSink(settings.paths.download_dir)
        with client.session(sink=None if receiver else sink) as session:
            retriever: SeriesRetriever | WadoSeriesRetriever
            if dicomweb:
                retriever = WadoSeriesRetriever(settings, client, session)  # type: ignore[arg-type]
            else:
                retriever = SeriesRetriever(settings, client, sink, session, store.known_sop_classes)  # type: ignore[arg-type]
            try:
                while not stop.is_set():
                    stopping.PROCESS.check()
                    if not session.connected:
                        session.wait_until_reachable()  # an outage burns no attempts
                    series = claims.next(me)
                    if series is None:
                        gate.finish()
                        return False
                    outcome = _settle(settings, client, store, session, retriever, series, me, gate, writer)
                    gate.series_ended(outcome.new_instances, outcome.seconds)
                    with lock:
                        stats.outcomes.append(outcome)
                    if on_outcome:
                        on_outcome(outcome)
                    if outcome.storage_errno in DISK_ERRNOS:
                        raise DownloadDirError(f"stopping: {outcome.error}")
                    if not gate.keeps(index):
                        return True
                return False
            finally:
                with lock:
                    stats.requests += session.requests

    workers = settings.pacs.max_concurrent_associations
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="retrieve")
    failed = False
    try:
        for future in [pool.submit(work, i) for i in range(workers)]:
            future.result()
    except BaseException as exc:
        failed = True
        stop.set()
        gate.finish()
        if not isinstance(exc, Exception):  # KeyboardInterrupt, Dagster's interrupt: stop the workers now
            stopping.PROCESS.request(f"interrupted ({type(exc).__name__})")
        raise
    finally:
        pool.shutdown(wait=True)  # quick: the workers saw the stop or the error
        stats.concurrency = gate.stop()
        if receiver is not None:
            receiver.stop()
        stats.connection_faults = client.outage.faults - faults_before
        try:
            writer.close(raise_failure=not failed)  # every complete series recorded before the run says so
        finally:
            stats.seconds = time.monotonic() - started
    return stats


def _settle(
    settings: Settings,
    client: PacsClient,
    store: StateStore,
    session: PacsSession,
    retriever: SeriesRetriever,
    series: SeriesState,
    worker: str,
    gate: RetrieveGate | None = None,
    writer: OutcomeWriter | None = None,
) -> SeriesOutcome:
    """Attempt a claimed series until it is complete, given up, or left to the next run.

    After each attempt the outcome is recorded (:func:`_record`; a complete one by ``writer``,
    when given) and the claim released; to go
    again the series is claimed again (another worker or run may have it by then). The outcome
    returned sums what every attempt received.
    """
    backoff = client.backoff()
    current = series
    received = new = 0
    spent = 0.0
    try:
        while True:
            try:
                outcome, expected = retriever.retrieve(current)
            except MoveDestinationUnknown as exc:
                store.finish_series(current.series_instance_uid, worker, "failed", 0, 0, error=str(exc))
                raise
            received, new, spent = received + outcome.bytes_received, new + outcome.new_instances, spent + outcome.seconds
            if outcome.progressed or outcome.answered:
                client.outage.progress()
            if writer is not None:
                writer.check()
            outcome = _record(store, current, worker, outcome, expected, settings.pacs.max_attempts, writer)
            delay = _next_try(client, outcome, backoff)
            if delay is None:
                return dataclasses.replace(outcome, bytes_received=received, new_instances=new, seconds=spent)
            if outcome.fault == "busy":
                client.gate.hold(delay)  # every worker holds back, not only this one
                if gate is not None:
                    gate.refused()  # and fewer retrieve at once (pacs.adaptive_concurrency)
            else:
                client.sleep(delay)
            client.gate.wait()
            if not session.connected:
                session.wait_until_reachable()
            again = store.claim_next_series(
                [series.patient_id], worker, CLAIM_LEASE_S, only=[series.series_instance_uid],
                max_attempts=settings.pacs.max_attempts,
            )  # fmt: skip
            if again is None:  # another worker or run has it now
                return dataclasses.replace(outcome, bytes_received=received, new_instances=new, seconds=spent)
            current = again
    except (stopping.Stopped, PacsUnreachable, DicomwebAuthError) as exc:
        why = "stopped" if isinstance(exc, stopping.Stopped) else "the PACS refused our credentials" \
            if isinstance(exc, DicomwebAuthError) else "the PACS made no progress"  # fmt: skip
        if store.release_claim(series.series_instance_uid, worker, f"{why} during its retrieval; resumes next run"):
            log.info("series %s released untouched (%s)", series.series_instance_uid, why)
        raise


def _next_try(client: PacsClient, outcome: SeriesOutcome, backoff: Backoff) -> float | None:
    """Seconds to wait before this run tries the series again, or None to leave it.

    Progress: again at once. A connection fault: a backoff delay within the outage's budget
    (:class:`PacsUnreachable` once it is spent). A7xx/C0xx: a backoff delay (the attempt was
    counted). Anything else (complete, given up, a PACS answer, a local write error): leave it.
    """
    if outcome.status == "complete" or outcome.given_up or outcome.fault == "storage":
        return None
    if outcome.progressed:
        backoff.reset()
        return 0.0
    if outcome.fault == "network":
        client.outage.fault()
        remaining = client.outage.remaining()
        if remaining <= 0:
            raise PacsUnreachable(
                f"{client.describe()} made no progress for {client.settings.wait_for_pacs_s:g} s "
                f"(pacs.wait_for_pacs_s): {outcome.error}; no attempt was used, run again when the PACS is back"
            )
        return min(backoff.next(), remaining)
    if outcome.fault == "busy":
        return backoff.next()
    return None  # the PACS answered and something is missing: the next run asks again


def _record(
    store: StateStore, series: SeriesState, worker: str, outcome: SeriesOutcome, expected: int | None, max_attempts: int,
    writer: OutcomeWriter | None = None,
) -> SeriesOutcome:
    """Write an attempt's outcome to the state DB, counting it only when it made no progress.

    Counted (``series.attempts``): nothing new arrived and the PACS's answer is why ("busy",
    "pacs"). A connection fault without progress counts in ``network_faults`` instead, and a
    local write error in neither. At ``pacs.max_attempts`` counted attempts the series is given up.
    A complete outcome is written by ``writer`` when one is given, the others at once.
    """
    stalled = outcome.status != "complete" and not outcome.progressed
    counted = stalled and outcome.fault in ("busy", "pacs")
    attempts = series.attempts + (1 if counted else 0)
    if counted and attempts >= max_attempts:
        outcome = dataclasses.replace(
            outcome,
            status="failed",
            given_up=True,
            error=(
                f"gave up after {attempts} attempts that brought nothing new (pacs.max_attempts={max_attempts}): "
                f"{outcome.error}; `dicom-assets retry --failed` tries again"
            ),
        )
    elif outcome.status == "failed" and outcome.fault != "storage":
        outcome = dataclasses.replace(outcome, status="incomplete")  # failed: given up, or cannot be stored
    outcome = dataclasses.replace(outcome, attempts=attempts)
    if outcome.status != "complete":
        log.warning(
            "series %s %s (%s, %d new instance(s), %d attempt(s) counted): %s",
            series.series_instance_uid, outcome.status, outcome.fault, outcome.new_instances, attempts, outcome.error,
        )  # fmt: skip
    write = functools.partial(_write_outcome, store, series.series_instance_uid, worker, outcome, expected, counted,
                              stalled and outcome.fault == "network")  # fmt: skip
    if writer is not None and outcome.status == "complete":
        writer.submit(write)
    else:
        write()
    return outcome


def _write_outcome(
    store: StateStore, series_uid: str, worker: str, outcome: SeriesOutcome, expected: int | None, counted: bool, network_fault: bool
) -> None:
    if outcome.arrived:  # each instance's syntax as received (and as stored, where the PACS said)
        store.record_instances(series_uid, outcome.arrived, outcome.stored_syntaxes)
    store.finish_series(
        series_uid,
        worker,
        outcome.status,  # type: ignore[arg-type]
        downloaded_instances=outcome.instances,
        downloaded_bytes=outcome.bytes_on_disk,
        error=outcome.error,
        expected_instances=expected,
        count_attempt=counted,
        network_fault=network_fault,
    )
