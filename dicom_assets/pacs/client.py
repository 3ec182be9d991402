"""The PACS client: C-ECHO, C-FIND, C-MOVE and C-GET (our own requestor, see `requestor`), within the request budget.

A :class:`PacsSession` keeps one association open for many requests (an association costs a
request of the budget too) and reopens it when the PACS dropped it. Every request it sends first
passes the client's :class:`RequestGate` (blackout windows, backoff after the PACS said it is
overloaded) and then takes a token from the :class:`~dicom_assets.pacs.budget.RequestBudget`.

Faults: :meth:`PacsSession.wait_until_reachable` waits (C-ECHO with exponential backoff and
jitter, up to ``pacs.wait_for_pacs_s``) for a PACS that refuses, resets or aborts;
:meth:`PacsSession.retrying` retries a request on those faults and on A7xx/C0xx statuses, up to
``pacs.max_attempts`` times. C-FINDs that return exactly ``pacs.max_find_results`` are taken as
truncated and split by StudyDate (then StudyTime) ranges until every part is below the cap.
"""

from __future__ import annotations

import collections
import copy
import logging
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import date, timedelta
from typing import Any, Callable, Iterator, Sequence, TypeVar

from pydicom.dataset import Dataset

from dicom_assets import stopping
from dicom_assets.config import PacsSettings
from dicom_assets.pacs.budget import RequestBudget, UnlimitedBudget
from dicom_assets.pacs.errors import (  # noqa: F401 - re-exported: the client's errors live there
    MoveDestinationUnknown,
    PacsError,
    PacsRequestFailed,
    PacsUnavailable,
    PacsUnreachable,
    is_connection_fault,
    is_transient,
    transient_status,
)
from dicom_assets.pacs.faults import Backoff, OutageClock, RequestGate
from dicom_assets.pacs.contexts import (
    FIND_MODELS,
    GET_MODELS,
    MOVE_MODELS,
    get_contexts,
    per_syntax_contexts,
    query_contexts,
)
from dicom_assets.pacs.requestor import RequestorAssociation

log = logging.getLogger("dicom_assets.pacs")

PENDING = (0xFF00, 0xFF01)
SUCCESS = 0x0000
WARNING = 0xB000
MOVE_DESTINATION_UNKNOWN = 0xA801
T = TypeVar("T")


@dataclass(frozen=True)
class RetrieveStatus:
    """The final answer to a C-MOVE or C-GET."""

    status: int
    completed: int | None
    failed: int | None
    warning: int | None
    error_comment: str | None = None  # (0000,0902), e.g. Orthanc's "Cannot transcode ..."

    @property
    def succeeded(self) -> bool:
        """Final success and no failed sub-operation (counts may be absent; disk decides the rest)."""
        return self.status == SUCCESS and not self.failed

    @property
    def started_nothing(self) -> bool:
        """A failure final with no sub-operation at all: the PACS sent nothing and will send nothing."""
        counts = (self.completed, self.failed, self.warning)
        return self.status != SUCCESS and not self.is_warning and all(not c for c in counts)

    @property
    def is_warning(self) -> bool:
        """A Warning final (B000, B0xx): some sub-operations may have failed; disk decides."""
        return 0xB000 <= self.status <= 0xBFFF

    @property
    def transient(self) -> bool:
        """The PACS was out of resources / unable to process: back off and retry."""
        return transient_status(self.status)

    def describe(self) -> str:
        text = (
            f"status 0x{self.status:04X}, completed {self.completed}, failed {self.failed}, "
            f"warning {self.warning}"
        )
        return f"{text} ({self.error_comment})" if self.error_comment else text


PATIENT_KEYS = ("PatientName", "PatientSex", "PatientBirthDate")
STUDY_KEYS = (
    "StudyID",
    "StudyDate",
    "StudyTime",
    "AccessionNumber",
    "StudyDescription",
    "ModalitiesInStudy",
    "PatientID",
    "SOPClassesInStudy",  # the series filters' SOP class groups: which studies hold SRs, raw data ...
)
#: Computed counts asked for with patients and studies: how incremental discovery notices that
#: something changed below a patient or a study without asking about each one.
PATIENT_COUNT_KEYS = ("NumberOfPatientRelatedStudies", "NumberOfPatientRelatedSeries", "NumberOfPatientRelatedInstances")
STUDY_COUNT_KEYS = ("NumberOfStudyRelatedSeries", "NumberOfStudyRelatedInstances")
SERIES_KEYS = (
    "SeriesNumber",
    "Modality",
    "SeriesDescription",
    "BodyPartExamined",
    "InstitutionName",
    "SeriesDate",
    "SeriesTime",
    "NumberOfSeriesRelatedInstances",
)


def _identifier(level: str, **values: Any) -> Dataset:
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 192"  # UTF-8 so non-ASCII PatientIDs match
    ds.QueryRetrieveLevel = level
    for keyword, value in values.items():
        setattr(ds, keyword, value)
    return ds


def _blank(ds: Dataset, keywords: Sequence[str]) -> Dataset:
    for keyword in keywords:
        if keyword not in ds:
            setattr(ds, keyword, None if keyword.startswith("NumberOf") else "")  # IS counts: empty
    return ds


class PacsClient:
    """Builds sessions to one PACS with the configured AE titles, timeouts and budget."""

    def __init__(
        self,
        settings: PacsSettings,
        budget: RequestBudget | None = None,
        gate: RequestGate | None = None,
        sleep: Callable[[float], None] = stopping.sleep,
    ) -> None:
        self.settings = settings
        self.budget: RequestBudget = budget or UnlimitedBudget()
        self.sleep = sleep
        self.gate = gate or RequestGate(settings.blackout_windows(), sleep=sleep)
        self.outage = OutageClock(settings.wait_for_pacs_s)
        self._empty_move_failures = 0
        self._empty_lock = threading.Lock()
        self._opened_s: collections.deque[float] = collections.deque(maxlen=8)

    def note_association_opened(self, seconds: float) -> None:
        self._opened_s.append(seconds)

    @property
    def association_open_s(self) -> float | None:
        """The quickest of the last few association set-ups (TCP connect and A-ASSOCIATE: about
        two round trips), or None before the first: how far away the PACS is."""
        return min(self._opened_s, default=None)

    def backoff(self) -> Backoff:
        """Exponential backoff with jitter: initial * 2^n + U(0, initial), at most retry_max_s."""
        return Backoff(self.settings.retry_initial_s, self.settings.retry_max_s)

    def note_reset(self) -> None:
        """The PACS or the network reset/aborted an association: tell the shared budget, which
        slows every worker of every process down (when it adapts its rate)."""
        note = getattr(self.budget, "note_reset", None)
        if note is not None:
            note()

    @contextmanager
    def session(self, sink: Any = None) -> Iterator["PacsSession"]:
        """A session for queries and C-MOVE, or for C-GET when ``sink`` (an
        :class:`~dicom_assets.pacs.receiver.InstanceSink`) takes the C-STOREs."""
        session = PacsSession(self, sink)
        try:
            yield session
        finally:
            session.close()

    def describe(self) -> str:
        s = self.settings
        return f"PACS {s.called_ae_title}@{s.host}:{s.port}"

    #: Failed C-MOVEs without a single sub-operation, in a row, that mean "unknown destination".
    EMPTY_MOVE_FAILURES_LIMIT = 2

    def note_empty_move_failure(self, final: RetrieveStatus) -> bool:
        """True once C-MOVEs keep failing before any sub-operation starts.

        Orthanc answers a C-MOVE to an AE title it does not know with 0xC000 and zero
        sub-operations instead of A801. One such answer may be a transient failure; several in a
        row (any series) mean the destination is the problem, and retrying every series up to
        ``pacs.max_attempts`` would only hammer the PACS.
        """
        with self._empty_lock:
            self._empty_move_failures = self._empty_move_failures + 1 if final.started_nothing else 0
            return self._empty_move_failures >= self.EMPTY_MOVE_FAILURES_LIMIT


class PacsSession:
    """One association (opened lazily, reopened when dropped) and the requests sent over it."""

    def __init__(self, client: PacsClient, sink: Any) -> None:
        self.client = client
        self.settings = client.settings
        self.sink = sink
        self._assoc: RequestorAssociation | None = None
        self._stop_key: int | None = None
        #: The storage classes the C-GET association proposes one context per syntax for
        #: (None: the fallback proposal, every common class with every syntax in one context).
        self._proposal: tuple[str, ...] | None = None
        self.requests = 0
        self.finds = 0  # C-FINDs sent (also counted in requests)

    @property
    def connected(self) -> bool:
        return self._assoc is not None and self._assoc.is_established

    # -- association ---------------------------------------------------------------------------
    def _association(self) -> RequestorAssociation:
        if self._assoc is not None and self._assoc.is_established:
            return self._assoc
        self._forget_association()
        s = self.settings
        if self.sink is None:
            contexts, roles = query_contexts(), []
        elif self._proposal is None:
            contexts, roles = get_contexts()
        else:
            contexts, roles = per_syntax_contexts(self._proposal)
        self._take_token("associate")
        stopping.PROCESS.check()
        try:
            started = time.monotonic()
            assoc = RequestorAssociation.open(
                (s.host, s.port), s.calling_ae_title, s.called_ae_title, contexts, roles, timeout_s=s.timeout_s
            )
            self.client.note_association_opened(time.monotonic() - started)
        except (OSError, RuntimeError, ValueError) as exc:
            reset = isinstance(exc, (ConnectionResetError, ConnectionAbortedError, BrokenPipeError))
            if reset:
                self.client.note_reset()
            raise PacsUnavailable(f"cannot associate with {self.client.describe()}: {exc}", reset=reset) from exc
        self._assoc = assoc
        self._stop_key = stopping.PROCESS.add_closer(assoc.interrupt)  # SIGTERM: unblock its reads
        return assoc

    def _forget_association(self) -> None:
        if self._stop_key is not None:
            stopping.PROCESS.remove_closer(self._stop_key)
            self._stop_key = None
        self._assoc = None

    def _take_token(self, what: str) -> None:
        self.client.budget.acquire(what)
        self.requests += 1

    def close(self) -> None:
        if self._assoc is not None and self._assoc.is_established:
            self._assoc.release()
        self._forget_association()

    def _dropped(self, what: str, exc: BaseException | None = None) -> PacsUnavailable:
        """The association broke during a request. A reset or abort (not a timeout, not our own
        stop) is reported to the shared budget, which slows down."""
        if self._assoc is not None and self._assoc.is_established:
            self._assoc.abort()
        self._forget_association()
        stopping.PROCESS.check()  # the connection was shut by a stop request, not by the PACS
        reset = exc is None or not isinstance(exc, TimeoutError)
        if reset:
            self.client.note_reset()
        return PacsUnavailable(f"{what}: {self.client.describe()} dropped the association or timed out", reset=reset)

    def _ready(self) -> RequestorAssociation:
        """Pass the gate (blackout, backoff hold), then the (re)opened association."""
        if self.client.gate.wait() > 1.0 and self.connected:
            self.close()  # idle for long: the PACS may have dropped it; start afresh
        return self._association()

    # -- fault handling ------------------------------------------------------------------------
    def probe(self) -> None:
        """Prove the PACS answers: associate, and C-ECHO when the association offers it."""
        if self.sink is None:
            self.echo()
        else:
            self._ready()  # a C-GET association has no room for Verification: associating is proof

    def wait_until_reachable(self) -> None:
        """Return once the PACS answers; wait with backoff while the outage lasts.

        The outage (:class:`~dicom_assets.pacs.faults.OutageClock`, shared by the client's
        sessions) may last ``pacs.wait_for_pacs_s`` since the PACS last made progress; then
        :class:`PacsUnreachable` is raised. Nothing is claimed meanwhile, so an outage burns no
        series attempts. Answering C-ECHO does not end an outage: only progress does.
        """
        backoff = self.client.backoff()
        while True:
            try:
                self.probe()
                return
            except PacsError as exc:
                if not is_transient(exc):
                    raise
                self.client.outage.fault()
                self._wait_out(exc, backoff, "not answering")

    def _wait_out(self, exc: PacsError, backoff: Backoff, what: str) -> None:
        """Sleep the next backoff delay of an outage, or raise PacsUnreachable once it is too long."""
        s = self.settings
        remaining = self.client.outage.remaining()
        if remaining <= 0:
            raise PacsUnreachable(
                f"{self.client.describe()} made no progress for {s.wait_for_pacs_s:g} s "
                f"(pacs.wait_for_pacs_s): {exc}; no attempt was used, run again when the PACS is back"
            ) from exc
        delay = min(backoff.next(), remaining)
        log.warning(
            "%s %s (%s); next try in %.1f s (outage %.0f s of pacs.wait_for_pacs_s=%g s)",
            self.client.describe(), what, exc, delay, self.client.outage.elapsed(), s.wait_for_pacs_s,
        )  # fmt: skip
        self.client.sleep(delay)

    def retrying(self, fn: Callable[[], T], what: str) -> T:
        """Call ``fn`` (one PACS request) until it is answered.

        A connection fault waits for the PACS (the outage budget, ``pacs.wait_for_pacs_s``);
        an A7xx/C0xx answer backs off (every session of the client holds back) and is tried at
        most ``pacs.max_attempts`` times. An answered request is progress: it ends an outage.
        """
        refusals = 0
        backoff = self.client.backoff()
        while True:
            try:
                result = fn()
            except PacsError as exc:
                if is_connection_fault(exc):
                    self.client.outage.fault()
                    self._wait_out(exc, backoff, f"{what} failed")
                    self.wait_until_reachable()
                    continue
                if not is_transient(exc):
                    raise
                refusals += 1
                if refusals >= self.settings.max_attempts:
                    raise
                delay = backoff.next()
                self.client.gate.hold(delay)  # every session of this client backs off
                log.warning("%s failed (%s); retrying in %.1f s", what, exc, delay)
                continue
            self.client.outage.progress()
            return result

    # -- requests ------------------------------------------------------------------------------
    def echo(self) -> None:
        assoc = self._ready()
        self._take_token("C-ECHO")
        try:
            status = assoc.send_c_echo()
        except (OSError, RuntimeError) as exc:
            raise self._dropped(f"C-ECHO ({exc})", exc) from exc
        if "Status" not in status:
            raise self._dropped("C-ECHO")
        if status.Status != SUCCESS:
            raise PacsRequestFailed(f"C-ECHO answered 0x{status.Status:04X}", status.Status)

    def find(self, identifier: Dataset, model: str = "study") -> list[Dataset]:
        """Send one C-FIND and collect every pending identifier; raise unless the final is success."""
        assoc = self._ready()
        self._take_token("C-FIND")
        self.finds += 1
        results: list[Dataset] = []
        for status, found in self._responses(lambda: assoc.send_c_find(identifier, FIND_MODELS[model]), "C-FIND"):
            if "Status" not in status:
                raise self._dropped(f"C-FIND at {identifier.QueryRetrieveLevel} level")
            if status.Status in PENDING:
                if found is not None:
                    results.append(found)
            elif status.Status in (SUCCESS, WARNING):
                return results
            else:
                raise PacsRequestFailed(
                    f"C-FIND at {identifier.QueryRetrieveLevel} level failed with 0x{status.Status:04X}",
                    status.Status,
                )
        raise self._dropped("C-FIND")

    def _responses(self, send: Callable[[], Iterator[Any]], what: str) -> Iterator[Any]:
        """The responses of one request; a socket/association error becomes PacsUnavailable."""
        try:
            yield from send()
        except (OSError, RuntimeError) as exc:
            raise self._dropped(f"{what} ({exc})", exc) from exc

    def _capped(self, found: list[Dataset]) -> bool:
        cap = self.settings.max_find_results
        return bool(cap) and len(found) >= cap

    def find_patients(self) -> list[Dataset]:
        """Every patient. When the PATIENT-level answer hits ``pacs.max_find_results``, the
        patients are derived from STUDY-level queries split by StudyDate until none is capped
        (a patient without any study has nothing to retrieve anyway)."""
        found = self.retrying(
            lambda: self.find(_blank(_identifier("PATIENT", PatientID=""), (*PATIENT_KEYS, *PATIENT_COUNT_KEYS)), model="patient"),
            "C-FIND of patients",
        )
        if not self._capped(found):
            return found
        log.warning(
            "the patient query returned %d results = pacs.max_find_results: deriving patients from "
            "STUDY-level queries split by StudyDate", len(found),
        )  # fmt: skip
        patients: dict[str, Dataset] = {str(ds.get("PatientID", "")): ds for ds in found}
        base = _blank(_identifier("STUDY", PatientID="", StudyInstanceUID=""), (*PATIENT_KEYS, "StudyDate", "StudyTime"))
        for study in self.find_split(base):
            pid = str(study.get("PatientID", ""))
            if pid not in patients:
                patient = _identifier("PATIENT", PatientID=pid)
                for keyword in PATIENT_KEYS:
                    setattr(patient, keyword, study.get(keyword, ""))
                patients[pid] = patient
        return list(patients.values())

    def find_studies(self, patient_id: str) -> list[Dataset]:
        """Studies of exactly this patient (a PatientID with ``*``/``?`` would also match others)."""
        ident = _blank(_identifier("STUDY", PatientID=patient_id, StudyInstanceUID=""), (*STUDY_KEYS, *STUDY_COUNT_KEYS))
        found = self.retrying(lambda: self.find(ident), f"C-FIND of the studies of {patient_id!r}")
        if self._capped(found):
            log.warning("patient %r: %d studies = pacs.max_find_results; splitting by StudyDate", patient_id, len(found))
            found = self.find_split(ident)
        return [ds for ds in found if str(ds.get("PatientID", "")) == patient_id]

    def find_studies_by_date(self, since: date | None) -> list[Dataset]:
        """Every study (of every patient) with a StudyDate from ``since`` on, open-ended; every
        study at all when ``since`` is None. Study Root, one C-FIND, with the related counts.

        An answer that hits ``pacs.max_find_results`` is split by StudyDate (then StudyTime).
        Studies without a StudyDate are only in the answer to the unsplit ``since=None`` query.
        """
        span = "" if since is None else _date_range(since, date.max)
        ident = _blank(
            _identifier("STUDY", PatientID="", StudyInstanceUID="", StudyDate=span),
            (*STUDY_KEYS, *STUDY_COUNT_KEYS),
        )
        found = self.retrying(lambda: self.find(ident), f"C-FIND of the studies dated {span or 'any day'}")
        if not self._capped(found):
            return found
        log.warning("the studies dated %s: %d = pacs.max_find_results; splitting by StudyDate", span or "any day", len(found))
        return self.find_split(ident, since)

    def find_studies_matching(self, **keys: str) -> list[Dataset]:
        """Studies matching these STUDY-level keys (Study Root; e.g. AccessionNumber, PatientID,
        StudyDate range, ModalitiesInStudy), with the patient's demographics and the related
        counts; split by StudyDate when the answer hits ``pacs.max_find_results``. The PACS may
        match loosely (wildcards, case): the caller checks what it needs exactly."""
        values = {"PatientID": "", "StudyInstanceUID": "", **keys}
        ident = _blank(_identifier("STUDY", **values), tuple(k for k in (*PATIENT_KEYS, *STUDY_KEYS, *STUDY_COUNT_KEYS) if k not in values))
        found = self.retrying(lambda: self.find(ident), f"C-FIND of the studies with {keys}")
        if self._capped(found) and not keys.get("StudyInstanceUID"):
            log.warning("studies with %s: %d = pacs.max_find_results; splitting by StudyDate", keys, len(found))
            found = self.find_split(ident)
        return found

    def find_split(self, base: Dataset, since: date | None = None) -> list[Dataset]:
        """A STUDY-level C-FIND split by StudyDate (then StudyTime) ranges until every part
        returns fewer than ``pacs.max_find_results``; deduplicated by StudyInstanceUID. Only
        dates from ``since`` on when given.

        Studies without a StudyDate match no range, so a split query cannot find them.
        """
        out: dict[str, Dataset] = {}
        first, last = date(1900, 1, 1), date.today() + timedelta(days=366)
        for lo, hi in ((date.min, first - timedelta(days=1)), (first, last), (last + timedelta(days=1), date.max)):
            if since is None or hi >= since:
                self._split_dates(base, lo if since is None else max(lo, since), hi, out)
        return list(out.values())

    def _find_part(self, base: Dataset, **keys: str) -> list[Dataset]:
        ident = copy.deepcopy(base)
        for keyword, value in keys.items():
            setattr(ident, keyword, value)
        return self.retrying(lambda: self.find(ident), f"C-FIND {keys}")

    def _split_dates(self, base: Dataset, lo: date, hi: date, out: dict[str, Dataset]) -> None:
        found = self._find_part(base, StudyDate=_date_range(lo, hi))
        if not self._capped(found):
            _collect(found, out)
        elif lo == hi:
            self._split_times(base, lo, 0, 86399, out)
        else:
            mid = lo + (hi - lo) // 2
            self._split_dates(base, lo, mid, out)
            self._split_dates(base, mid + timedelta(days=1), hi, out)

    def _split_times(self, base: Dataset, day: date, lo: int, hi: int, out: dict[str, Dataset]) -> None:
        found = self._find_part(base, StudyDate=_date_range(day, day), StudyTime=f"{_hms(lo)}-{_hms(hi)}")
        if not self._capped(found):
            _collect(found, out)
        elif hi - lo < 60:
            log.error(
                "more than pacs.max_find_results studies on %s between %s and %s: results may be "
                "truncated (raise pacs.max_find_results if the PACS allows)", day, _hms(lo), _hms(hi),
            )  # fmt: skip
            _collect(found, out)
        else:
            mid = (lo + hi) // 2
            self._split_times(base, day, lo, mid, out)
            self._split_times(base, day, mid + 1, hi, out)

    def find_series(self, study_uid: str) -> list[Dataset]:
        ident = _blank(_identifier("SERIES", StudyInstanceUID=study_uid, SeriesInstanceUID=""), SERIES_KEYS)
        found = self.retrying(lambda: self.find(ident), f"C-FIND of the series of study {study_uid}")
        if self._capped(found):
            log.error("study %s: %d series = pacs.max_find_results: the list may be truncated", study_uid, len(found))
        return [ds for ds in found if str(ds.get("StudyInstanceUID", study_uid)) == study_uid]

    def find_instance_uids(self, study_uid: str, series_uid: str) -> list[str]:
        return sorted({i.sop_instance_uid for i in self.find_instances(study_uid, series_uid)})

    def find_instances(self, study_uid: str, series_uid: str) -> list["InstanceInfo"]:
        """The series' instances from an IMAGE-level C-FIND: UID, SOP class and, where the PACS
        says, the transfer syntax it stores it in (Available Transfer Syntax UID)."""
        ident = _identifier(
            "IMAGE", StudyInstanceUID=study_uid, SeriesInstanceUID=series_uid, SOPInstanceUID="", SOPClassUID=""
        )
        ident.add_new(0x00083002, "UI", "")  # AvailableTransferSyntaxUID
        found: dict[str, InstanceInfo] = {}
        for ds in self.find(ident):
            uid = text(ds, "SOPInstanceUID")
            if uid:
                found[uid] = InstanceInfo(uid, text(ds, "SOPClassUID"), text(ds, "AvailableTransferSyntaxUID"))
        return sorted(found.values(), key=lambda i: i.sop_instance_uid)

    def _retrieve_identifier(self, study_uid: str, series_uid: str, sop_uids: Sequence[str] | None) -> Dataset:
        if sop_uids:
            return _identifier(
                "IMAGE", StudyInstanceUID=study_uid, SeriesInstanceUID=series_uid, SOPInstanceUID=list(sop_uids)
            )
        return _identifier("SERIES", StudyInstanceUID=study_uid, SeriesInstanceUID=series_uid)

    def move(
        self,
        study_uid: str,
        series_uid: str,
        destination: str,
        sop_uids: Sequence[str] | None = None,
        patience: Callable[[], float] | None = None,
    ) -> RetrieveStatus:
        """C-MOVE a series (or some of its instances) to ``destination``; returns the final status.

        ``patience`` (seconds left of the timeout since an instance last reached the receiver)
        keeps a C-MOVE without Pending responses from timing out while it works; see
        RequestorAssociation.send_c_move.
        """
        assoc = self._ready()
        self._take_token("C-MOVE")
        ident = self._retrieve_identifier(study_uid, series_uid, sop_uids)
        responses = self._responses(
            lambda: assoc.send_c_move(ident, destination, MOVE_MODELS["study"], patience), "C-MOVE"
        )
        final = self._final_status(responses, "C-MOVE")
        if final.status == MOVE_DESTINATION_UNKNOWN or self.client.note_empty_move_failure(final):
            raise MoveDestinationUnknown(
                f"{self.client.describe()} does not know the move destination AE title "
                f"{destination!r} or cannot connect to it ({final.describe()}): register "
                f"{destination!r} on the PACS with this machine's address and receiver.port, and "
                f"check that the PACS can reach that port"
            )
        return final

    def propose_for(self, sop_classes: Sequence[str] | None) -> None:
        """Make the C-GET association propose one context per (class, syntax) for these storage
        classes (None: the fallback proposal). An open association proposing something else is
        released; the next request opens one with the new proposal (one association per set of
        classes, not per series: a cohort of CT keeps one)."""
        proposal = tuple(sorted(dict.fromkeys(sop_classes))) if sop_classes is not None else None
        if proposal != self._proposal:
            self.close()
            self._proposal = proposal

    def get(self, study_uid: str, series_uid: str, sop_uids: Sequence[str] | None = None) -> RetrieveStatus:
        """C-GET a series (or some of its instances); the session's ``sink`` receives them, over
        the contexts chosen by :meth:`propose_for`."""
        if self.sink is None:
            raise PacsError("C-GET needs a session opened with a sink for the instances")
        assoc = self._ready()
        self._take_token("C-GET")
        ident = self._retrieve_identifier(study_uid, series_uid, sop_uids)
        return self._final_status(self._responses(lambda: assoc.send_c_get(ident, GET_MODELS["study"], self.sink), "C-GET"), "C-GET")

    def _final_status(self, responses: Any, what: str) -> RetrieveStatus:
        """The final response; Pending ones (with or without counts) only show progress."""
        last: Dataset | None = None
        for status, _identifier_ in responses:
            if "Status" not in status:
                raise self._dropped(what)
            last = status
            if status.Status not in PENDING:
                break
        if last is None or last.Status in PENDING:
            raise self._dropped(what)
        comment = last.get("ErrorComment")
        return RetrieveStatus(
            status=int(last.Status),
            completed=_count(last, "NumberOfCompletedSuboperations"),
            failed=_count(last, "NumberOfFailedSuboperations"),
            warning=_count(last, "NumberOfWarningSuboperations"),
            error_comment=str(comment).strip() or None if comment else None,
        )


@dataclass(frozen=True)
class InstanceInfo:
    """One instance as an IMAGE-level C-FIND describes it (None: the PACS did not say)."""

    sop_instance_uid: str
    sop_class_uid: str | None
    stored_transfer_syntax: str | None


def _count(status: Dataset, keyword: str) -> int | None:
    value = status.get(keyword)
    try:
        return int(value) if value not in (None, "") else None
    except (TypeError, ValueError):
        return None


def _date_range(lo: date, hi: date) -> str:
    """A DICOM DA range; the extreme dates become open ends (``-19991231``, ``20270101-``)."""
    left = "" if lo == date.min else f"{lo.year:04d}{lo.month:02d}{lo.day:02d}"
    right = "" if hi == date.max else f"{hi.year:04d}{hi.month:02d}{hi.day:02d}"
    return f"{left}-{right}"


def _hms(seconds: int) -> str:
    return f"{seconds // 3600:02d}{seconds // 60 % 60:02d}{seconds % 60:02d}"


def _collect(found: list[Dataset], out: dict[str, Dataset]) -> None:
    for ds in found:
        out.setdefault(str(ds.get("StudyInstanceUID", "")), ds)


def text(ds: Dataset, keyword: str) -> str | None:
    """A C-FIND value as plain text (None when absent or empty)."""
    value = ds.get(keyword)
    if value is None or value == "":
        return None
    if keyword == "PatientName":
        return str(value)
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        return "\\".join(str(v) for v in value)
    return str(value)


def integer(ds: Dataset, keyword: str) -> int | None:
    value = ds.get(keyword)
    try:
        return int(value) if value not in (None, "") else None
    except (TypeError, ValueError):
        return None
