"""Archive records: recording archives, removal and publication marks, latest/superseded, candidates."""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa

from dicom_assets.store import tables as t
from dicom_assets.store.base import StoreBase, _utc
from dicom_assets.store.records import ArchiveCandidate, ArchiveRecord


def _archive_record(row: Any) -> ArchiveRecord:
    m = row._mapping
    return ArchiveRecord(
        patient_id=m["patient_id"],
        file_name=m["file_name"],
        series_count=m["series_count"],
        instance_count=m["instance_count"],
        bytes=m["bytes"],
        sha256=m["sha256"],
        archive_id=m["archive_id"],
        created_at=_utc(m["date_created"]),
        superseded_at=_utc(m["superseded_at"]),
        removed_at=_utc(m["removed_at"]),
        published_to=m["published_to"],
        published_at=_utc(m["published_at"]),
    )


class ArchiveQueries(StoreBase):
    """The ``archives`` table, and which patients are due a (new) archive."""

    def record_archive(self, archive: ArchiveRecord) -> ArchiveRecord:
        """Insert the archive and mark older archives of the patient superseded (same transaction).

        Returns the stored record (archive_id and created_at filled in).
        """
        a = t.archives.c
        with self._write() as conn:
            if self.is_postgresql:  # serialise concurrent recorders of one patient
                conn.execute(
                    sa.select(t.patients.c.patient_id)
                    .where(t.patients.c.patient_id == archive.patient_id)
                    .with_for_update()
                )
            conn.execute(
                sa.update(t.archives)
                .where(a.patient_id == archive.patient_id, a.superseded_at.is_(None))
                .values(superseded_at=self._now())
            )
            row = conn.execute(
                sa.insert(t.archives)
                .values(
                    patient_id=archive.patient_id,
                    file_name=archive.file_name,
                    series_count=archive.series_count,
                    instance_count=archive.instance_count,
                    bytes=archive.bytes,
                    sha256=archive.sha256,
                )
                .returning(*t.archives.c)
            ).one()
        return _archive_record(row)

    def mark_archive_removed(self, archive_id: int) -> None:
        """Record that a superseded archive's file was deleted."""
        a = t.archives.c
        with self._write() as conn:
            conn.execute(
                sa.update(t.archives)
                .where(a.archive_id == archive_id, a.removed_at.is_(None))
                .values(removed_at=self._now())
            )

    def mark_archive_published(self, archive_id: int, destination: str) -> None:
        """Record that the archive was copied to ``destination`` and verified there."""
        with self._write() as conn:
            conn.execute(
                sa.update(t.archives)
                .where(t.archives.c.archive_id == archive_id)
                .values(published_to=destination, published_at=self._now())
            )

    def latest_archive(self, patient_id: str) -> ArchiveRecord | None:
        """The patient's most recent archive record, or None."""
        a = t.archives.c
        query = sa.select(t.archives).where(a.patient_id == patient_id).order_by(a.archive_id.desc()).limit(1)
        with self._read() as conn:
            row = conn.execute(query).first()
        return _archive_record(row) if row else None

    def superseded_archives(self, patient_id: str) -> list[ArchiveRecord]:
        """Superseded archives of the patient whose file has not been removed yet (oldest first)."""
        a = t.archives.c
        query = (
            sa.select(t.archives)
            .where(a.patient_id == patient_id, a.superseded_at.is_not(None), a.removed_at.is_(None))
            .order_by(a.archive_id)
        )
        with self._read() as conn:
            return [_archive_record(r) for r in conn.execute(query)]

    @staticmethod
    def _series_counts() -> sa.Subquery:
        """Per patient: ``n`` = series held (every series but the skipped ones: what the zip's
        ``<N>`` counts), ``not_complete`` = held series not complete yet."""
        s = t.series.c
        return (
            sa.select(
                s.patient_id,
                sa.func.sum(sa.case((s.download_status == "skipped", 0), else_=1)).label("n"),
                sa.func.sum(sa.case((s.download_status.in_(("complete", "skipped")), 0), else_=1)).label("not_complete"),
            )
            .group_by(s.patient_id)
            .subquery("counts")
        )

    @staticmethod
    def _latest_archive_ids(current_only: bool = False) -> sa.Subquery:
        a = t.archives.c
        query = sa.select(a.patient_id, sa.func.max(a.archive_id).label("archive_id")).group_by(a.patient_id)
        if current_only:
            query = query.where(a.superseded_at.is_(None))
        return query.subquery("latest")

    def archive_candidates(self, after_key: str | None = None, limit: int = 1000) -> list[ArchiveCandidate]:
        """Patients (ordered by partition_key, > after_key) with >= 1 held series (not skipped),
        every held series complete, and no archive or a latest archive whose series_count differs
        from the held count (so skipping or unskipping series rebuilds the zip; a patient whose
        series are all skipped gets none)."""
        p = t.patients.c
        counts = self._series_counts()
        latest = self._latest_archive_ids()
        a = t.archives.alias("a")
        query = (
            sa.select(p.patient_id, p.partition_key, counts.c.n, a.c.series_count)
            .select_from(
                t.patients.join(counts, counts.c.patient_id == p.patient_id)
                .outerjoin(latest, latest.c.patient_id == p.patient_id)
                .outerjoin(a, a.c.archive_id == latest.c.archive_id)
            )
            .where(
                counts.c.n > 0,
                counts.c.not_complete == 0,
                sa.or_(a.c.archive_id.is_(None), a.c.series_count != counts.c.n),
            )
            .order_by(p.partition_key)
            .limit(limit)
        )
        if after_key is not None:
            query = query.where(p.partition_key > after_key)
        with self._read() as conn:
            return [
                ArchiveCandidate(patient_id=r[0], partition_key=r[1], series_count=r[2], archived_series_count=r[3])
                for r in conn.execute(query)
            ]
