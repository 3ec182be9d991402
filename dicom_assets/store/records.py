"""Plain records exchanged between the PACS client, the state store and the pipeline steps."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Literal

SeriesStatus = Literal["pending", "in_progress", "complete", "incomplete", "failed", "skipped"]
#: What a retrieval claim may take. Never ``skipped``: a series the series filters (or the request
#: file) do not want is not fetched (dicom_assets.series_filter).
RETRIEVABLE: tuple[SeriesStatus, ...] = ("pending", "incomplete", "failed")


@dataclass(frozen=True)
class PatientRecord:
    patient_id: str
    patient_name: str | None = None
    patient_sex: str | None = None
    patient_birth_date: str | None = None


@dataclass(frozen=True)
class StudyRecord:
    study_instance_uid: str
    patient_id: str
    study_id: str | None = None
    study_date: str | None = None
    study_time: str | None = None
    accession_number: str | None = None
    study_description: str | None = None
    modalities_in_study: str | None = None
    sop_classes_in_study: str | None = None  # SOPClassesInStudy, backslash-separated


@dataclass(frozen=True)
class SeriesRecord:
    """What discovery learns about a series from the PACS."""

    series_instance_uid: str
    study_instance_uid: str
    patient_id: str
    series_number: int | None = None
    modality: str | None = None
    series_description: str | None = None
    body_part_examined: str | None = None
    institution_name: str | None = None
    series_date: str | None = None
    series_time: str | None = None
    expected_instances: int | None = None


@dataclass(frozen=True)
class SeriesState:
    """A series row as the state DB holds it (discovery fields plus download state)."""

    series_instance_uid: str
    study_instance_uid: str
    patient_id: str
    series_number: int | None
    modality: str | None
    series_description: str | None
    expected_instances: int | None
    downloaded_instances: int
    downloaded_bytes: int
    download_status: SeriesStatus
    attempts: int  # attempts that brought nothing new and ended in an answer of the PACS
    last_error: str | None
    claimed_by: str | None
    claim_expires_at: datetime | None
    network_faults: int = 0  # attempts that brought nothing new and broke on the connection
    transfer_syntaxes: str | None = None  # as received, distinct, backslash-separated (store.instances)
    transcoded_instances: int = 0  # received in another syntax than the PACS stores them in
    lossy_transcoded_instances: int = 0  # ... lossy-compressed from a lossless original
    skip_reason: str | None = None  # why the series is 'skipped' (dicom_assets.series_filter)


@dataclass(frozen=True)
class ArchiveRecord:
    patient_id: str
    file_name: str
    series_count: int
    instance_count: int
    bytes: int
    sha256: str
    archive_id: int | None = None
    created_at: datetime | None = None
    superseded_at: datetime | None = None
    removed_at: datetime | None = None
    published_to: str | None = None
    published_at: datetime | None = None


@dataclass(frozen=True)
class UpsertCounts:
    inserted: int = 0
    updated: int = 0
    reset_to_pending: int = 0  # complete series whose PACS instance count changed


@dataclass(frozen=True)
class ArchiveCandidate:
    """A patient whose series are all complete and whose latest archive has another series count."""

    patient_id: str
    partition_key: str
    series_count: int
    archived_series_count: int | None
