"""The state DB: every query the project makes, in one place (SQLAlchemy Core).

PostgreSQL in production (schema from schema.sql), SQLite as the embedded default, same code.
CONTRACT: signatures and semantics below are relied on by the pipeline; implementation TODO.
"""

from __future__ import annotations

from datetime import datetime
from typing import Iterable, Iterator, Sequence

import sqlalchemy as sa

from dicom_assets.store.records import (
    ArchiveCandidate,
    ArchiveRecord,
    PatientRecord,
    SeriesRecord,
    SeriesState,
    SeriesStatus,
    StudyRecord,
    UpsertCounts,
)


class StateStore:
    """Thread-safe handle on the state DB (one SQLAlchemy engine; each method is one transaction)."""

    def __init__(self, url: str) -> None:
        raise NotImplementedError

    @property
    def is_postgresql(self) -> bool:
        raise NotImplementedError

    def create_schema(self) -> None:
        """Idempotent. PostgreSQL: execute schema.sql. SQLite: tables.metadata.create_all + triggers."""
        raise NotImplementedError

    def dispose(self) -> None:
        raise NotImplementedError

    # -- discovery ---------------------------------------------------------------------------
    def upsert_patients(self, patients: Iterable[PatientRecord]) -> UpsertCounts:
        """Insert new patients (partition_key = layout.patient_key), update demographics of known ones."""
        raise NotImplementedError

    def upsert_studies(self, studies: Iterable[StudyRecord]) -> UpsertCounts:
        raise NotImplementedError

    def upsert_series(self, series: Iterable[SeriesRecord]) -> UpsertCounts:
        """Insert new series as 'pending'; update descriptive fields of known ones.

        A known series whose expected_instances changed (PACS gained instances) and that is
        'complete' goes back to 'pending' (counted in reset_to_pending). A NULL expected count
        from the PACS never overwrites a known one.
        """
        raise NotImplementedError

    def patient_ids_for_keys(self, keys: Sequence[str]) -> dict[str, str]:
        """partition_key -> patient_id for the keys that exist."""
        raise NotImplementedError

    def all_partition_keys(self) -> list[str]:
        raise NotImplementedError

    def get_patient(self, patient_id: str) -> PatientRecord | None:
        raise NotImplementedError

    def studies_of(self, patient_id: str) -> list[StudyRecord]:
        raise NotImplementedError

    def series_of(self, patient_id: str) -> list[SeriesState]:
        """Ordered by study_date, study uid, series_number, series uid."""
        raise NotImplementedError

    def get_series(self, series_uid: str) -> SeriesState | None:
        raise NotImplementedError

    # -- retrieval ---------------------------------------------------------------------------
    def claim_next_series(self, patient_ids: Sequence[str], worker: str, lease_s: float) -> SeriesState | None:
        """Atomically claim one retrievable series of these patients for ``worker``.

        Retrievable: status pending/incomplete/failed, or in_progress with claim_expires_at in
        the past (a crashed claimer). PostgreSQL: SELECT ... FOR UPDATE SKIP LOCKED LIMIT 1,
        then UPDATE. Sets status in_progress, claimed_by, claim_expires_at = now + lease,
        attempts + 1. Returns the claimed row (after update) or None.
        """
        raise NotImplementedError

    def extend_claim(self, series_uid: str, worker: str, lease_s: float) -> bool:
        raise NotImplementedError

    def finish_series(
        self,
        series_uid: str,
        worker: str,
        status: SeriesStatus,
        downloaded_instances: int,
        downloaded_bytes: int,
        error: str | None = None,
        expected_instances: int | None = None,
    ) -> bool:
        """Record the outcome of an attempt and release the claim (only if ``worker`` holds it).

        expected_instances, when given, replaces the stored count (learned at IMAGE level).
        Sets downloaded_at when status is complete; clears last_error then.
        Returns False if the claim was lost (expired and taken by another worker).
        """
        raise NotImplementedError

    def release_expired_claims(self) -> int:
        """Set in_progress series with an expired claim back to 'incomplete'. Returns how many."""
        raise NotImplementedError

    # -- archive -----------------------------------------------------------------------------
    def record_archive(self, archive: ArchiveRecord) -> ArchiveRecord:
        """Insert the archive and mark older archives of the patient superseded (same transaction)."""
        raise NotImplementedError

    def mark_archive_removed(self, archive_id: int) -> None:
        raise NotImplementedError

    def latest_archive(self, patient_id: str) -> ArchiveRecord | None:
        raise NotImplementedError

    def superseded_archives(self, patient_id: str) -> list[ArchiveRecord]:
        """Superseded archives of the patient whose file has not been removed yet."""
        raise NotImplementedError

    def archive_candidates(self, after_key: str | None = None, limit: int = 1000) -> list[ArchiveCandidate]:
        """Patients (ordered by partition_key, > after_key) with >= 1 series, every series complete,
        and no archive or a latest archive whose series_count differs from the current count."""
        raise NotImplementedError

    # -- reporting ---------------------------------------------------------------------------
    def status_counts(self) -> dict[str, int]:
        """download_status -> number of series (every status present, zeros included)."""
        raise NotImplementedError

    def patient_counts(self) -> dict[str, int]:
        """{'patients': n, 'archived': patients whose latest archive matches their series count,
        'pending': the rest}."""
        raise NotImplementedError

    def iter_inventory(self, chunk_rows: int = 50_000) -> Iterator["pandas.DataFrame"]:  # noqa: F821
        """One SQL query (series JOIN studies JOIN patients LEFT JOIN latest archive), read in chunks.
        Columns: see dicom_assets.inventory.INVENTORY_COLUMNS."""
        raise NotImplementedError
