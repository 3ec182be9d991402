"""Discovery: which patients, studies and series the PACS has, recorded in the state DB.

Patients are kept only when the selection rule accepts them. A rule that raises on one patient
is logged and that patient skipped; it never stops discovery.

Discovery is incremental, because asking about every patient and every study on every pass
costs 1 + patients + studies C-FINDs however little changed. A pass (:func:`discover_pass`)
sends:

* one PATIENT-level C-FIND (the selection rule sees every patient), with the computed
  NumberOfPatientRelated{Studies,Series,Instances};
* STUDY-level C-FINDs by date window, Study Root, every patient at once, with
  NumberOfStudyRelated{Series,Instances}. A *full* pass asks for every StudyDate (one query,
  split by StudyDate only when it hits ``pacs.max_find_results``). An *incremental* pass asks for
  StudyDate >= watermark - ``discovery.recheck_days``, open-ended; the watermark is the local
  date the last complete pass started, kept per PACS (``host:port/called_ae``) in the state DB.
  Studies of patients the rule did not keep are ignored.

The per-patient steps then ask only about what changed (a run over one single patient asks
about all of it, as a manual refresh):

* :func:`discover_studies`: one STUDY-level C-FIND per patient whose studies are outdated:
  new patients and patients whose patient-level counts changed in a way the studies seen in the
  windows do not explain (a study or series added with an old StudyDate);
* :func:`discover_series`: one SERIES-level C-FIND per study whose series are outdated: new
  studies, studies whose related counts changed, and studies the PACS gave no counts for.

A full pass runs on the first pass, when ``discovery.full_every_days`` have passed since the last
full pass, or when asked (``dicom-assets sync --full-discovery``). Studies with an empty
StudyDate match no date range, so only a full pass sees them (or a per-patient query, when their
patient's counts give them away). A PACS that answers no related counts still works: every study
a pass sees gets its series asked for, every new patient its studies; changes below old studies
of known patients then wait for the next full pass.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta, timezone
from typing import Any, Callable, Iterable, Sequence

from pydicom.dataset import Dataset

from dicom_assets.config import DiscoverySettings
from dicom_assets.layout import UnsafeNameError, check_uid, patient_key
from dicom_assets.pacs.budget import server_key
from dicom_assets.pacs.client import PacsClient, PacsSession, integer, text
from dicom_assets.store import PatientRecord, SeriesRecord, StateStore, StudyRecord, UpsertCounts
from dicom_assets.store.state import RelatedCounts

log = logging.getLogger("dicom_assets.discovery")


@dataclass
class DiscoveryStats:
    found: int = 0
    kept: int = 0
    inserted: int = 0
    updated: int = 0
    reset_to_pending: int = 0
    skipped: list[str] = field(default_factory=list)
    requests: int = 0
    seconds: float = 0.0

    def metadata(self) -> dict[str, float | int]:
        return {
            "found": self.found,
            "kept": self.kept,
            "inserted": self.inserted,
            "updated": self.updated,
            "reset_to_pending": self.reset_to_pending,
            "skipped": len(self.skipped),
            "pacs_requests": self.requests,
            "seconds": round(self.seconds, 3),
        }


@dataclass
class PassStats(DiscoveryStats):
    """A discovery pass: patients (the base counts), then the studies of the date windows."""

    full_pass: bool = False
    windows: int = 0  # STUDY-level date-window C-FINDs (more than one only when split)
    studies_found: int = 0  # in the windows, of kept patients
    studies_inserted: int = 0
    series_to_check: int = 0  # studies whose series are outdated after the pass (all patients)
    patients_to_check: int = 0  # kept patients whose studies the windows could not account for

    def metadata(self) -> dict[str, float | int]:
        return {
            **super().metadata(),
            "full_pass": int(self.full_pass),
            "windows": self.windows,
            "studies_found": self.studies_found,
            "studies_inserted": self.studies_inserted,
            "series_to_check": self.series_to_check,
            "patients_to_check": self.patients_to_check,
        }


@dataclass
class StudyStats(DiscoveryStats):
    """The studies step: per-patient C-FINDs for outdated patients only."""

    patients_queried: int = 0
    studies_known: int = 0  # studies of these patients in the state DB afterwards

    def metadata(self) -> dict[str, float | int]:
        return {**super().metadata(), "patients_queried": self.patients_queried, "studies_known": self.studies_known}


@dataclass
class SeriesStats(DiscoveryStats):
    """The series step: one SERIES-level C-FIND per outdated study."""

    studies_queried: int = 0

    def metadata(self) -> dict[str, float | int]:
        return {**super().metadata(), "studies_queried_for_series": self.studies_queried}


@dataclass(frozen=True)
class PassPlan:
    """What a discovery pass asks for: every StudyDate (full) or those from ``since`` on."""

    full: bool
    since: date | None
    reason: str


def dicom_date(day: date) -> str:
    return f"{day.year:04d}{day.month:02d}{day.day:02d}"


def plan_pass(
    store: StateStore,
    pacs: str,
    policy: DiscoverySettings,
    force_full: bool = False,
    today: date | None = None,
    now: datetime | None = None,
) -> PassPlan:
    """Full on the first pass, when asked, or when the last full pass is ``full_every_days``
    old; otherwise incremental from the watermark minus ``recheck_days`` (late arrivals)."""
    today = today or date.today()
    now = now or datetime.now(timezone.utc)
    mark = store.discovery_watermark(pacs)
    if force_full:
        return PassPlan(True, None, "asked for")
    if mark is None:
        return PassPlan(True, None, "first pass over this PACS")
    if mark.full_pass_at is None or now - mark.full_pass_at >= timedelta(days=policy.full_every_days):
        return PassPlan(True, None, f"last full pass more than discovery.full_every_days={policy.full_every_days} ago")
    watermark = datetime.strptime(mark.watermark, "%Y%m%d").date()
    since = min(watermark, today) - timedelta(days=policy.recheck_days)
    return PassPlan(False, since, f"watermark {mark.watermark} - discovery.recheck_days={policy.recheck_days}")


def rule_accepts(rule: Callable[[Dataset], Any], identifier: Dataset) -> bool | None:
    """Whether the patient rule accepts this identifier's patient; None when the patient must be
    skipped whatever the rule says (an unusable PatientID, or the rule raised: logged)."""
    pid = str(identifier.get("PatientID", ""))
    try:
        patient_key(pid)
        return bool(rule(identifier))
    except UnsafeNameError as exc:
        log.warning("skipping patient %r: %s", pid, exc)
    except Exception as exc:  # noqa: BLE001 - a user rule must never kill the run
        log.warning("selection rule raised on patient %r, skipping it: %r", pid, exc)
    return None


def _select(rule: Callable[[Dataset], Any], identifier: Dataset, stats: DiscoveryStats) -> bool:
    accepted = rule_accepts(rule, identifier)
    if accepted is None:
        stats.skipped.append(str(identifier.get("PatientID", "")))
    return bool(accepted)


def _patient_counts(ds: Dataset) -> RelatedCounts:
    return RelatedCounts(
        studies=integer(ds, "NumberOfPatientRelatedStudies"),
        series=integer(ds, "NumberOfPatientRelatedSeries"),
        instances=integer(ds, "NumberOfPatientRelatedInstances"),
    )


def _study_counts(ds: Dataset) -> RelatedCounts:
    return RelatedCounts(series=integer(ds, "NumberOfStudyRelatedSeries"), instances=integer(ds, "NumberOfStudyRelatedInstances"))


def _discover_patients_in(session: PacsSession, store: StateStore, rule: Callable[[Dataset], Any], stats: DiscoveryStats) -> list[str]:
    """C-FIND every patient, keep those the rule accepts, upsert them with their related counts
    (a patient whose counts changed is marked outdated); returns the kept PatientIDs."""
    found = session.find_patients()
    stats.found = len(found)
    records: dict[str, PatientRecord] = {}
    counts: dict[str, RelatedCounts] = {}
    for ds in found:
        if _select(rule, ds, stats):
            pid = str(ds.get("PatientID", ""))
            records[pid] = PatientRecord(
                patient_id=pid,
                patient_name=text(ds, "PatientName"),
                patient_sex=text(ds, "PatientSex"),
                patient_birth_date=text(ds, "PatientBirthDate"),
            )
            counts[pid] = _patient_counts(ds)
    stats.kept = len(records)
    upserted = store.upsert_patients(records.values())
    stats.inserted, stats.updated = upserted.inserted, upserted.updated
    store.record_patient_counts(counts)
    return list(records)


def discover_patients(client: PacsClient, store: StateStore, rule: Callable[[Dataset], Any]) -> tuple[list[str], DiscoveryStats]:
    """C-FIND every patient, keep those the rule accepts, upsert them; returns their keys."""
    started = time.monotonic()
    stats = DiscoveryStats()
    with client.session() as session:
        kept = _discover_patients_in(session, store, rule, stats)
        stats.requests = session.requests
    stats.seconds = time.monotonic() - started
    return sorted(patient_key(pid) for pid in kept), stats


def _valid_uid(ds: Dataset, keyword: str, where: str, stats: DiscoveryStats) -> str | None:
    """The identifier's UID if it is safe to use as a path component; else log, count, None."""
    raw = str(ds.get(keyword, ""))
    try:
        return check_uid(raw, keyword)
    except UnsafeNameError as exc:
        log.warning("%s: ignoring a result: %s", where, exc)
        stats.skipped.append(raw)
        return None


def _study_record(ds: Dataset, uid: str, patient_id: str) -> StudyRecord:
    return StudyRecord(
        study_instance_uid=uid,
        patient_id=patient_id,
        study_id=text(ds, "StudyID"),
        study_date=text(ds, "StudyDate"),
        study_time=text(ds, "StudyTime"),
        accession_number=text(ds, "AccessionNumber"),
        study_description=text(ds, "StudyDescription"),
        modalities_in_study=text(ds, "ModalitiesInStudy"),
        sop_classes_in_study=text(ds, "SOPClassesInStudy"),  # for the series filters' SOP class groups
    )


def record_studies(
    store: StateStore, answers: Iterable[tuple[str, Dataset]], stats: DiscoveryStats, where: str
) -> tuple[int, UpsertCounts]:
    """Upsert the studies answered for these (PatientID, identifier) pairs with their related
    counts (a new or changed study gets its series marked outdated); returns how many, and the
    upsert's counts."""
    records: dict[str, StudyRecord] = {}
    counts: dict[str, RelatedCounts] = {}
    for pid, ds in answers:
        uid = _valid_uid(ds, "StudyInstanceUID", where, stats)
        if uid is not None:
            records[uid] = _study_record(ds, uid, pid)
            counts[uid] = _study_counts(ds)
    upserted = store.upsert_studies(records.values())
    store.record_study_counts(counts)
    return len(records), upserted


def discover_pass(
    client: PacsClient,
    store: StateStore,
    rule: Callable[[Dataset], Any],
    policy: DiscoverySettings,
    force_full: bool = False,
    today: date | None = None,
) -> tuple[list[str], PassStats]:
    """One discovery pass: the patients, then the studies of the date windows (see the module
    doc); moves the PACS's watermark. Returns the kept patients' partition keys and figures."""
    started = time.monotonic()
    today = today or date.today()
    pacs = server_key(client)
    plan = plan_pass(store, pacs, policy, force_full, today)
    log.info("%s discovery pass (%s)", "full" if plan.full else f"incremental from {plan.since}", plan.reason)
    stats = PassStats(full_pass=plan.full)
    with client.session() as session:
        kept = _discover_patients_in(session, store, rule, stats)
        before = session.finds
        answers = session.find_studies_by_date(plan.since)
        stats.windows = session.finds - before
        stats.requests = session.requests
    keep = set(kept)
    ours = [(str(ds.get("PatientID", "")), ds) for ds in answers if str(ds.get("PatientID", "")) in keep]
    stats.studies_found, upserted = record_studies(store, ours, stats, "date window")
    stats.studies_inserted = upserted.inserted
    stats.patients_to_check = store.settle_patient_studies(kept, plan.full)
    stats.series_to_check = len(store.studies_to_query_for_series(kept))
    store.record_discovery_pass(pacs, dicom_date(today), plan.full)
    stats.seconds = time.monotonic() - started
    return sorted(patient_key(pid) for pid in kept), stats


def discover_studies(client: PacsClient, store: StateStore, patient_ids: Sequence[str], every_patient: bool = False) -> StudyStats:
    """C-FIND the studies of each of these patients whose studies are outdated (every one of
    them with ``every_patient``), one request per patient, and upsert them."""
    started = time.monotonic()
    stats = StudyStats()
    targets = store.patients_to_query_for_studies(patient_ids, every_patient)
    answers: list[tuple[str, Dataset]] = []
    with client.session() as session:
        for row in targets:
            answers.extend((row.patient_id, ds) for ds in session.find_studies(row.patient_id))
        stats.requests = session.requests
    stats.found, upserted = record_studies(store, answers, stats, "studies of a patient")
    stats.kept = stats.found
    stats.inserted, stats.updated = upserted.inserted, upserted.updated
    store.mark_studies_discovered(targets)
    stats.patients_queried = len(targets)
    stats.studies_known = store.count_studies(patient_ids)
    stats.seconds = time.monotonic() - started
    return stats


def discover_series(client: PacsClient, store: StateStore, patient_ids: Sequence[str], every_study: bool = False) -> SeriesStats:
    """C-FIND the series of each study of these patients whose series are outdated (every
    known study with ``every_study``), one request per study, and upsert them."""
    started = time.monotonic()
    stats = SeriesStats()
    targets = store.studies_to_query_for_series(patient_ids, every_study)
    records: list[SeriesRecord] = []
    with client.session() as session:
        for study in targets:
            for ds in session.find_series(study.key):
                uid = _valid_uid(ds, "SeriesInstanceUID", f"study {study.key}", stats)
                if uid is not None:
                    records.append(_series_record(ds, uid, study.key, study.patient_id))
        stats.requests = session.requests
    stats.found = stats.kept = len(records)
    counts = store.upsert_series(records)
    stats.inserted, stats.updated = counts.inserted, counts.updated
    stats.reset_to_pending = counts.reset_to_pending
    store.mark_series_discovered(targets)
    stats.studies_queried = len(targets)
    stats.seconds = time.monotonic() - started
    return stats


def _series_record(ds: Dataset, uid: str, study_uid: str, patient_id: str) -> SeriesRecord:
    return SeriesRecord(
        series_instance_uid=uid,
        study_instance_uid=study_uid,
        patient_id=patient_id,
        series_number=integer(ds, "SeriesNumber"),
        modality=text(ds, "Modality"),
        series_description=text(ds, "SeriesDescription"),
        body_part_examined=text(ds, "BodyPartExamined"),
        institution_name=text(ds, "InstitutionName"),
        series_date=text(ds, "SeriesDate"),
        series_time=text(ds, "SeriesTime"),
        expected_instances=integer(ds, "NumberOfSeriesRelatedInstances"),
    )
