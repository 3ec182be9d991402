"""Series selection: what the series filters (and request files) see of each series, and the
``skipped`` marks they leave.

A skip is a status, not a deletion: ``download_status = 'skipped'`` with the rule in
``skip_reason``. Only series that hold nothing finished are skipped (pending, incomplete,
failed); a complete or in-progress series is never touched, so nothing downloaded is dropped and
a running retrieve is never pulled from under its worker. A skipped series the rules want again
goes back to ``pending`` and is fetched by the next retrieval.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import sqlalchemy as sa

from dicom_assets.series_filter import SeriesFacts, split_sop_classes
from dicom_assets.store import tables as t
from dicom_assets.store.base import BATCH_ROWS, StoreBase, _chunks

#: The statuses a skip may replace: nothing complete, nothing being retrieved right now.
SKIPPABLE: tuple[str, ...] = ("pending", "incomplete", "failed")


@dataclass(frozen=True)
class SkipCounts:
    """What :meth:`SeriesSelectionQueries.apply_series_skips` changed."""

    skipped: int = 0  # newly skipped (were pending / incomplete / failed)
    reason_changed: int = 0  # already skipped, by another rule now
    unskipped: int = 0  # skipped before, wanted now: back to pending
    held: int = 0  # a reason was given but the series is complete or in progress: left as it is

    def __add__(self, other: "SkipCounts") -> "SkipCounts":
        return SkipCounts(*(a + b for a, b in zip(self._tuple(), other._tuple())))

    def _tuple(self) -> tuple[int, int, int, int]:
        return self.skipped, self.reason_changed, self.unskipped, self.held


def _facts(row: Any) -> SeriesFacts:
    m = row._mapping
    return SeriesFacts(
        series_instance_uid=m["series_instance_uid"],
        study_instance_uid=m["study_instance_uid"],
        patient_id=m["patient_id"],
        modality=m["modality"],
        series_description=m["series_description"],
        series_number=m["series_number"],
        expected_instances=m["expected_instances"],
        sop_classes=split_sop_classes(m["sop_classes"]),
        study_sop_classes=split_sop_classes(m["sop_classes_in_study"]) or None,
        download_status=m["download_status"],
    )


class SeriesSelectionQueries(StoreBase):
    """Reads for the series filters and the ``skipped`` status they write."""

    def series_facts(self, patient_ids: Sequence[str]) -> list[SeriesFacts]:
        """Every series of these patients with what a filter decides on (its study's
        SOPClassesInStudy included), in patient, study, series number order."""
        se, st = t.series.c, t.studies.c
        columns = (
            se.series_instance_uid, se.study_instance_uid, se.patient_id, se.modality, se.series_description,
            se.series_number, se.expected_instances, se.sop_classes, se.download_status, st.sop_classes_in_study,
        )  # fmt: skip
        out: list[SeriesFacts] = []
        with self._read() as conn:
            for chunk in _chunks(dict.fromkeys(patient_ids), BATCH_ROWS):
                query = (
                    sa.select(*columns)
                    .select_from(t.series.join(t.studies, se.study_instance_uid == st.study_instance_uid))
                    .where(se.patient_id.in_(chunk))
                    .order_by(se.patient_id, se.study_instance_uid, se.series_number.nulls_last(), se.series_instance_uid)
                )
                out.extend(_facts(row) for row in conn.execute(query))
        return out

    def record_series_sop_classes(self, sop_classes: Mapping[str, str]) -> int:
        """Store each series' SOP Class UIDs as the PACS listed them (backslash-separated; ``""``
        when it listed none), so they are never asked for again. Returns how many were given."""
        s = t.series.c
        stmt = (
            sa.update(t.series)
            .where(s.series_instance_uid == sa.bindparam("uid"))
            .values(sop_classes=sa.bindparam("classes"))
        )
        items = [{"uid": uid, "classes": classes} for uid, classes in sorted(sop_classes.items())]
        for chunk in _chunks(items, BATCH_ROWS):
            with self._write() as conn:
                conn.execute(stmt, chunk)
        return len(items)

    def known_sop_classes(self, series_uid: str) -> tuple[str, ...] | None:
        """The SOP classes a series' instances can have, as far as the state DB knows without
        asking the PACS: the series' own list (IMAGE level, when the filters needed it), else its
        study's SOPClassesInStudy (a superset), else None. Empty lists count as unknown."""
        se, st = t.series.c, t.studies.c
        query = (
            sa.select(se.sop_classes, st.sop_classes_in_study)
            .select_from(t.series.join(t.studies, se.study_instance_uid == st.study_instance_uid))
            .where(se.series_instance_uid == series_uid)
        )
        with self._read() as conn:
            row = conn.execute(query).first()
        if row is None:
            return None
        return split_sop_classes(row[0]) or split_sop_classes(row[1]) or None

    def apply_series_skips(self, decisions: Mapping[str, str | None]) -> SkipCounts:
        """Apply the selection's decisions: SeriesInstanceUID -> skip reason, or None to fetch it.

        A reason skips a pending / incomplete / failed series (``skipped``, ``skip_reason``) and
        updates the reason of a skipped one when it changed; None sets a skipped series back to
        ``pending`` (reason cleared). Complete and in-progress series are never touched. Batched,
        one transaction per batch; the rows of a batch are read (locked on PostgreSQL) first, so
        the counts are exact and an unchanged series is not written at all.
        """
        total = SkipCounts()
        for chunk in _chunks(sorted(decisions.items()), BATCH_ROWS):
            total = total + self._apply_skips_batch(dict(chunk))
        return total

    def _apply_skips_batch(self, decisions: dict[str, str | None]) -> SkipCounts:
        s = t.series.c
        skip: dict[str, list[str]] = {}  # reason -> series
        unskip: list[str] = []
        skipped = changed = held = 0
        with self._write() as conn:
            query = (
                sa.select(s.series_instance_uid, s.download_status, s.skip_reason)
                .where(s.series_instance_uid.in_(list(decisions)))
                .order_by(s.series_instance_uid)
            )
            if self.is_postgresql:
                query = query.with_for_update()
            for uid, status, old_reason in conn.execute(query):
                reason = decisions[uid]
                if reason is None:
                    if status == "skipped":
                        unskip.append(uid)
                elif status in SKIPPABLE or (status == "skipped" and old_reason != reason):
                    skip.setdefault(reason, []).append(uid)
                    skipped += status != "skipped"
                    changed += status == "skipped"
                elif status != "skipped":
                    held += 1
            for reason, uids in sorted(skip.items()):
                conn.execute(
                    sa.update(t.series)
                    .where(s.series_instance_uid.in_(uids), s.download_status.in_((*SKIPPABLE, "skipped")))
                    .values(download_status="skipped", skip_reason=reason, claimed_by=None, claim_expires_at=None)
                )
            if unskip:
                conn.execute(
                    sa.update(t.series)
                    .where(s.series_instance_uid.in_(unskip), s.download_status == "skipped")
                    .values(download_status="pending", skip_reason=None)
                )
        return SkipCounts(skipped=skipped, reason_changed=changed, unskipped=len(unskip), held=held)
