"""State DB: tables, records and queries."""

from dicom_assets.store.records import (
    ArchiveCandidate,
    ArchiveRecord,
    PatientRecord,
    SeriesRecord,
    SeriesState,
    StudyRecord,
    UpsertCounts,
)
from dicom_assets.store.state import StateStore

__all__ = [
    "ArchiveCandidate",
    "ArchiveRecord",
    "PatientRecord",
    "SeriesRecord",
    "SeriesState",
    "StateStore",
    "StudyRecord",
    "UpsertCounts",
]
