"""One attempt at one series: what the PACS is asked, what arrived, and the verdict.

:class:`SeriesRetriever` makes one attempt at a claimed series with one PACS session: it
lists what is missing (IMAGE-level C-FIND when the series is partial, its count unknown, or the
method is C-GET and its SOP classes unknown), asks for it (C-MOVE to our storage SCP, or C-GET over the session's
association), waits for stragglers and judges the result from what is on disk
(:class:`SeriesOutcome`). The run around it (claims, workers, retries, the state DB) is
:mod:`dicom_assets.retrieval`.

C-GET proposes one presentation context per (SOP class, transfer syntax) for the classes the
IMAGE-level answer names (or, for a whole series of known count, the classes the state DB
already knows: no C-FIND), so the PACS sends every instance as it stores it
(:mod:`dicom_assets.pacs.contexts`); classes that need more than one association's 128
contexts are fetched by several C-GETs. Each instance's syntax as received is returned for the
state DB; an instance the PACS says it stores lossless but sent lossy is removed and the series
is not complete (:mod:`dicom_assets.pacs.syntaxes`).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from dicom_assets import stopping
from dicom_assets.config import Settings
from dicom_assets.layout import instance_file, instances_on_disk, remove_stale_temps, series_dir
from dicom_assets.pacs.client import InstanceInfo, PacsClient, PacsSession, RetrieveStatus
from dicom_assets.pacs.contexts import series_get_plan
from dicom_assets.pacs.syntaxes import transcodings
from dicom_assets.pacs.errors import (
    MoveDestinationUnknown,
    PacsError,
    PacsRequestFailed,
    is_connection_fault,
    is_transient,
    transient_status,
)
from dicom_assets.pacs.receiver import DISK_ERRNOS, InFlightRetrieve, InstanceSink
from dicom_assets.store import SeriesState

log = logging.getLogger("dicom_assets.retrieval")


@dataclass(frozen=True)
class SeriesOutcome:
    series_instance_uid: str
    status: str
    instances: int
    bytes_on_disk: int
    bytes_received: int
    seconds: float
    error: str | None = None
    #: Why it is not complete: "network" (the connection broke), "busy" (A7xx/C0xx: back off and
    #: retry), "pacs" (the PACS answered and something is still missing), "storage" (local write).
    fault: str | None = None
    attempts: int = 0  # attempts without progress refused by the PACS, across runs (state DB)
    storage_errno: int | None = None  # errno of a local write failure (disk full, read-only ...)
    new_instances: int = 0  # instances this attempt brought to disk: progress
    answered: bool = False  # the PACS sent the retrieve's final status
    given_up: bool = False  # pacs.max_attempts attempts without progress: no longer claimed
    #: Instances this attempt wrote: SOP UID -> (SOP class, syntax as received, bytes), and the
    #: syntax the PACS says it stores each in (IMAGE level; absent: not said): for the state DB.
    arrived: dict[str, tuple[str, str, int]] = field(default_factory=dict, compare=False, repr=False)
    stored_syntaxes: dict[str, str | None] = field(default_factory=dict, compare=False, repr=False)

    @property
    def progressed(self) -> bool:
        return self.new_instances > 0


class SeriesRetriever:
    """Retrieves claimed series with one PACS session; the receiving side depends on the method."""

    def __init__(
        self, settings: Settings, client: PacsClient, sink: InstanceSink, session: PacsSession,
        known_classes: Callable[[str], tuple[str, ...] | None] | None = None,
    ) -> None:  # fmt: skip
        self.settings = settings
        self.client = client
        self.sink = sink
        self.session = session
        self.download_dir = settings.paths.download_dir
        #: SeriesInstanceUID -> the SOP classes the state DB knows its instances can have (the
        #: series' IMAGE-level list or its study's SOPClassesInStudy), or None.
        self.known_classes = known_classes

    def retrieve(self, series: SeriesState) -> tuple[SeriesOutcome, int | None]:
        """One attempt at one series; returns the outcome and the expected count it learned."""
        started = time.monotonic()
        directory = series_dir(self.download_dir, series.patient_id, series.study_instance_uid, series.series_instance_uid)
        expected = series.expected_instances
        missing: list[str] | None = None
        flight: InFlightRetrieve | None = None
        infos: list[InstanceInfo] | None = None
        try:
            remove_stale_temps(directory)  # instances a killed receiver was writing
            on_disk = instances_on_disk(directory)
            c_get = self.settings.pacs.retrieve_method == "c-get"
            classes = self._classes_without_asking(series) if c_get and expected and not on_disk and not series.last_error else None
            if expected is None or 0 < len(on_disk) < expected or (c_get and len(on_disk) < expected and classes is None):
                infos = self._instances(series)
                uids = None if infos is None else [i.sop_instance_uid for i in infos]
                if uids is not None and self._capped(uids):
                    log.warning(
                        "series %s: the IMAGE-level query hit pacs.max_find_results; retrieving the whole series",
                        series.series_instance_uid,
                    )
                    expected = max(expected, len(uids)) if expected is not None else None
                elif uids is not None:
                    expected = len(uids)
                    missing = [u for u in uids if u not in on_disk]
                    if on_disk and not missing:
                        return self._outcome(series, directory, started, "complete", None, files=on_disk), expected
            elif len(on_disk) >= expected:
                return self._outcome(series, directory, started, "complete", None, files=on_disk), expected
            try:
                directory.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                error = f"cannot create the series directory {directory}: {exc.strerror or exc}"
                return self._outcome(series, directory, started, "failed", error, fault="storage", storage_errno=exc.errno), expected
            flight = self.sink.expect(series.patient_id, series.study_instance_uid, series.series_instance_uid)
            final = self._send(series, missing if on_disk and missing else None, flight, infos, classes)
            before = len(on_disk)
            if not (final.started_nothing and flight.received == 0):  # else nothing is on its way
                flight.wait_for_stragglers(
                    lambda: before + flight.received >= (expected or 0) and bool(expected),
                    self.settings.pacs.straggler_timeout_s,
                )
            stored = _stored_syntaxes(infos)
            lossy = self._drop_lossy_transcodes(directory, flight, stored)
            files = _on_disk(directory)
            status, error = self._judge(final, len(files), expected, flight)
            if lossy:  # never complete with a lossy transcode in it
                status, error = ("incomplete", lossy) if status == "complete" or error is None else (status, f"{lossy}; {error}")
            fault = "pacs" if lossy else _fault_of(status, final, flight)
            outcome = self._outcome(series, directory, started, status, error, flight, fault=fault, answered=True, files=files)
            return dataclasses.replace(outcome, stored_syntaxes=stored), expected
        except (MoveDestinationUnknown, stopping.Stopped):
            raise
        except PacsError as exc:
            if flight is not None and flight.last_errno in DISK_ERRNOS:  # the PACS gave up on our full disk
                return self._outcome(series, directory, started, "failed", flight.last_error, flight, fault="storage"), expected
            network = is_connection_fault(exc)
            fault = "network" if network else "busy" if is_transient(exc) else "pacs"
            status = "incomplete" if network else "failed"
            return self._outcome(series, directory, started, status, str(exc), flight, fault=fault), expected
        except OSError as exc:  # reading the series directory (e.g. a file where a directory must be)
            error = f"cannot read the series directory {directory}: {exc.strerror or exc}"
            return self._outcome(series, directory, started, "failed", error, fault="storage", storage_errno=exc.errno), expected
        finally:
            if flight is not None:
                self.sink.done(flight)

    def _classes_without_asking(self, series: SeriesState) -> tuple[str, ...] | None:
        """For a C-GET of a whole series whose count is known: its SOP classes from the state DB
        when they fit one association, so no IMAGE-level C-FIND is needed to propose contexts.

        That C-FIND cost Orthanc 140-180 ms per 130-instance series (it reads every instance for
        SOPClassUID and AvailableTransferSyntaxUID), a third of a C-GET's time on one
        association; DCMTK's getscu asks nothing. Only for a series no attempt has failed on
        (``last_error`` empty): a class the list missed fails its sub-operations, the attempt
        ends incomplete, and the retry lists the instances. The stored syntaxes are not known
        for such an attempt, as for a C-MOVE of a series whose count is known.
        """
        if self.known_classes is None:
            return None
        classes = self.known_classes(series.series_instance_uid)
        if not classes or len(series_get_plan(classes)) != 1:
            return None
        return classes

    def _capped(self, found: list[str]) -> bool:
        cap = self.settings.pacs.max_find_results
        return bool(cap) and len(found) >= cap

    def _instances(self, series: SeriesState) -> list[InstanceInfo] | None:
        """The series' instances from an IMAGE-level C-FIND; None (count unknown) when the PACS
        refuses IMAGE-level queries. Transient failures propagate (the attempt is retried)."""
        try:
            found = self.session.find_instances(series.study_instance_uid, series.series_instance_uid)
        except PacsRequestFailed as exc:
            if transient_status(exc.status):
                raise
            log.warning(
                "series %s: no IMAGE-level answer (%s); retrieving the whole series, its instance list "
                "and SOP classes unknown", series.series_instance_uid, exc,
            )  # fmt: skip
            return None
        if not found:  # a PACS that answers IMAGE-level queries with nothing: it does not know, not "none"
            log.warning("series %s: the IMAGE-level query listed no instance; count taken as unknown", series.series_instance_uid)
            return None
        return found

    def _send(
        self, series: SeriesState, sop_uids: list[str] | None, flight: InFlightRetrieve, infos: list[InstanceInfo] | None,
        classes: tuple[str, ...] | None = None,
    ) -> RetrieveStatus:
        if self.settings.pacs.retrieve_method == "c-get":
            return self._get(series, sop_uids, infos, classes)
        timeout = self.settings.pacs.timeout_s
        return self.session.move(
            series.study_instance_uid, series.series_instance_uid, self.settings.receiver.ae_title, sop_uids,
            patience=flight.patience(timeout),
        )  # fmt: skip

    def _get(
        self, series: SeriesState, sop_uids: list[str] | None, infos: list[InstanceInfo] | None, known: tuple[str, ...] | None = None,
    ) -> RetrieveStatus:
        """C-GET with one context per (SOP class, syntax) for the classes the IMAGE-level answer
        named (or, without one, the ``known`` classes of the state DB), one C-GET per group of
        classes that fits an association (several only for series of more than three classes);
        the fallback proposal when the classes are unknown."""
        study, uid = series.study_instance_uid, series.series_instance_uid
        classes = _named_classes(infos) if infos is not None else (set(known) if known else None)
        if classes is None:
            self.session.propose_for(None)
            return self.session.get(study, uid, sop_uids)
        groups = series_get_plan(sorted(classes))  # type: ignore[arg-type]
        if len(groups) == 1:
            self.session.propose_for(groups[0])
            return self.session.get(study, uid, sop_uids)
        assert infos is not None  # known classes come only when they fit one group
        wanted = set(sop_uids) if sop_uids is not None else None
        finals = []
        for group in groups:
            part = [i.sop_instance_uid for i in infos if i.sop_class_uid in group and (wanted is None or i.sop_instance_uid in wanted)]
            if part:
                self.session.propose_for(group)
                finals.append(self.session.get(study, uid, part))
        return _combined(finals)

    def _drop_lossy_transcodes(self, directory: Path, flight: InFlightRetrieve, stored: dict[str, str | None]) -> str | None:
        """Remove instances the PACS sent lossy-compressed though it stores them lossless (they
        are fetched again next time, never kept silently); returns what to say, or None."""
        found = transcodings({uid: syntax for uid, (_c, syntax, _n) in flight.arrived.items()}, stored)
        if found.transcoded:
            log.warning("series %s: %d instance(s) arrived in another transfer syntax than the PACS stores",
                        flight.series_uid, len(found.transcoded))  # fmt: skip
        if not found.lossy:
            return None
        message = found.describe({uid: flight.arrived[uid][1] for uid in found.lossy}, stored)
        for sop_uid in found.lossy:
            instance_file(directory, sop_uid).unlink(missing_ok=True)
        log.error("series %s: %s; removed, to be fetched again", flight.series_uid, message)
        return message

    @staticmethod
    def _judge(final: RetrieveStatus, have: int, expected: int | None, flight: InFlightRetrieve) -> tuple[str, str | None]:
        """Complete only if the final is Success/Warning and every expected instance is on disk.

        With the expected count unknown, only a clean Success (no failed sub-operation) counts.
        """
        if flight.last_error:
            return "incomplete", flight.last_error
        if final.status != 0x0000 and not final.is_warning:
            return "incomplete", f"retrieve ended with {final.describe()}; {have} of {expected} instances on disk"
        if expected is None:
            if final.succeeded:
                return "complete", None
            return "incomplete", f"retrieve ended with {final.describe()} and the expected instance count is unknown"
        if have < expected:
            what = "reported success" if final.succeeded else f"ended with {final.describe()}"
            return "incomplete", f"retrieve {what} but only {have} of {expected} instances are on disk"
        return "complete", None

    @staticmethod
    def _outcome(
        series: SeriesState,
        directory: Path,
        started: float,
        status: str,
        error: str | None,
        flight: InFlightRetrieve | None = None,
        fault: str | None = None,
        answered: bool = False,
        storage_errno: int | None = None,
        files: dict[str, int] | None = None,
    ) -> SeriesOutcome:
        """``files``: the series directory's listing when the caller has just made it."""
        if files is None:
            files = _on_disk(directory)
        if flight is not None and flight.last_errno is not None:
            storage_errno = flight.last_errno
        return SeriesOutcome(
            series_instance_uid=series.series_instance_uid,
            status=status,
            instances=len(files),
            bytes_on_disk=sum(files.values()),
            bytes_received=flight.bytes if flight else 0,
            seconds=time.monotonic() - started,
            error=error,
            fault=None if status == "complete" else fault,
            attempts=series.attempts,
            storage_errno=storage_errno,
            new_instances=flight.received if flight else 0,
            answered=answered,
            arrived=dict(flight.arrived) if flight else {},
        )


def _stored_syntaxes(infos: list[InstanceInfo] | None) -> dict[str, str | None]:
    return {i.sop_instance_uid: i.stored_transfer_syntax for i in infos or ()}


def _named_classes(infos: list[InstanceInfo]) -> set[str] | None:
    """The SOP classes an IMAGE-level answer named, or None when any instance lacked one."""
    if not infos or any(i.sop_class_uid is None for i in infos):
        return None
    return {i.sop_class_uid for i in infos}  # type: ignore[misc]


def _combined(finals: list[RetrieveStatus]) -> RetrieveStatus:
    """The several C-GETs of one series as one answer: the first that is not a success, with
    the sub-operation counts summed (a count any of them left out is unknown)."""
    if not finals:
        return RetrieveStatus(0x0000, 0, 0, 0)
    worst = next((f for f in finals if f.status != 0x0000), finals[0])

    def total(name: str) -> int | None:
        counts = [getattr(f, name) for f in finals]
        return None if any(c is None for c in counts) else sum(counts)

    return dataclasses.replace(worst, completed=total("completed"), failed=total("failed"), warning=total("warning"))


def _fault_of(status: str, final: RetrieveStatus, flight: InFlightRetrieve) -> str | None:
    """Why a retrieve that got its final status is not complete.

    An A7xx final (out of resources) is "busy": back off, try again in this run. So is a C0xx
    (unable to process), unless sub-operations failed with it: then the PACS tried to send and
    could not (Orthanc's 0xC000 "Cannot transcode ..."), and the same request sent again at once
    would only fail the same way; that is an answer of the PACS, counted and left to the next run.
    """
    if status == "complete":
        return None
    if flight.last_error:
        return "storage"
    could_not_send = 0xC000 <= final.status <= 0xCFFF and bool(final.failed)
    return "busy" if final.transient and not could_not_send else "pacs"


def _on_disk(directory: Path) -> dict[str, int]:
    try:
        return instances_on_disk(directory)
    except OSError:
        return {}
