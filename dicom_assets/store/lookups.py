"""Reads of stored patients, studies and series: by key, per patient, counts, every series UID."""

from __future__ import annotations

from typing import Iterator, Sequence

import sqlalchemy as sa

from dicom_assets.store import tables as t
from dicom_assets.store.base import _SERIES_STATE_COLUMNS, BATCH_ROWS, StoreBase, _chunks, _series_state
from dicom_assets.store.discovery import _PATIENT_FIELDS, _STUDY_FIELDS
from dicom_assets.store.records import PatientRecord, SeriesState, StudyRecord


class LookupQueries(StoreBase):
    """Read-only lookups of patients, studies and series."""

    def patient_ids_for_keys(self, keys: Sequence[str]) -> dict[str, str]:
        """partition_key -> patient_id for the keys that exist."""
        out: dict[str, str] = {}
        with self._read() as conn:
            for chunk in _chunks(dict.fromkeys(keys), BATCH_ROWS):
                query = sa.select(t.patients.c.partition_key, t.patients.c.patient_id).where(
                    t.patients.c.partition_key.in_(chunk)
                )
                out.update({k: p for k, p in conn.execute(query)})
        return out

    def all_partition_keys(self) -> list[str]:
        """Every patient's partition key, sorted."""
        with self._read() as conn:
            query = sa.select(t.patients.c.partition_key).order_by(t.patients.c.partition_key)
            return list(conn.execute(query).scalars())

    def get_patient(self, patient_id: str) -> PatientRecord | None:
        """The patient's demographics, or None if unknown."""
        p = t.patients.c
        with self._read() as conn:
            row = conn.execute(
                sa.select(p.patient_id, *(p[f] for f in _PATIENT_FIELDS)).where(p.patient_id == patient_id)
            ).first()
        return PatientRecord(**row._mapping) if row else None

    def studies_of(self, patient_id: str) -> list[StudyRecord]:
        """The patient's studies, ordered by study_date then study uid."""
        s = t.studies.c
        query = (
            sa.select(s.study_instance_uid, s.patient_id, *(s[f] for f in _STUDY_FIELDS))
            .where(s.patient_id == patient_id)
            .order_by(s.study_date.nulls_last(), s.study_instance_uid)
        )
        with self._read() as conn:
            return [StudyRecord(**r._mapping) for r in conn.execute(query)]

    def series_of(self, patient_id: str) -> list[SeriesState]:
        """Ordered by study_date, study uid, series_number, series uid."""
        s = t.series.c
        query = (
            sa.select(*(s[c] for c in _SERIES_STATE_COLUMNS))
            .select_from(t.series.join(t.studies, t.series.c.study_instance_uid == t.studies.c.study_instance_uid))
            .where(s.patient_id == patient_id)
            .order_by(
                t.studies.c.study_date.nulls_last(),
                s.study_instance_uid,
                s.series_number.nulls_last(),
                s.series_instance_uid,
            )
        )
        with self._read() as conn:
            return [_series_state(r) for r in conn.execute(query)]

    def get_series(self, series_uid: str) -> SeriesState | None:
        """One series' state, or None if unknown."""
        s = t.series.c
        with self._read() as conn:
            row = conn.execute(
                sa.select(*(s[c] for c in _SERIES_STATE_COLUMNS)).where(s.series_instance_uid == series_uid)
            ).first()
        return _series_state(row) if row else None

    def count_studies(self, patient_ids: Sequence[str]) -> int:
        """How many studies of these patients the state DB knows."""
        st = t.studies.c
        total = 0
        with self._read() as conn:
            for chunk in _chunks(dict.fromkeys(patient_ids), BATCH_ROWS):
                total += conn.execute(sa.select(sa.func.count()).select_from(t.studies).where(st.patient_id.in_(chunk))).scalar_one()
        return total

    def all_series_uids(self) -> list[str]:
        """Every SeriesInstanceUID in the state DB (a list: for small DBs and tests)."""
        with self._read() as conn:
            return list(conn.execute(sa.select(t.series.c.series_instance_uid)).scalars())

    def iter_series_uids(self, chunk_rows: int = 50_000) -> Iterator[list[str]]:
        """Every SeriesInstanceUID in pages of at most ``chunk_rows``, in key order, so a million
        never sit in memory at once. Keyset pages over the primary key, each a short read of its
        own: no connection is held between pages, and a page is a plain fetch (SQLAlchemy's
        streamed rows cost 2.5 s per million here, the pages 1 s)."""
        if chunk_rows < 1:
            raise ValueError("chunk_rows must be >= 1")
        uid = t.series.c.series_instance_uid
        last: str | None = None
        while True:
            query = sa.select(uid).order_by(uid).limit(chunk_rows)
            if last is not None:
                query = query.where(uid > last)
            with self._read() as conn:
                page = list(conn.execute(query).scalars())
            if page:
                yield page
            if len(page) < chunk_rows:
                return
            last = page[-1]
