"""Reporting: series status counts, patient archive counts, and the inventory query and its rows."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Iterator

import sqlalchemy as sa

from dicom_assets.store import tables as t
from dicom_assets.store.archives import ArchiveQueries
from dicom_assets.store.base import _utc

if TYPE_CHECKING:
    import pandas

_INT_INVENTORY_COLUMNS = (
    "series_number", "expected_instances", "downloaded_instances", "downloaded_bytes", "attempts", "network_faults",
    "transcoded_instances", "lossy_transcoded_instances",
)  # fmt: skip


class ReportQueries(ArchiveQueries):
    """Counts and the inventory (built on the archive subqueries of ArchiveQueries)."""

    def status_counts(self) -> dict[str, int]:
        """download_status -> number of series (every status present, zeros included)."""
        s = t.series.c
        out = dict.fromkeys(t.SERIES_STATUSES, 0)
        with self._read() as conn:
            for status, n in conn.execute(sa.select(s.download_status, sa.func.count()).group_by(s.download_status)):
                out[status] = n
        return out

    def patient_counts(self) -> dict[str, int]:
        """{'patients': n, 'archived': patients whose latest archive matches their held series
        count, 'pending': the rest, except patients whose every series is skipped (nothing to
        archive: patients - archived - pending)}."""
        counts = self._series_counts()
        latest = self._latest_archive_ids()
        a = t.archives.alias("a")
        archived_q = (
            sa.select(sa.func.count())
            .select_from(
                latest.join(a, a.c.archive_id == latest.c.archive_id).join(
                    counts, counts.c.patient_id == latest.c.patient_id
                )
            )
            .where(a.c.series_count == counts.c.n)
        )
        with self._read() as conn:
            total = conn.execute(sa.select(sa.func.count()).select_from(t.patients)).scalar_one()
            archived = conn.execute(archived_q).scalar_one()
            all_skipped = conn.execute(sa.select(sa.func.count()).select_from(counts).where(counts.c.n == 0)).scalar_one()
        return {"patients": total, "archived": archived, "pending": total - archived - all_skipped}

    def inventory_query(self) -> sa.Select:
        """The inventory SELECT (columns = dicom_assets.inventory.INVENTORY_COLUMNS, in order)."""
        p, st, se = t.patients.c, t.studies.c, t.series.c
        latest = self._latest_archive_ids(current_only=True)
        a = t.archives.alias("a")
        return (
            sa.select(
                p.patient_id,
                p.partition_key,
                p.patient_name,
                p.patient_sex,
                p.patient_birth_date,
                st.study_instance_uid,
                st.study_id,
                st.study_date,
                st.study_time,
                st.accession_number,
                st.study_description,
                st.modalities_in_study,
                se.series_instance_uid,
                se.series_number,
                se.modality,
                se.series_description,
                se.body_part_examined,
                se.institution_name,
                se.series_date,
                se.series_time,
                se.expected_instances,
                se.downloaded_instances,
                se.downloaded_bytes,
                se.download_status,
                se.attempts,
                se.last_error,
                se.downloaded_at,
                a.c.file_name.label("archive_name"),
                se.network_faults,
                se.transfer_syntaxes,
                se.transcoded_instances,
                se.lossy_transcoded_instances,
                se.skip_reason,
                se.deid_excluded_reason,
            )
            .select_from(
                t.series.join(t.studies, se.study_instance_uid == st.study_instance_uid)
                .join(t.patients, se.patient_id == p.patient_id)
                .outerjoin(latest, latest.c.patient_id == se.patient_id)
                .outerjoin(a, a.c.archive_id == latest.c.archive_id)
            )
            .order_by(
                se.patient_id,
                st.study_date.nulls_last(),
                st.study_instance_uid,
                se.series_number.nulls_last(),
                se.series_instance_uid,
            )
        )

    def iter_inventory_rows(self, chunk_rows: int = 10_000) -> Iterator[list[tuple[Any, ...]]]:
        """The inventory query's rows as tuples (columns: dicom_assets.inventory.INVENTORY_COLUMNS),
        in lists of at most ``chunk_rows``.

        One query (one snapshot), streamed through a server-side cursor on PostgreSQL, so memory
        is bounded by the chunk whatever the number of series. downloaded_at is aware UTC. Yields
        nothing when there are no series. Holds one connection until exhausted or closed.
        """
        if chunk_rows < 1:
            raise ValueError("chunk_rows must be >= 1")
        query = self.inventory_query()
        at = [c.name for c in query.selected_columns].index("downloaded_at")
        with self._read() as conn:
            if self.is_postgresql:  # psycopg then loads timestamps in datetime.timezone.utc, so
                conn.exec_driver_sql("SET LOCAL TimeZone = 'UTC'")  # _utc() needs no zone conversion
            result = conn.execution_options(yield_per=chunk_rows).execute(query)
            for part in result.partitions(chunk_rows):
                yield [(*row[:at], _utc(row[at]), *row[at + 1 :]) for row in part]

    def iter_inventory(self, chunk_rows: int = 50_000) -> Iterator["pandas.DataFrame"]:
        """iter_inventory_rows as DataFrames (for analysis; the CSV is written from the rows).

        Integer columns are pandas ``Int64`` (NULL-able), downloaded_at is UTC datetime64.
        """
        import pandas as pd

        columns = [c.name for c in self.inventory_query().selected_columns]
        for part in self.iter_inventory_rows(chunk_rows):
            if part:
                frame = pd.DataFrame.from_records(part, columns=columns)
                for name in _INT_INVENTORY_COLUMNS:
                    frame[name] = frame[name].astype("Int64")
                frame["downloaded_at"] = pd.to_datetime(frame["downloaded_at"], utc=True)
                yield frame
