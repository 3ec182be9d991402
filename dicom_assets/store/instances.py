"""Instances as received: one row per instance file written, and the series' summary of them.

The transfer syntax an instance arrived in is what is in its file; next to the syntax the PACS
says it stores it in (when it says), it shows which instances a PACS transcoded on the way.
The series row keeps the summary (distinct syntaxes, transcoded and lossy-transcoded counts) so
the inventory of a million series needs no join with the instances.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql as pg

from dicom_assets.pacs.syntaxes import is_lossy
from dicom_assets.store import tables as t
from dicom_assets.store.base import BATCH_ROWS, StoreBase, _chunks


@dataclass(frozen=True)
class ReceivedSummary:
    """A series' instances as received, over every retrieve so far."""

    transfer_syntaxes: tuple[str, ...]
    transcoded: int
    lossy_transcoded: int


#: What an instance written again replaces in its row (``received_at`` stays the first arrival).
_REPLACED = ("series_instance_uid", "sop_class_uid", "transfer_syntax_uid", "stored_transfer_syntax_uid", "bytes")

_UPSERT_ARRAYS = sa.text(
    "INSERT INTO instances (sop_instance_uid, series_instance_uid, sop_class_uid, transfer_syntax_uid,"
    " stored_transfer_syntax_uid, bytes)"
    " SELECT r.uid, :series, r.sop_class, r.syntax, r.stored, r.size"
    " FROM unnest(CAST(:uids AS text[]), CAST(:classes AS text[]), CAST(:syntaxes AS text[]),"
    " CAST(:stored AS text[]), CAST(:sizes AS bigint[])) AS r(uid, sop_class, syntax, stored, size)"
    " ON CONFLICT (sop_instance_uid) DO UPDATE SET "
    + ", ".join(f"{c} = EXCLUDED.{c}" for c in _REPLACED)
).bindparams(
    sa.bindparam("uids", type_=pg.ARRAY(sa.Text)), sa.bindparam("classes", type_=pg.ARRAY(sa.Text)),
    sa.bindparam("syntaxes", type_=pg.ARRAY(sa.Text)), sa.bindparam("stored", type_=pg.ARRAY(sa.Text)),
    sa.bindparam("sizes", type_=pg.ARRAY(sa.BigInteger)),
)


class InstanceQueries(StoreBase):
    """Rows of ``instances`` and the series' summary columns built from them."""

    def record_instances(
        self,
        series_uid: str,
        arrived: Mapping[str, tuple[str, str, int]],
        stored: Mapping[str, str | None],
    ) -> ReceivedSummary:
        """Record the instances one retrieve wrote (SOP UID -> (SOP class, syntax, bytes)) with
        the syntax the PACS stores each in (``stored``; missing/None: not said), then refresh and
        return the series' summary. An instance written again replaces its row."""
        with self._write() as conn:
            if self.is_postgresql:
                self._upsert_arrays(conn, series_uid, arrived, stored)
            else:
                self._upsert_rows(conn, series_uid, arrived, stored)
            summary = self._summary(conn, series_uid)
            conn.execute(
                sa.update(t.series).where(t.series.c.series_instance_uid == series_uid).values(
                    transfer_syntaxes="\\".join(summary.transfer_syntaxes) or None,
                    transcoded_instances=summary.transcoded, lossy_transcoded_instances=summary.lossy_transcoded,
                )
            )  # fmt: skip
        return summary

    @staticmethod
    def _upsert_arrays(
        conn: sa.Connection, series_uid: str, arrived: Mapping[str, tuple[str, str, int]], stored: Mapping[str, str | None]
    ) -> None:
        """PostgreSQL: one statement with a column per array, whatever the number of instances.

        A multi-row VALUES is compiled by SQLAlchemy afresh for every row count: ~50 ms for a
        130-instance series, paid between two series by the worker that retrieves them (a third
        of the gap between series in the one-association benchmark); this statement is compiled
        once and takes a few ms.
        """
        uids = list(arrived)
        conn.execute(_UPSERT_ARRAYS, {
            "series": series_uid,
            "uids": uids,
            "classes": [arrived[u][0] or None for u in uids],
            "syntaxes": [arrived[u][1] for u in uids],
            "stored": [stored.get(u) for u in uids],
            "sizes": [arrived[u][2] for u in uids],
        })  # fmt: skip

    def _upsert_rows(
        self, conn: sa.Connection, series_uid: str, arrived: Mapping[str, tuple[str, str, int]], stored: Mapping[str, str | None]
    ) -> None:
        """Any database: multi-row INSERT ... ON CONFLICT in batches."""
        i = t.instances.c
        rows = [
            {"sop_instance_uid": uid, "series_instance_uid": series_uid, "sop_class_uid": sop_class or None,
             "transfer_syntax_uid": syntax, "stored_transfer_syntax_uid": stored.get(uid), "bytes": size}
            for uid, (sop_class, syntax, size) in arrived.items()
        ]  # fmt: skip
        for chunk in _chunks(rows, BATCH_ROWS):
            stmt = self._insert(t.instances).values(chunk)
            replace = {c: stmt.excluded[c] for c in _REPLACED}
            conn.execute(stmt.on_conflict_do_update(index_elements=[i.sop_instance_uid], set_=replace))

    @staticmethod
    def _summary(conn: sa.Connection, series_uid: str) -> ReceivedSummary:
        i = t.instances.c
        rows = conn.execute(
            sa.select(i.transfer_syntax_uid, i.stored_transfer_syntax_uid, sa.func.count())
            .where(i.series_instance_uid == series_uid)
            .group_by(i.transfer_syntax_uid, i.stored_transfer_syntax_uid)
        ).all()
        transcoded = sum(n for got, stored, n in rows if stored and got != stored)
        lossy = sum(n for got, stored, n in rows if stored and got != stored and is_lossy(got) and not is_lossy(stored))
        return ReceivedSummary(tuple(sorted({got for got, _s, _n in rows})), transcoded, lossy)

    def instances_of(self, series_uid: str) -> list[dict[str, Any]]:
        """The recorded instances of a series (for reports and tests), by SOP Instance UID."""
        i = t.instances.c
        query = sa.select(t.instances).where(i.series_instance_uid == series_uid).order_by(i.sop_instance_uid)
        with self._read() as conn:
            return [dict(row._mapping) for row in conn.execute(query)]
