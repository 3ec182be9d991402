"""De-identified copies in the state DB: the crosswalk (pseudonyms) and the de-identified zips.

The pseudonym and date shift of a patient are computed from the secret (dicom_assets.deid.keys),
so every worker computes the same ones; they are stored all the same, because two patients can
draw the same pseudonym (prefix + a few digits of an HMAC) and the first one stored keeps it for
ever, and because the honest broker needs the crosswalk to answer "who is ANON01234567?".
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any, Callable, Mapping

import sqlalchemy as sa

from dicom_assets.store import tables as t
from dicom_assets.store.base import BATCH_ROWS, StoreBase, _chunks, _utc

#: How many HMAC pseudonyms to try for one patient before giving up (each collides with a
#: probability of patients / 10**digits; 100 in a row means the digits are far too few).
MAX_PSEUDONYM_ATTEMPTS = 100


@dataclass(frozen=True)
class Pseudonym:
    """A crosswalk row: who the pseudonym stands for and how far their dates moved."""

    patient_id: str
    pseudonym: str
    date_shift_days: int
    attempt: int = 0
    created_at: datetime | None = None


@dataclass(frozen=True)
class DeidentifiedArchive:
    """One de-identified zip as recorded."""

    patient_id: str
    source_archive_id: int
    file_name: str
    series_count: int
    excluded_series: int
    instance_count: int
    bytes: int
    sha256: str
    archive_id: int | None = None
    created_at: datetime | None = None
    superseded_at: datetime | None = None
    published_to: str | None = None


@dataclass(frozen=True)
class DeidCandidate:
    """A patient whose current identifiable archive has no de-identified copy yet."""

    patient_id: str
    partition_key: str
    archive_id: int


class PseudonymCollision(RuntimeError):
    """No free pseudonym after MAX_PSEUDONYM_ATTEMPTS: deidentify.pseudonym_digits is too small."""


def _pseudonym(row: Any) -> Pseudonym:
    m = row._mapping
    return Pseudonym(m["patient_id"], m["pseudonym"], m["date_shift_days"], m["attempt"], _utc(m["date_created"]))


def _deid_archive(row: Any) -> DeidentifiedArchive:
    m = row._mapping
    return DeidentifiedArchive(
        patient_id=m["patient_id"], source_archive_id=m["source_archive_id"], file_name=m["file_name"],
        series_count=m["series_count"], excluded_series=m["excluded_series"], instance_count=m["instance_count"],
        bytes=m["bytes"], sha256=m["sha256"], archive_id=m["archive_id"], created_at=_utc(m["date_created"]),
        superseded_at=_utc(m["superseded_at"]), published_to=m["published_to"],
    )  # fmt: skip


class DeidQueries(StoreBase):
    """The ``pseudonyms`` and ``deidentified_archives`` tables, and series exclusions."""

    def pseudonym_for(self, patient_id: str, make: Callable[[int], str], date_shift_days: int) -> Pseudonym:
        """The patient's stored pseudonym, or a new one: ``make(attempt)`` for attempt 0, 1, ...
        until one is free (concurrent workers agree: the insert is the arbiter)."""
        p = t.pseudonyms.c
        for attempt in range(MAX_PSEUDONYM_ATTEMPTS):
            with self._write() as conn:
                found = conn.execute(sa.select(t.pseudonyms).where(p.patient_id == patient_id)).first()
                if found is not None:
                    return _pseudonym(found)
                candidate = make(attempt)
                inserted = conn.execute(
                    self._insert(t.pseudonyms)
                    .values(patient_id=patient_id, pseudonym=candidate, date_shift_days=date_shift_days, attempt=attempt)
                    .on_conflict_do_nothing()
                ).rowcount
            if inserted:
                return self.pseudonym_for(patient_id, make, date_shift_days)
        raise PseudonymCollision(
            f"no free pseudonym for a patient after {MAX_PSEUDONYM_ATTEMPTS} attempts: raise deidentify.pseudonym_digits"
        )

    def pseudonym_of(self, patient_id: str) -> Pseudonym | None:
        """The patient's stored pseudonym, or None (never makes one)."""
        with self._read() as conn:
            row = conn.execute(sa.select(t.pseudonyms).where(t.pseudonyms.c.patient_id == patient_id)).first()
        return _pseudonym(row) if row else None

    def crosswalk(self) -> list[Pseudonym]:
        """Every pseudonym, by PatientID: what ``dicom-assets crosswalk`` exports."""
        with self._read() as conn:
            return [_pseudonym(r) for r in conn.execute(sa.select(t.pseudonyms).order_by(t.pseudonyms.c.patient_id))]

    def set_deid_exclusions(self, reasons: Mapping[str, str | None]) -> int:
        """Record why series are left out of the de-identified copy (None: they are in it)."""
        s = t.series.c
        changed = 0
        with self._write() as conn:
            for chunk in _chunks(list(reasons.items()), BATCH_ROWS):
                for uid, reason in chunk:
                    changed += conn.execute(
                        sa.update(t.series)
                        .where(s.series_instance_uid == uid, s.deid_excluded_reason.is_distinct_from(reason))
                        .values(deid_excluded_reason=reason)
                    ).rowcount
        return changed

    def record_deidentified_archive(self, archive: DeidentifiedArchive) -> DeidentifiedArchive:
        """Insert the zip's record and mark the patient's older ones superseded."""
        d = t.deidentified_archives.c
        with self._write() as conn:
            conn.execute(
                sa.update(t.deidentified_archives)
                .where(d.patient_id == archive.patient_id, d.superseded_at.is_(None))
                .values(superseded_at=self._now())
            )
            row = conn.execute(
                sa.insert(t.deidentified_archives)
                .values(
                    patient_id=archive.patient_id, source_archive_id=archive.source_archive_id, file_name=archive.file_name,
                    series_count=archive.series_count, excluded_series=archive.excluded_series,
                    instance_count=archive.instance_count, bytes=archive.bytes, sha256=archive.sha256,
                )  # fmt: skip
                .returning(*t.deidentified_archives.c)
            ).one()
        return _deid_archive(row)

    def latest_deidentified_archive(self, patient_id: str) -> DeidentifiedArchive | None:
        d = t.deidentified_archives.c
        query = sa.select(t.deidentified_archives).where(d.patient_id == patient_id).order_by(d.archive_id.desc()).limit(1)
        with self._read() as conn:
            row = conn.execute(query).first()
        return _deid_archive(row) if row else None

    def superseded_deidentified_archives(self, patient_id: str) -> list[DeidentifiedArchive]:
        """Superseded de-identified zips of the patient whose file is not removed yet."""
        d = t.deidentified_archives.c
        query = (
            sa.select(t.deidentified_archives)
            .where(d.patient_id == patient_id, d.superseded_at.is_not(None), d.removed_at.is_(None))
            .order_by(d.archive_id)
        )
        with self._read() as conn:
            return [_deid_archive(r) for r in conn.execute(query)]

    def mark_deidentified_removed(self, archive_id: int) -> None:
        d = t.deidentified_archives.c
        with self._write() as conn:
            conn.execute(sa.update(t.deidentified_archives).where(d.archive_id == archive_id).values(removed_at=self._now()))

    def mark_deidentified_published(self, archive_id: int, destination: str) -> None:
        d = t.deidentified_archives.c
        with self._write() as conn:
            conn.execute(
                sa.update(t.deidentified_archives)
                .where(d.archive_id == archive_id)
                .values(published_to=destination, published_at=self._now())
            )

    def deidentified_candidates(self, after_key: str | None = None, limit: int = 1000) -> list[DeidCandidate]:
        """Patients (by partition_key, > after_key) whose latest identifiable archive is not the
        source of their latest de-identified zip: new patients, and patients whose zip was rebuilt."""
        a, d, p = t.archives.c, t.deidentified_archives.c, t.patients.c
        latest = sa.select(a.patient_id, sa.func.max(a.archive_id).label("archive_id")).group_by(a.patient_id).subquery("latest")
        made = sa.select(d.patient_id, sa.func.max(d.source_archive_id).label("source")).group_by(d.patient_id).subquery("made")
        query = (
            sa.select(p.patient_id, p.partition_key, latest.c.archive_id)
            .select_from(t.patients.join(latest, latest.c.patient_id == p.patient_id).outerjoin(made, made.c.patient_id == p.patient_id))
            .where(sa.or_(made.c.source.is_(None), made.c.source != latest.c.archive_id))
            .order_by(p.partition_key)
            .limit(limit)
        )
        if after_key is not None:
            query = query.where(p.partition_key > after_key)
        with self._read() as conn:
            return [DeidCandidate(*row) for row in conn.execute(query)]
