"""Discovery writes: batched upserts of patients, studies and series as found on the PACS.

Incremental discovery's bookkeeping (related counts, outdated marks, watermarks) is in
:mod:`dicom_assets.store.incremental`; reads of what discovery stored in
:mod:`dicom_assets.store.lookups`.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Sequence

import sqlalchemy as sa

from dicom_assets import layout
from dicom_assets.store import tables as t
from dicom_assets.store.base import BATCH_ROWS, StoreBase, _chunks
from dicom_assets.store.records import PatientRecord, SeriesRecord, StudyRecord, UpsertCounts

_PATIENT_FIELDS = ("patient_name", "patient_sex", "patient_birth_date")
_STUDY_FIELDS = (
    "study_id",
    "study_date",
    "study_time",
    "accession_number",
    "study_description",
    "modalities_in_study",
    "sop_classes_in_study",
)
_SERIES_FIELDS = (
    "series_number",
    "modality",
    "series_description",
    "body_part_examined",
    "institution_name",
    "series_date",
    "series_time",
)


class DiscoveryQueries(StoreBase):
    """Insert-or-update of the patients, studies and series discovery finds."""

    def _upsert(
        self,
        table: sa.Table,
        key: str,
        rows: Iterable[dict[str, Any]],
        fields: Sequence[str],
        extra_set: Callable[[Any], dict[str, Any]] | None = None,
        resets: Callable[[dict[str, Any], Any], bool] | None = None,
    ) -> UpsertCounts:
        """Batched insert-or-update keyed on ``key``.

        ``fields`` are updated on known rows, a NULL incoming value keeping the stored one. Known
        rows whose fields would not change are not written at all (their date_modified stays).
        ``resets(row, existing)`` says whether a known row goes back to pending (series only).
        Counts come from a SELECT of the batch's existing keys (locked FOR UPDATE on PostgreSQL).
        """
        inserted = updated = reset = 0
        for chunk in _chunks(rows, BATCH_ROWS):
            batch: dict[Any, dict[str, Any]] = {}
            for row in chunk:  # a key twice in one statement is an error on PostgreSQL: last wins
                batch[row[key]] = row
            try:
                counts = self._upsert_batch(table, key, batch, fields, extra_set, resets)
            except sa.exc.IntegrityError:
                # Two processes inserting the same new row: ON CONFLICT arbitrates on ``key`` only,
                # so the loser may trip over another unique column (patients.partition_key) first.
                # Its transaction rolled back; the winner's row is committed now, so once more
                # the batch finds it and updates it.
                counts = self._upsert_batch(table, key, batch, fields, extra_set, resets)
            inserted, updated, reset = inserted + counts[0], updated + counts[1], reset + counts[2]
        return UpsertCounts(inserted=inserted, updated=updated, reset_to_pending=reset)

    def _upsert_batch(
        self,
        table: sa.Table,
        key: str,
        batch: dict[Any, dict[str, Any]],
        fields: Sequence[str],
        extra_set: Callable[[Any], dict[str, Any]] | None,
        resets: Callable[[dict[str, Any], Any], bool] | None,
    ) -> tuple[int, int, int]:
        """One transaction of :meth:`_upsert`: (inserted, updated, reset to pending)."""
        inserted = updated = reset = 0
        key_col = table.c[key]
        extra_cols = ("download_status", "downloaded_instances", "expected_instances") if resets else ()
        read_cols = [key_col, *(table.c[f] for f in dict.fromkeys((*fields, *extra_cols)))]
        with self._write() as conn:
            query = sa.select(*read_cols).where(key_col.in_(list(batch))).order_by(key_col)
            if self.is_postgresql:
                query = query.with_for_update()
            existing = {r[0]: r._mapping for r in conn.execute(query)}
            to_write = []
            for k, row in sorted(batch.items()):  # key order: concurrent upserts lock alike
                old = existing.get(k)
                if old is None:
                    inserted += 1
                    to_write.append(row)
                    continue
                is_reset = bool(resets and resets(row, old))
                changed = any(row[f] is not None and row[f] != old[f] for f in fields)
                if is_reset or changed:
                    updated += 1
                    reset += is_reset
                    to_write.append(row)
            if to_write:
                stmt = self._insert(table)
                set_ = {f: sa.func.coalesce(stmt.excluded[f], table.c[f]) for f in fields}
                if extra_set:
                    set_.update(extra_set(stmt.excluded))
                conn.execute(stmt.on_conflict_do_update(index_elements=[key_col], set_=set_), to_write)
        return inserted, updated, reset

    def upsert_patients(self, patients: Iterable[PatientRecord]) -> UpsertCounts:
        """Insert new patients (partition_key = layout.patient_key), update demographics of known ones.

        A NULL demographic never overwrites a known value. ``updated`` counts known patients
        whose stored values changed (unchanged ones are not written).
        """
        rows = (
            {
                "patient_id": p.patient_id,
                "partition_key": layout.patient_key(p.patient_id),
                **{f: getattr(p, f) for f in _PATIENT_FIELDS},
            }
            for p in patients
        )
        return self._upsert(t.patients, "patient_id", rows, _PATIENT_FIELDS)

    def upsert_studies(self, studies: Iterable[StudyRecord]) -> UpsertCounts:
        """Insert new studies, update descriptive fields of known ones (NULL never overwrites).

        The patient of a known study is not changed. ``updated`` counts studies that changed.
        """
        rows = (
            {
                "study_instance_uid": s.study_instance_uid,
                "patient_id": s.patient_id,
                **{f: getattr(s, f) for f in _STUDY_FIELDS},
            }
            for s in studies
        )
        return self._upsert(t.studies, "study_instance_uid", rows, _STUDY_FIELDS)

    def upsert_series(self, series: Iterable[SeriesRecord]) -> UpsertCounts:
        """Insert new series as 'pending'; update descriptive fields of known ones.

        A known series whose expected_instances changed (PACS gained instances) and that is
        'complete' goes back to 'pending' (counted in reset_to_pending). A NULL expected count
        from the PACS never overwrites a known one. "Changed" compares with the stored expected
        count, or with downloaded_instances when none is stored. The study and patient of a
        known series are not changed. ``updated`` counts series that changed.
        """
        s = t.series
        rows = (
            {
                "series_instance_uid": r.series_instance_uid,
                "study_instance_uid": r.study_instance_uid,
                "patient_id": r.patient_id,
                "expected_instances": r.expected_instances,
                **{f: getattr(r, f) for f in _SERIES_FIELDS},
            }
            for r in series
        )

        def resets(row: dict[str, Any], old: Any) -> bool:
            new = row["expected_instances"]
            known = old["expected_instances"] if old["expected_instances"] is not None else old["downloaded_instances"]
            return old["download_status"] == "complete" and new is not None and new != known

        def extra_set(excluded: Any) -> dict[str, Any]:
            changed = sa.and_(
                s.c.download_status == "complete",
                excluded.expected_instances.is_not(None),
                excluded.expected_instances != sa.func.coalesce(s.c.expected_instances, s.c.downloaded_instances),
            )
            return {"download_status": sa.case((changed, "pending"), else_=s.c.download_status)}

        return self._upsert(
            s,
            "series_instance_uid",
            rows,
            (*_SERIES_FIELDS, "expected_instances"),
            extra_set=extra_set,
            resets=resets,
        )
