"""Retrieval: bring every not-yet-complete series of some patients to local disk.

Workers (``pacs.max_concurrent_associations`` threads, each with its own association) claim
series one at a time in the state DB, so concurrent runs never fetch the same series and a
claim left by a crashed process expires. A series is ``complete`` only when the retrieve's final
status is success with no failed sub-operation AND every expected instance is on disk;
otherwise it is ``incomplete`` (something is missing) or ``failed`` (the request failed), with
the reason and the attempt count recorded.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from dicom_assets.config import Settings
from dicom_assets.layout import instances_on_disk, series_dir
from dicom_assets.pacs.client import MoveDestinationUnknown, PacsClient, PacsError, PacsSession, RetrieveStatus
from dicom_assets.pacs.receiver import InFlightRetrieve, InstanceSink, StorageReceiver
from dicom_assets.store import SeriesState, StateStore

log = logging.getLogger("dicom_assets.retrieval")

CLAIM_LEASE_S = 600.0


@dataclass(frozen=True)
class SeriesOutcome:
    series_instance_uid: str
    status: str
    instances: int
    bytes_on_disk: int
    bytes_received: int
    seconds: float
    error: str | None = None


@dataclass
class RetrievalStats:
    outcomes: list[SeriesOutcome] = field(default_factory=list)
    seconds: float = 0.0
    requests: int = 0

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
            "seconds": round(self.seconds, 3),
            "mb_per_s": round(mb / self.seconds, 3) if self.seconds > 0 else 0.0,
        }


def worker_name() -> str:
    """``host:pid:thread``: lets a later run on the same host see that a claimer has died."""
    return f"{socket.gethostname()}:{os.getpid()}:{threading.get_ident()}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def release_dead_claims(store: StateStore) -> int:
    """Release claims whose holder is dead: expired leases, and dead processes on this host.

    A process killed with ``kill -9`` cannot release its claims; waiting for the lease to
    expire would stall the next run for minutes, so claims of this host's dead PIDs go at once.
    """
    host = socket.gethostname()
    dead = []
    for holder in store.claim_holders():
        parts = holder.rsplit(":", 2)
        if len(parts) == 3 and parts[0] == host and parts[1].isdigit() and not _pid_alive(int(parts[1])):
            dead.append(holder)
    return store.release_expired_claims() + store.release_claims_of(dead)


class SeriesRetriever:
    """Retrieves claimed series with one PACS session; the receiving side depends on the method."""

    def __init__(self, settings: Settings, client: PacsClient, sink: InstanceSink, session: PacsSession) -> None:
        self.settings = settings
        self.client = client
        self.sink = sink
        self.session = session
        self.download_dir = settings.paths.download_dir

    def retrieve(self, series: SeriesState) -> tuple[SeriesOutcome, int | None]:
        """One attempt at one series; returns the outcome and the expected count it learned."""
        started = time.monotonic()
        directory = series_dir(self.download_dir, series.patient_id, series.study_instance_uid, series.series_instance_uid)
        on_disk = instances_on_disk(directory)
        expected = series.expected_instances
        missing: list[str] | None = None
        flight: InFlightRetrieve | None = None
        try:
            if expected is None or 0 < len(on_disk) < expected:
                uids = self.session.find_instance_uids(series.study_instance_uid, series.series_instance_uid)
                expected = len(uids)
                missing = [u for u in uids if u not in on_disk]
                if on_disk and not missing:
                    return self._outcome(series, directory, started, "complete", None), expected
            elif len(on_disk) >= expected:
                return self._outcome(series, directory, started, "complete", None), expected
            flight = self.sink.expect(series.patient_id, series.study_instance_uid, series.series_instance_uid)
            final = self._send(series, missing if on_disk else None)
            before = len(on_disk)
            flight.wait_for_stragglers(
                lambda: before + flight.received >= (expected or 0) and bool(expected),
                self.settings.pacs.straggler_timeout_s,
            )
            status, error = self._judge(final, directory, expected, flight)
            return self._outcome(series, directory, started, status, error, flight.bytes), expected
        except MoveDestinationUnknown:
            raise
        except PacsError as exc:
            return self._outcome(series, directory, started, "failed", str(exc), flight.bytes if flight else 0), expected
        finally:
            if flight is not None:
                self.sink.done(flight)

    def _send(self, series: SeriesState, sop_uids: list[str] | None) -> RetrieveStatus:
        if self.settings.pacs.retrieve_method == "c-get":
            return self.session.get(series.study_instance_uid, series.series_instance_uid, sop_uids)
        return self.session.move(
            series.study_instance_uid, series.series_instance_uid, self.settings.receiver.ae_title, sop_uids
        )

    @staticmethod
    def _judge(final: RetrieveStatus, directory: Path, expected: int | None, flight: InFlightRetrieve) -> tuple[str, str | None]:
        have = len(instances_on_disk(directory))
        if flight.last_error:
            return "incomplete", flight.last_error
        if not final.succeeded:
            return "incomplete", f"retrieve ended with {final.describe()}; {have} of {expected} instances on disk"
        if expected is not None and have < expected:
            return "incomplete", f"retrieve reported success but only {have} of {expected} instances are on disk"
        return "complete", None

    @staticmethod
    def _outcome(series: SeriesState, directory: Path, started: float, status: str, error: str | None, received: int = 0) -> SeriesOutcome:
        files = instances_on_disk(directory)
        return SeriesOutcome(
            series_instance_uid=series.series_instance_uid,
            status=status,
            instances=len(files),
            bytes_on_disk=sum(files.values()),
            bytes_received=received,
            seconds=time.monotonic() - started,
            error=error,
        )


def retrieve_patients(
    settings: Settings,
    client: PacsClient,
    store: StateStore,
    patient_ids: Sequence[str],
    on_outcome: Callable[[SeriesOutcome], None] | None = None,
) -> RetrievalStats:
    """Retrieve every retrievable series of these patients with up to N concurrent associations."""
    started = time.monotonic()
    stats = RetrievalStats()
    lock = threading.Lock()
    attempted: set[str] = set()  # one attempt per series per run: a failing series never loops
    receiver: StorageReceiver | None = None
    if settings.pacs.retrieve_method == "c-move":
        r = settings.receiver
        receiver = StorageReceiver(r.ae_title, r.bind_address, r.port, settings.paths.download_dir).start()
    try:

        def work() -> None:
            me = worker_name()
            sink = receiver.sink if receiver else InstanceSink(settings.paths.download_dir)
            on_store = None if receiver else sink.handle_store
            with client.session(on_store=on_store) as session:
                retriever = SeriesRetriever(settings, client, sink, session)
                while True:
                    with lock:
                        exclude = frozenset(attempted)
                    series = store.claim_next_series(patient_ids, me, CLAIM_LEASE_S, exclude=exclude)
                    if series is None:
                        break
                    with lock:
                        attempted.add(series.series_instance_uid)
                    try:
                        outcome, expected = retriever.retrieve(series)
                    except MoveDestinationUnknown as exc:
                        store.finish_series(series.series_instance_uid, me, "failed", 0, 0, error=str(exc))
                        raise
                    _record(store, series, me, outcome, expected)
                    with lock:
                        stats.outcomes.append(outcome)
                    if on_outcome:
                        on_outcome(outcome)
                with lock:
                    stats.requests += session.requests

        workers = settings.pacs.max_concurrent_associations
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="retrieve") as pool:
            for future in [pool.submit(work) for _ in range(workers)]:
                future.result()
    finally:
        if receiver is not None:
            receiver.stop()
    stats.seconds = time.monotonic() - started
    return stats


def _record(store: StateStore, series: SeriesState, worker: str, outcome: SeriesOutcome, expected: int | None) -> None:
    if outcome.status != "complete":
        log.warning("series %s %s: %s", series.series_instance_uid, outcome.status, outcome.error)
    store.finish_series(
        series.series_instance_uid,
        worker,
        outcome.status,  # type: ignore[arg-type]
        downloaded_instances=outcome.instances,
        downloaded_bytes=outcome.bytes_on_disk,
        error=outcome.error,
        expected_instances=expected,
    )
