"""Discovery: which patients, studies and series the PACS has, recorded in the state DB.

Patients are kept only when the selection rule accepts them. A rule that raises on one patient
is logged and that patient skipped; it never stops discovery.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from pydicom.dataset import Dataset

from dicom_assets.layout import UnsafeNameError, check_uid, patient_key
from dicom_assets.pacs.client import PacsClient, integer, text
from dicom_assets.store import PatientRecord, SeriesRecord, StateStore, StudyRecord

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


def _select(rule: Callable[[Dataset], Any], identifier: Dataset, stats: DiscoveryStats) -> bool:
    pid = str(identifier.get("PatientID", ""))
    try:
        patient_key(pid)
        return bool(rule(identifier))
    except UnsafeNameError as exc:
        log.warning("skipping patient %r: %s", pid, exc)
    except Exception as exc:  # noqa: BLE001 - a user rule must never kill the run
        log.warning("selection rule raised on patient %r, skipping it: %r", pid, exc)
    stats.skipped.append(pid)
    return False


def discover_patients(client: PacsClient, store: StateStore, rule: Callable[[Dataset], Any]) -> tuple[list[str], DiscoveryStats]:
    """C-FIND every patient, keep those the rule accepts, upsert them; returns their keys."""
    started = time.monotonic()
    stats = DiscoveryStats()
    with client.session() as session:
        found = session.find_patients()
        stats.requests = session.requests
    stats.found = len(found)
    records: dict[str, PatientRecord] = {}
    for ds in found:
        if _select(rule, ds, stats):
            pid = str(ds.get("PatientID", ""))
            records[pid] = PatientRecord(
                patient_id=pid,
                patient_name=text(ds, "PatientName"),
                patient_sex=text(ds, "PatientSex"),
                patient_birth_date=text(ds, "PatientBirthDate"),
            )
    stats.kept = len(records)
    counts = store.upsert_patients(records.values())
    stats.inserted, stats.updated = counts.inserted, counts.updated
    stats.seconds = time.monotonic() - started
    return sorted(patient_key(pid) for pid in records), stats


def _valid_uid(ds: Dataset, keyword: str, where: str, stats: DiscoveryStats) -> str | None:
    """The identifier's UID if it is safe to use as a path component; else log, count, None."""
    raw = str(ds.get(keyword, ""))
    try:
        return check_uid(raw, keyword)
    except UnsafeNameError as exc:
        log.warning("%s: ignoring a result: %s", where, exc)
        stats.skipped.append(raw)
        return None


def discover_studies(client: PacsClient, store: StateStore, patient_ids: Sequence[str]) -> DiscoveryStats:
    """C-FIND the studies of each patient (one request per patient) and upsert them."""
    started = time.monotonic()
    stats = DiscoveryStats()
    records: list[StudyRecord] = []
    with client.session() as session:
        for pid in patient_ids:
            for ds in session.find_studies(pid):
                uid = _valid_uid(ds, "StudyInstanceUID", f"patient {pid!r}", stats)
                if uid is None:
                    continue
                records.append(
                    StudyRecord(
                        study_instance_uid=uid,
                        patient_id=pid,
                        study_id=text(ds, "StudyID"),
                        study_date=text(ds, "StudyDate"),
                        study_time=text(ds, "StudyTime"),
                        accession_number=text(ds, "AccessionNumber"),
                        study_description=text(ds, "StudyDescription"),
                        modalities_in_study=text(ds, "ModalitiesInStudy"),
                    )
                )
        stats.requests = session.requests
    stats.found = stats.kept = len(records)
    counts = store.upsert_studies(records)
    stats.inserted, stats.updated = counts.inserted, counts.updated
    stats.seconds = time.monotonic() - started
    return stats


def discover_series(client: PacsClient, store: StateStore, patient_ids: Sequence[str]) -> DiscoveryStats:
    """C-FIND the series of every known study of each patient (one request per study)."""
    started = time.monotonic()
    stats = DiscoveryStats()
    records: list[SeriesRecord] = []
    with client.session() as session:
        for pid in patient_ids:
            for study in store.studies_of(pid):
                for ds in session.find_series(study.study_instance_uid):
                    uid = _valid_uid(ds, "SeriesInstanceUID", f"study {study.study_instance_uid}", stats)
                    if uid is None:
                        continue
                    records.append(_series_record(ds, uid, study.study_instance_uid, pid))
        stats.requests = session.requests
    stats.found = stats.kept = len(records)
    counts = store.upsert_series(records)
    stats.inserted, stats.updated = counts.inserted, counts.updated
    stats.reset_to_pending = counts.reset_to_pending
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
