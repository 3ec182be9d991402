"""Retrieval claims: which series a worker may take, taking one, extending, finishing, releasing."""

from __future__ import annotations

from typing import Any, Collection, Sequence

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql as pg_dialect

from dicom_assets.store import tables as t
from dicom_assets.store.base import _SERIES_STATE_COLUMNS, BATCH_ROWS, StoreBase, _chunks, _series_state
from dicom_assets.store.records import RETRIEVABLE, SeriesState, SeriesStatus

_ID_SEPARATOR = "\x1f"  # joins PatientIDs into one parameter (ASCII unit separator)


class ClaimQueries(StoreBase):
    """Claims of series by retrieval workers (leases on ``series.claimed_by``/``claim_expires_at``)."""

    def _retrievable(self) -> sa.ColumnElement[bool]:
        s = t.series.c
        return sa.or_(
            s.download_status.in_(RETRIEVABLE),
            sa.and_(
                s.download_status == "in_progress",
                sa.or_(s.claim_expires_at.is_(None), s.claim_expires_at < self._now()),
            ),
        )

    def _patient_in(self, patient_ids: list[str]) -> sa.ColumnElement[bool]:
        """``series.patient_id`` is one of ``patient_ids``.

        PostgreSQL: the IDs travel as one text parameter, split on the server into an array the
        planner sees only as an InitPlan parameter. A 20,000-element IN list or array literal
        costs ~26 ms to adapt in psycopg and ~36 ms to plan (every element is estimated); this
        costs ~1 ms, and the claim index is still scanned in order. Falls back to IN when an ID
        contains the separator (never a DICOM PatientID character).
        """
        s = t.series.c
        joined = _ID_SEPARATOR.join(patient_ids)
        if not self.is_postgresql or joined.count(_ID_SEPARATOR) != len(patient_ids) - 1:
            return s.patient_id.in_(patient_ids)
        array = sa.select(
            sa.func.string_to_array(sa.literal(joined, sa.Text), sa.literal(_ID_SEPARATOR, sa.Text),
                                    type_=pg_dialect.ARRAY(sa.Text))
        ).scalar_subquery()
        return s.patient_id == sa.any_(sa.cast(array, pg_dialect.ARRAY(sa.Text)))

    def _claimable(
        self,
        patient_ids: list[str],
        max_attempts: int | None,
        run_id: str | None = None,
        only: Collection[str] | None = None,
        from_patient: str | None = None,
    ) -> list[sa.ColumnElement[bool]]:
        """The WHERE clauses of "a series claim_next_series may take" (see its docstring)."""
        s = t.series.c
        clauses = [t.SERIES_NOT_COMPLETE, self._patient_in(patient_ids), self._retrievable()]
        if run_id is not None:
            clauses.append(s.claimed_in_run.is_distinct_from(run_id))
        if only is not None:
            clauses.append(s.series_instance_uid.in_(list(only)))
        if from_patient is not None:
            clauses.append(s.patient_id >= from_patient)
        if max_attempts is not None:
            clauses.append(sa.or_(s.download_status == "pending", s.attempts < max_attempts))
        return clauses

    def claim_next_series(
        self,
        patient_ids: Sequence[str],
        worker: str,
        lease_s: float,
        run_id: str | None = None,
        max_attempts: int | None = None,
        only: Collection[str] | None = None,
        from_patient: str | None = None,
    ) -> SeriesState | None:
        """Atomically claim one retrievable series of these patients for ``worker``.

        Retrievable: status pending/incomplete/failed, or in_progress with claim_expires_at in
        the past (a crashed claimer). PostgreSQL: SELECT ... FOR UPDATE SKIP LOCKED LIMIT 1,
        then UPDATE. Sets status in_progress, claimed_by, claim_expires_at = now + lease.
        A claim is not an attempt: :meth:`finish_series` counts the attempts that made no
        progress. Returns the claimed row (after update) or None.
        Order: patient_id, study uid, series_number (NULL last), series uid: the order of the
        partial index series_claim_idx (not-complete series only), so a claim reads a few index
        entries however many series are complete.
        SQLite: one UPDATE ... WHERE uid = (SELECT ... LIMIT 1) RETURNING under BEGIN IMMEDIATE.
        ``run_id``: the retrieval run claiming. It is stored in the claimed row
        (``series.claimed_in_run``) and series already claimed under it are skipped, so a series
        that ended failed/incomplete is not retried in a loop within one run; another run claims
        it again. A retry of one series within the run (``only``) passes no run_id.
        ``max_attempts``: a series that already had that many attempts is no longer claimed
        (it stays failed with its last error) unless it is 'pending' (new, or reset because the
        PACS gained instances). ``only``: claim only among these series UIDs.
        ``from_patient``: only series of patients >= this PatientID (in the database's order),
        so a run resumes at its last claim instead of re-reading every series it attempted.
        """
        ids = list(dict.fromkeys(patient_ids))
        if not ids or (only is not None and not only):
            return None
        s = t.series.c
        pick = (
            sa.select(s.series_instance_uid)
            .where(*self._claimable(ids, max_attempts, run_id, only, from_patient))
            .order_by(s.patient_id, s.study_instance_uid, s.series_number.nulls_last(), s.series_instance_uid)
            .limit(1)
        )
        values = {
            "download_status": "in_progress",
            "claimed_by": worker,
            "claim_expires_at": self._now_plus(lease_s),
        }
        if run_id is not None:
            values["claimed_in_run"] = run_id
        returning = [s[c] for c in _SERIES_STATE_COLUMNS]
        with self._write() as conn:
            if self.is_postgresql:
                uid = conn.execute(pick.with_for_update(skip_locked=True)).scalar_one_or_none()
                if uid is None:
                    return None
                target = s.series_instance_uid == uid
            else:
                target = s.series_instance_uid == pick.scalar_subquery()
            row = conn.execute(sa.update(t.series).where(target).values(**values).returning(*returning)).first()
        return _series_state(row) if row else None

    def has_claimable_series(self, patient_ids: Sequence[str], max_attempts: int | None = None) -> bool:
        """Whether claim_next_series(patient_ids, max_attempts=...) could claim anything now
        (one indexed EXISTS, so an idle run over many patients sends no request and costs ~1 ms)."""
        ids = list(dict.fromkeys(patient_ids))
        if not ids:
            return False
        query = sa.select(sa.exists().where(*self._claimable(ids, max_attempts)))
        with self._read() as conn:
            return bool(conn.execute(query).scalar())

    def extend_claim(self, series_uid: str, worker: str, lease_s: float) -> bool:
        """Push the claim's expiry to now + lease. False if ``worker`` no longer holds the claim."""
        s = t.series.c
        stmt = (
            sa.update(t.series)
            .where(s.series_instance_uid == series_uid, s.claimed_by == worker, s.download_status == "in_progress")
            .values(claim_expires_at=self._now_plus(lease_s))
        )
        with self._write() as conn:
            return conn.execute(stmt).rowcount == 1

    def finish_series(
        self,
        series_uid: str,
        worker: str,
        status: SeriesStatus,
        downloaded_instances: int,
        downloaded_bytes: int,
        error: str | None = None,
        expected_instances: int | None = None,
        count_attempt: bool = False,
        network_fault: bool = False,
    ) -> bool:
        """Record the outcome of an attempt and release the claim (only if ``worker`` holds it).

        ``count_attempt``: the attempt brought nothing new and the PACS's answer was the reason
        (``attempts`` + 1, which ``pacs.max_attempts`` limits); ``network_fault``: it brought
        nothing new and broke on the connection (``network_faults`` + 1, never limited).
        expected_instances, when given, replaces the stored count (learned at IMAGE level).
        Sets downloaded_at when status is complete; clears last_error then.
        Returns False if the claim was lost (expired and taken by another worker, or released
        by release_expired_claims).
        """
        if status not in t.SERIES_STATUSES or status == "in_progress":
            raise ValueError(f"finish_series: {status!r} is not a final status")
        s = t.series.c
        values: dict[str, Any] = {
            "download_status": status,
            "downloaded_instances": downloaded_instances,
            "downloaded_bytes": downloaded_bytes,
            "claimed_by": None,
            "claim_expires_at": None,
        }
        if status == "complete":
            values["last_error"] = None
            values["downloaded_at"] = self._now()
        else:
            values["last_error"] = error
        if expected_instances is not None:
            values["expected_instances"] = expected_instances
        if count_attempt:
            values["attempts"] = s.attempts + 1
        if network_fault:
            values["network_faults"] = s.network_faults + 1
        stmt = (
            sa.update(t.series)
            .where(s.series_instance_uid == series_uid, s.claimed_by == worker, s.download_status == "in_progress")
            .values(**values)
        )
        with self._write() as conn:
            return conn.execute(stmt).rowcount == 1

    def release_expired_claims(self) -> int:
        """Set in_progress series with an expired claim back to 'incomplete'. Returns how many."""
        s = t.series.c
        stmt = (
            sa.update(t.series)
            .where(
                s.download_status == "in_progress",
                sa.or_(s.claim_expires_at.is_(None), s.claim_expires_at < self._now()),
            )
            .values(download_status="incomplete", claimed_by=None, claim_expires_at=None)
        )
        with self._write() as conn:
            return conn.execute(stmt).rowcount

    def claim_holders(self) -> list[str]:
        """The distinct workers holding an in_progress claim (to find those that died)."""
        s = t.series.c
        stmt = sa.select(s.claimed_by).where(s.download_status == "in_progress", s.claimed_by.is_not(None)).distinct()
        with self._read() as conn:
            return [row[0] for row in conn.execute(stmt)]

    def release_claims_of(self, workers: Sequence[str]) -> int:
        """Release the claims of workers known to be dead (set their series to 'incomplete')."""
        if not workers:
            return 0
        s = t.series.c
        stmt = (
            sa.update(t.series)
            .where(s.download_status == "in_progress", s.claimed_by.in_(list(workers)))
            .values(download_status="incomplete", claimed_by=None, claim_expires_at=None,
                    last_error="the worker holding the claim died")
        )
        with self._write() as conn:
            return conn.execute(stmt).rowcount

    def release_claim(self, series_uid: str, worker: str, reason: str) -> bool:
        """Give a claimed series back untouched (a stop request): 'incomplete', no attempt
        counted, ``reason`` as its last error. False if ``worker`` no longer held it."""
        s = t.series.c
        stmt = (
            sa.update(t.series)
            .where(s.series_instance_uid == series_uid, s.claimed_by == worker, s.download_status == "in_progress")
            .values(download_status="incomplete", claimed_by=None, claim_expires_at=None, last_error=reason)
        )
        with self._write() as conn:
            return conn.execute(stmt).rowcount == 1

    def series_to_retry(
        self, statuses: Sequence[str], patient_ids: Sequence[str] = (), series_uids: Sequence[str] = ()
    ) -> list[SeriesState]:
        """The series in these statuses (optionally only of these patients / these UIDs), in
        claim order: what ``dicom-assets retry`` lists and resets."""
        s = t.series.c
        query = sa.select(*[s[c] for c in _SERIES_STATE_COLUMNS]).where(s.download_status.in_(list(statuses)))
        if patient_ids:
            query = query.where(s.patient_id.in_(list(patient_ids)))
        if series_uids:
            query = query.where(s.series_instance_uid.in_(list(series_uids)))
        query = query.order_by(s.patient_id, s.study_instance_uid, s.series_number.nulls_last(), s.series_instance_uid)
        with self._read() as conn:
            return [_series_state(row) for row in conn.execute(query)]

    def reset_attempts(self, series_uids: Sequence[str]) -> int:
        """Make these series claimable again: attempts 0, 'failed' becomes 'incomplete' (their
        files and last error stay). Claimed (in_progress) series are left alone."""
        if not series_uids:
            return 0
        s = t.series.c
        changed = 0
        with self._write() as conn:
            for chunk in _chunks(series_uids, BATCH_ROWS):
                stmt = (
                    sa.update(t.series)
                    .where(s.series_instance_uid.in_(chunk), s.download_status != "in_progress")
                    .values(
                        attempts=0,
                        download_status=sa.case((s.download_status == "failed", "incomplete"), else_=s.download_status),
                    )
                )
                changed += conn.execute(stmt).rowcount
        return changed
