"""The request file's rows in the state DB: what each asks for, what it resolved to, its studies.

Rows are keyed by :attr:`dicom_assets.request_file.RequestRow.key` (what the row asks for, not
where it stands), so every worker on every machine sees one request and one answer per row, and
an unchanged file costs no query. A row that leaves the file stays, inactive: its studies stop
being fetched, nothing downloaded is deleted.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any, Iterable, Sequence

import sqlalchemy as sa

from dicom_assets.request_file import RequestRow
from dicom_assets.store import tables as t
from dicom_assets.store.base import BATCH_ROWS, StoreBase, _chunks, _utc


@dataclass(frozen=True)
class StoredRequestRow:
    """A request row as stored: its query fields, whether it is still in the file, its answer."""

    row_key: str
    row_number: int
    patient_id: str | None
    accession_number: str | None
    study_instance_uid: str | None
    study_date_from: str | None
    study_date_until: str | None
    modalities: tuple[str, ...] | None
    study_description: str | None
    active: bool
    resolution: str  # unresolved | found | not_found | ambiguous | rejected
    reason: str | None
    resolved_at: datetime | None


@dataclass(frozen=True)
class RowMatch:
    """One study a row matched (an ambiguous row's studies too; those are not fetched)."""

    row_key: str
    study_instance_uid: str
    patient_id: str


@dataclass(frozen=True)
class RowSync:
    """What changed when the file's rows were written: keys new to the state DB, keys back in
    the file after having left it, keys that left the file."""

    new: int
    reactivated: int
    deactivated: int
    active: int


@dataclass(frozen=True)
class StudySeries:
    """A series of a requested study, as the request report needs it."""

    study_instance_uid: str
    series_instance_uid: str
    patient_id: str
    modality: str | None
    download_status: str
    skip_reason: str | None
    expected_instances: int | None
    downloaded_instances: int
    downloaded_bytes: int
    last_error: str | None


def _stored_row(row: Any) -> StoredRequestRow:
    m = row._mapping
    return StoredRequestRow(
        row_key=m["row_key"],
        row_number=m["row_number"],
        patient_id=m["patient_id"],
        accession_number=m["accession_number"],
        study_instance_uid=m["study_instance_uid"],
        study_date_from=m["study_date_from"],
        study_date_until=m["study_date_until"],
        modalities=tuple(m["modalities"].split("\\")) if m["modalities"] else None,
        study_description=m["study_description"],
        active=bool(m["active"]),
        resolution=m["resolution"],
        reason=m["reason"],
        resolved_at=_utc(m["resolved_at"]),
    )


def _row_values(row: RequestRow) -> dict[str, Any]:
    return {
        "row_key": row.key,
        "row_number": row.row,
        "patient_id": row.patient_id,
        "accession_number": row.accession_number,
        "study_instance_uid": row.study_instance_uid,
        "study_date_from": row.study_date_from,
        "study_date_until": row.study_date_until,
        "modalities": "\\".join(sorted(row.modalities)) if row.modalities else None,
        "study_description": row.study_description.pattern if row.study_description else None,
    }


class RequestQueries(StoreBase):
    """The ``request_rows`` and ``request_row_studies`` tables."""

    def sync_request_rows(self, rows: Sequence[RequestRow]) -> RowSync:
        """Make the stored rows those of the file: insert new keys (unresolved), renumber and
        reactivate known ones, deactivate keys no longer in the file. Duplicate keys keep the
        first row's number. One transaction, so two workers reading the same file agree."""
        first: dict[str, RequestRow] = {}
        for row in rows:
            first.setdefault(row.key, row)
        r = t.request_rows.c
        new = reactivated = 0
        with self._write() as conn:
            known = {k: bool(a) for k, a in conn.execute(sa.select(r.row_key, r.active))}
            fresh = [_row_values(row) for key, row in first.items() if key not in known]
            for chunk in _chunks(fresh, BATCH_ROWS):
                conn.execute(sa.insert(t.request_rows), chunk)
            new = len(fresh)
            for key, row in first.items():
                if key in known:
                    reactivated += int(not known[key])
                    conn.execute(
                        sa.update(t.request_rows)
                        .where(r.row_key == key, sa.or_(r.row_number != row.row, r.active.is_(False)))
                        .values(row_number=row.row, active=True)
                    )
            gone = [k for k, active in known.items() if active and k not in first]
            for chunk in _chunks(gone, BATCH_ROWS):
                conn.execute(sa.update(t.request_rows).where(r.row_key.in_(chunk)).values(active=False))
        return RowSync(new=new, reactivated=reactivated, deactivated=len(gone), active=len(first))

    def request_rows(self, active_only: bool = True) -> list[StoredRequestRow]:
        """The stored rows in file order (by row number)."""
        r = t.request_rows.c
        query = sa.select(t.request_rows).order_by(r.row_number, r.row_key)
        if active_only:
            query = query.where(r.active.is_(True))
        with self._read() as conn:
            return [_stored_row(row) for row in conn.execute(query)]

    def request_rows_to_resolve(self, every_row: bool = False) -> list[StoredRequestRow]:
        """Active rows not yet resolved (every active row with ``every_row``: a full pass)."""
        return [row for row in self.request_rows() if every_row or row.resolution == "unresolved"]

    def record_row_resolution(
        self, row_key: str, resolution: str, reason: str | None, matches: Iterable[tuple[str, str]]
    ) -> None:
        """Store a row's answer and its matched (StudyInstanceUID, PatientID) pairs, replacing
        what an earlier resolution of the same row found."""
        pairs = {uid: pid for uid, pid in matches}
        r, m = t.request_rows.c, t.request_row_studies.c
        with self._write() as conn:
            conn.execute(sa.delete(t.request_row_studies).where(m.row_key == row_key))
            if pairs:
                conn.execute(
                    sa.insert(t.request_row_studies),
                    [{"row_key": row_key, "study_instance_uid": uid, "patient_id": pid} for uid, pid in pairs.items()],
                )
            conn.execute(
                sa.update(t.request_rows)
                .where(r.row_key == row_key)
                .values(resolution=resolution, reason=reason, resolved_at=self._now())
            )

    def request_row_matches(self, active_only: bool = True) -> list[RowMatch]:
        """Every (row, study) match, of active rows unless asked otherwise."""
        r, m = t.request_rows.c, t.request_row_studies.c
        query = sa.select(m.row_key, m.study_instance_uid, m.patient_id).join(
            t.request_rows, r.row_key == m.row_key
        )
        if active_only:
            query = query.where(r.active.is_(True))
        with self._read() as conn:
            return [RowMatch(*row) for row in conn.execute(query.order_by(r.row_number, m.study_instance_uid))]

    def requested_study_rows(self, patient_ids: Sequence[str] | None = None) -> dict[str, list[StoredRequestRow]]:
        """StudyInstanceUID -> the active, found rows that ask for it: what decides which series
        of a study are wanted (a row's modalities). Only these studies are fetched."""
        r, m = t.request_rows.c, t.request_row_studies.c
        query = (
            sa.select(m.study_instance_uid.label("matched_study"), t.request_rows)
            .join(t.request_rows, r.row_key == m.row_key)
            .where(r.active.is_(True), r.resolution == "found")
        )
        out: dict[str, list[StoredRequestRow]] = {}
        with self._read() as conn:
            if patient_ids is None:
                rows = list(conn.execute(query))
            else:
                rows = []
                for chunk in _chunks(list(patient_ids), BATCH_ROWS):
                    rows += conn.execute(query.where(m.patient_id.in_(chunk))).all()
        for row in rows:
            out.setdefault(row._mapping["matched_study"], []).append(_stored_row(row))
        return out

    def series_of_studies(self, study_uids: Sequence[str]) -> list[StudySeries]:
        """The series of these studies with where they stand: what a request row's answer is
        made of."""
        s = t.series.c
        cols = (
            s.study_instance_uid, s.series_instance_uid, s.patient_id, s.modality, s.download_status,
            s.skip_reason, s.expected_instances, s.downloaded_instances, s.downloaded_bytes, s.last_error,
        )  # fmt: skip
        out: list[StudySeries] = []
        with self._read() as conn:
            for chunk in _chunks(sorted(set(study_uids)), BATCH_ROWS):
                query = sa.select(*cols).where(s.study_instance_uid.in_(chunk)).order_by(s.study_instance_uid, s.series_number)
                out += [StudySeries(*row) for row in conn.execute(query)]
        return out
