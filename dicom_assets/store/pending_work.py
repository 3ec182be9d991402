"""Patients with work no pipeline run has seen yet: what makes new work flow under the daemon.

Discovery (any path: a schedule, the UI, ``dagster job launch``, another worker) leaves its
findings in the state DB as marks: a new or changed patient gets ``studies_outdated_at``, a new
or changed study ``series_outdated_at``, a new series is ``pending``. The per-patient pipeline
clears them. The sensor ``new_patient_work`` asks for a pipeline run for the patients whose
newest mark is later than ``patients.pipeline_started_at`` (stamped by the pipeline's first
step), so every change is asked for once: a run that could not finish its work (the PACS down)
leaves marks older than its start, and those wait for the retrieval schedule, the safety net,
instead of being asked for on every tick.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Sequence

import sqlalchemy as sa

from dicom_assets.store import tables as t
from dicom_assets.store.base import BATCH_ROWS, StoreBase, _chunks, _utc


@dataclass(frozen=True)
class PendingWork:
    """A patient with work marked after its pipeline last started (or never started)."""

    patient_id: str
    partition_key: str
    marked_at: datetime  # the newest mark: when discovery last found something to do


class PendingWorkQueries(StoreBase):
    """Unseen per-patient work, and the stamp the pipeline leaves when it starts on a patient."""

    @staticmethod
    def _marks() -> sa.Subquery:
        """Per patient, the newest mark of work: studies or series to ask for, a series never tried."""
        p, st, se = t.patients.c, t.studies.c, t.series.c
        untried = sa.and_(
            se.download_status == "pending", se.claimed_in_run.is_(None), se.attempts == 0, se.network_faults == 0
        )
        marks = sa.union_all(
            sa.select(p.patient_id, p.studies_outdated_at.label("marked_at")).where(p.studies_outdated_at.is_not(None)),
            sa.select(st.patient_id, st.series_outdated_at.label("marked_at")).where(st.series_outdated_at.is_not(None)),
            sa.select(se.patient_id, se.date_created.label("marked_at")).where(untried),
        ).subquery("marks")
        return (
            sa.select(marks.c.patient_id, sa.func.max(marks.c.marked_at, type_=t.patients.c.studies_outdated_at.type).label("marked_at"))
            .group_by(marks.c.patient_id)
            .subquery("newest_marks")
        )

    def patients_with_unseen_work(self, limit: int = 5_000) -> list[PendingWork]:
        """Patients whose newest mark is after their pipeline last started, oldest mark first."""
        p = t.patients.c
        newest = self._marks()
        query = (
            sa.select(p.patient_id, p.partition_key, newest.c.marked_at)
            .select_from(t.patients.join(newest, newest.c.patient_id == p.patient_id))
            .where(sa.or_(p.pipeline_started_at.is_(None), newest.c.marked_at > p.pipeline_started_at))
            .order_by(newest.c.marked_at, p.partition_key)
            .limit(limit)
        )
        with self._read() as conn:
            return [PendingWork(r[0], r[1], _utc(r[2])) for r in conn.execute(query)]

    def mark_pipeline_started(self, patient_ids: Sequence[str]) -> None:
        """Stamp "a pipeline run starts on these patients now": the work marked so far is seen."""
        with self._write() as conn:
            for chunk in _chunks(dict.fromkeys(patient_ids), BATCH_ROWS):
                conn.execute(
                    sa.update(t.patients).where(t.patients.c.patient_id.in_(chunk)).values(pipeline_started_at=self._now())
                )
