"""Incremental discovery: the PACS's related counts, outdated marks, and per-PACS watermarks.

Discovery stores the NumberOf*Related* counts a C-FIND answer carries, marks the patients and
studies whose counts changed as outdated, asks again only about those, and clears the marks
compare-and-clear. A watermark records where the last complete pass over a PACS started.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any, Iterable, Sequence

import sqlalchemy as sa

from dicom_assets.store import tables as t
from dicom_assets.store.base import BATCH_ROWS, StoreBase, _chunks, _utc


@dataclass(frozen=True)
class RelatedCounts:
    """The computed counts a C-FIND answer carried for a patient or a study; None = not answered.

    ``studies`` is NumberOfPatientRelatedStudies (patients only); ``series`` and ``instances``
    are NumberOfPatientRelatedSeries/Instances or NumberOfStudyRelatedSeries/Instances. They are
    how discovery notices, without asking about every study, that something changed below.
    """

    studies: int | None = None
    series: int | None = None
    instances: int | None = None


@dataclass(frozen=True)
class OutdatedRow:
    """A patient whose studies, or a study whose series, must be asked for again.

    ``outdated_at`` is the stored mark exactly as read: handing it back to ``mark_*_discovered``
    clears the mark only if nothing outdated the row again meanwhile (None: not marked).
    """

    key: str  # PatientID or StudyInstanceUID
    patient_id: str
    outdated_at: datetime | None


@dataclass(frozen=True)
class DiscoveryWatermark:
    """Where incremental discovery of one PACS stands (table ``discovery_watermarks``)."""

    watermark: str  # DICOM DA: the local date the last complete pass started
    passed_at: datetime
    full_pass_at: datetime | None


#: RelatedCounts attribute -> column, per table.
_PATIENT_COUNT_COLUMNS = {"studies": "related_studies", "series": "related_series", "instances": "related_instances"}
_STUDY_COUNT_COLUMNS = {"series": "related_series", "instances": "related_instances"}


class IncrementalDiscoveryQueries(StoreBase):
    """Related counts, outdated marks and discovery watermarks."""

    def _record_counts(
        self,
        table: sa.Table,
        key: str,
        columns: dict[str, str],
        outdated_column: str,
        counts: Iterable[tuple[str, RelatedCounts]],
        unknown_outdates: bool,
    ) -> int:
        """Store the PACS's related counts of known rows; rows whose counts changed (or, with
        ``unknown_outdates``, came without any) get ``outdated_column`` = now. A count the PACS
        did not answer keeps the stored one. Rows that are not in the table are ignored.
        Returns how many rows were outdated."""
        outdated = 0
        key_col = table.c[key]
        stmt = (
            sa.update(table)
            .where(key_col == sa.bindparam("b_key"))
            .values(
                {
                    **{column: sa.func.coalesce(sa.bindparam(f"b_{column}", type_=sa.Integer), table.c[column]) for column in columns.values()},
                    outdated_column: self._now(),
                }
            )
        )
        for chunk in _chunks(counts, BATCH_ROWS):
            batch = dict(chunk)
            with self._write() as conn:
                query = sa.select(key_col, *(table.c[c] for c in columns.values())).where(key_col.in_(list(batch))).order_by(key_col)
                if self.is_postgresql:
                    query = query.with_for_update()
                changed = []
                for row in conn.execute(query):
                    new = {column: getattr(batch[row[0]], attr) for attr, column in columns.items()}
                    known = {column: value for column, value in new.items() if value is not None}
                    if any(row._mapping[c] != v for c, v in known.items()) if known else unknown_outdates:
                        changed.append({"b_key": row[0], **{f"b_{c}": v for c, v in new.items()}})
                if changed:
                    conn.execute(stmt, changed)
                    outdated += len(changed)
        return outdated

    def record_patient_counts(self, counts: dict[str, RelatedCounts]) -> int:
        """Store each known patient's NumberOfPatientRelated{Studies,Series,Instances}.

        A patient whose counts changed gets ``studies_outdated_at`` = now: something below it
        changed on the PACS. No counts at all changes nothing (such a PACS relies on full
        passes). Returns how many patients were outdated.
        """
        return self._record_counts(t.patients, "patient_id", _PATIENT_COUNT_COLUMNS, "studies_outdated_at", counts.items(), False)

    def record_study_counts(self, counts: dict[str, RelatedCounts]) -> int:
        """Store each known study's NumberOfStudyRelated{Series,Instances}.

        A study whose counts changed, or that came without counts (then nothing tells an
        unchanged study from a changed one), gets ``series_outdated_at`` = now. Returns how many.
        """
        return self._record_counts(t.studies, "study_instance_uid", _STUDY_COUNT_COLUMNS, "series_outdated_at", counts.items(), True)

    def settle_patient_studies(self, patient_ids: Sequence[str], full_pass: bool) -> int:
        """Clear the outdated mark of these patients when their stored studies account for the
        PACS's patient-level counts (number of studies, sums of the studies' related series and
        instances), or, after a full pass, when the PACS gave no patient-level counts.

        Called after a date-window pass: a patient whose change was a recent study is then fully
        known without a per-patient query. Returns how many of them stay outdated.
        """
        p, st = t.patients.c, t.studies.c
        remaining = 0
        for chunk in _chunks(dict.fromkeys(patient_ids), BATCH_ROWS):
            known = (
                sa.select(
                    st.patient_id,
                    sa.func.count().label("studies"),
                    sa.func.sum(st.related_series).label("series"),
                    sa.func.sum(st.related_instances).label("instances"),
                )
                .where(st.patient_id.in_(chunk))
                .group_by(st.patient_id)
                .subquery("known")
            )
            query = (
                sa.select(p.patient_id, p.related_studies, p.related_series, p.related_instances, known.c.studies, known.c.series, known.c.instances)
                .select_from(t.patients.outerjoin(known, known.c.patient_id == p.patient_id))
                .where(p.patient_id.in_(chunk), p.studies_outdated_at.is_not(None))
            )
            with self._write() as conn:
                settled = []
                for row in conn.execute(query):
                    pairs = [(row[1], row[4]), (row[2], row[5]), (row[3], row[6])]
                    answered = [(pacs, int(ours or 0)) for pacs, ours in pairs if pacs is not None]
                    if all(pacs == ours for pacs, ours in answered) if answered else full_pass:
                        settled.append(row[0])
                    else:
                        remaining += 1
                if settled:
                    conn.execute(sa.update(t.patients).where(p.patient_id.in_(settled)).values(studies_outdated_at=None))
        return remaining

    def patients_to_query_for_studies(self, patient_ids: Sequence[str], every_patient: bool = False) -> list[OutdatedRow]:
        """These patients whose studies are outdated (or all of them), in the order given."""
        p = t.patients.c
        found: dict[str, OutdatedRow] = {}
        with self._read() as conn:
            for chunk in _chunks(dict.fromkeys(patient_ids), BATCH_ROWS):
                query = sa.select(p.patient_id, p.studies_outdated_at).where(p.patient_id.in_(chunk))
                if not every_patient:
                    query = query.where(p.studies_outdated_at.is_not(None))
                found.update({pid: OutdatedRow(pid, pid, at) for pid, at in conn.execute(query)})
        return [found[pid] for pid in dict.fromkeys(patient_ids) if pid in found]

    def studies_to_query_for_series(self, patient_ids: Sequence[str], every_study: bool = False) -> list[OutdatedRow]:
        """The studies of these patients whose series are outdated (or all of them), ordered by
        patient, study date, study uid."""
        st = t.studies.c
        out: list[OutdatedRow] = []
        with self._read() as conn:
            for chunk in _chunks(sorted(set(patient_ids)), BATCH_ROWS):
                query = (
                    sa.select(st.study_instance_uid, st.patient_id, st.series_outdated_at)
                    .where(st.patient_id.in_(chunk))
                    .order_by(st.patient_id, st.study_date.nulls_last(), st.study_instance_uid)
                )
                if not every_study:
                    query = query.where(st.series_outdated_at.is_not(None))
                out.extend(OutdatedRow(uid, pid, at) for uid, pid, at in conn.execute(query))
        return out

    def _clear_outdated(self, table: sa.Table, key: str, column: str, rows: Iterable[OutdatedRow]) -> int:
        """Compare-and-clear: a mark set again after it was read (a later time) stays."""
        marked = [r for r in rows if r.outdated_at is not None]
        if not marked:
            return 0
        stmt = sa.update(table).where(
            table.c[key] == sa.bindparam("b_key"), table.c[column] <= sa.bindparam("b_at", type_=table.c[column].type)
        ).values({column: None})
        cleared = 0
        for chunk in _chunks(marked, BATCH_ROWS):
            with self._write() as conn:
                result = conn.execute(stmt, [{"b_key": r.key, "b_at": r.outdated_at} for r in chunk])
                cleared += max(result.rowcount, 0)
        return cleared

    def mark_studies_discovered(self, patients: Iterable[OutdatedRow]) -> int:
        """The studies of these patients were just asked for: clear their marks (as read)."""
        return self._clear_outdated(t.patients, "patient_id", "studies_outdated_at", patients)

    def mark_series_discovered(self, studies: Iterable[OutdatedRow]) -> int:
        """The series of these studies were just asked for: clear their marks (as read)."""
        return self._clear_outdated(t.studies, "study_instance_uid", "series_outdated_at", studies)

    def discovery_watermark(self, pacs_key: str) -> DiscoveryWatermark | None:
        """Where discovery of this PACS stands; None before its first complete pass."""
        w = t.discovery_watermarks.c
        with self._read() as conn:
            row = conn.execute(sa.select(w.watermark, w.passed_at, w.full_pass_at).where(w.pacs_key == pacs_key)).first()
        if row is None:
            return None
        return DiscoveryWatermark(watermark=row[0], passed_at=_utc(row[1]), full_pass_at=_utc(row[2]))  # type: ignore[arg-type]

    def record_discovery_pass(self, pacs_key: str, watermark: str, full_pass: bool) -> None:
        """A complete pass over this PACS ended: move its watermark (and its full-pass time)."""
        table = t.discovery_watermarks
        now = self._now()
        stmt = self._insert(table).values(pacs_key=pacs_key, watermark=watermark, passed_at=now, full_pass_at=now if full_pass else None)
        set_: dict[str, Any] = {"watermark": stmt.excluded.watermark, "passed_at": stmt.excluded.passed_at}
        if full_pass:
            set_["full_pass_at"] = stmt.excluded.full_pass_at
        with self._write() as conn:
            conn.execute(stmt.on_conflict_do_update(index_elements=[table.c.pacs_key], set_=set_))
