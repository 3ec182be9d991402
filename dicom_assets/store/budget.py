"""The PACS request budget: a shared sliding-window token log per PACS (``pacs_budgets``, ``pacs_request_log``)."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from typing import Any

import sqlalchemy as sa

from dicom_assets.pacs.adaptive_concurrency import reset_cut
from dicom_assets.pacs.adaptive_rate import BudgetRate, RatePolicy
from dicom_assets.store import tables as t
from dicom_assets.store.base import StoreBase, _utc


class BudgetQueries(StoreBase):
    """Grants of PACS requests within a per-window maximum, and their statistics."""

    def _budget_time(self, value: datetime) -> datetime:
        """A budget timestamp as bound: aware UTC on PostgreSQL, naive UTC on SQLite."""
        value = value.astimezone(timezone.utc)
        return value if self.is_postgresql else value.replace(tzinfo=None)

    def _lock_budget_row(self, conn: sa.Connection, pacs_key: str) -> tuple[Any, datetime]:
        """Create-if-missing and lock the PACS's ``pacs_budgets`` row; returns it and "now".

        "Now" is ``max(clock, last_sent_at)``: the database's ``clock_timestamp()`` on PostgreSQL
        (shared by every machine), this machine's UTC clock on SQLite."""
        b = t.pacs_budgets
        conn.execute(self._insert(b).values(pacs_key=pacs_key).on_conflict_do_nothing(index_elements=[b.c.pacs_key]))
        columns: list[Any] = [b.c.last_sent_at, b.c.rate_limit, b.c.rate_changed_at, b.c.resets, b.c.lowest_limit,
                              b.c.last_reset_at, b.c.concurrency_limit, b.c.concurrency_cut_at]
        if self.is_postgresql:
            columns.append(sa.func.clock_timestamp(type_=sa.DateTime(timezone=True)))
        row = conn.execute(sa.select(*columns).where(b.c.pacs_key == pacs_key).with_for_update()).one()
        clock = _utc(row[-1]) if self.is_postgresql else datetime.now(timezone.utc)
        last = _utc(row.last_sent_at)
        now = max(clock, last) if last is not None else clock  # type: ignore[type-var]
        assert now is not None
        return row, now

    def take_request_token(
        self, pacs_key: str, max_per_window: int, window_s: float, what: str = "request",
        policy: RatePolicy | None = None,
    ) -> float:
        """Grant one request to the PACS ``pacs_key`` if fewer than ``max_per_window`` were granted
        in the last ``window_s`` seconds: returns 0.0 and logs it. Otherwise returns the seconds
        until the oldest grant that keeps the window full leaves it (> 0), and logs nothing.

        One short transaction: create-if-missing and lock the PACS's ``pacs_budgets`` row (FOR
        UPDATE on PostgreSQL; BEGIN IMMEDIATE serialises all writers on SQLite), prune its log rows
        older than the window, count the rest, insert the grant. Grants to one PACS are therefore
        serialised, and each one is timestamped after the lock was taken with
        ``max(clock, last_sent_at)``, so logged times never decrease even if the clock steps back.
        The clock is the database's (``clock_timestamp()``, not the transaction start ``now()``)
        on PostgreSQL, shared by every machine; on SQLite it is this machine's UTC clock.

        ``policy`` (the adaptive rate): the limit is then the one in force after the PACS's resets
        (:meth:`note_pacs_reset`), between the policy's floor and ``max_per_window``.
        """
        if max_per_window < 1:
            raise ValueError("max_per_window must be >= 1")
        if window_s <= 0:
            raise ValueError("window_s must be > 0")
        b, log = t.pacs_budgets, t.pacs_request_log
        with self._write() as conn:
            row, now = self._lock_budget_row(conn, pacs_key)
            if policy is not None:
                max_per_window = policy.current(row.rate_limit, _utc(row.rate_changed_at), now)
            cutoff = self._budget_time(now - timedelta(seconds=window_s))
            conn.execute(sa.delete(log).where(log.c.pacs_key == pacs_key, log.c.sent_at <= cutoff))
            in_window = conn.execute(
                sa.select(sa.func.count()).select_from(log).where(log.c.pacs_key == pacs_key)
            ).scalar_one()
            if in_window < max_per_window:
                stamp = self._budget_time(now)
                conn.execute(sa.insert(log).values(pacs_key=pacs_key, sent_at=stamp, what=what))
                conn.execute(
                    sa.update(b).where(b.c.pacs_key == pacs_key).values(last_sent_at=stamp, granted=b.c.granted + 1)
                )
                return 0.0
            # Full: the window has room again when the (in_window - max + 1)-th oldest grant leaves.
            oldest = conn.execute(
                sa.select(log.c.sent_at)
                .where(log.c.pacs_key == pacs_key)
                .order_by(log.c.sent_at)
                .offset(in_window - max_per_window)
                .limit(1)
            ).scalar_one()
            conn.execute(sa.update(b).where(b.c.pacs_key == pacs_key).values(deferred=b.c.deferred + 1))
        leaves_at = _utc(oldest) + timedelta(seconds=window_s)  # type: ignore[operator]
        return max((leaves_at - now).total_seconds(), 0.001)

    def note_pacs_reset(self, pacs_key: str, policy: RatePolicy) -> int:
        """The PACS reset or aborted an association: count it and cut the rate (unless a cut was
        made within the policy's cooldown). Returns the limit now in force."""
        b = t.pacs_budgets
        with self._write() as conn:
            row, now = self._lock_budget_row(conn, pacs_key)
            changed_at = _utc(row.rate_changed_at)
            values: dict[str, Any] = {"resets": b.c.resets + 1, "last_reset_at": self._budget_time(now)}
            cut = policy.after_reset(row.rate_limit, changed_at, now)
            if cut is None:
                current = policy.current(row.rate_limit, changed_at, now)
            else:
                current = cut
                values.update(rate_limit=cut, rate_changed_at=self._budget_time(now),
                              lowest_limit=min(cut, row.lowest_limit or cut))
                count = row.concurrency_limit
                if count is not None and reset_cut(count) < count:  # one controller: the concurrent retrieves halve too
                    values.update(concurrency_limit=reset_cut(count),
                                  concurrency_cut_at=self._budget_time(now), concurrency_cuts=b.c.concurrency_cuts + 1)
            conn.execute(sa.update(b).where(b.c.pacs_key == pacs_key).values(**values))
        return current

    def budget_rate(self, pacs_key: str, policy: RatePolicy) -> BudgetRate:
        """The limit in force for one PACS, the lowest it reached and the resets seen."""
        b = t.pacs_budgets
        with self._read() as conn:
            row = conn.execute(
                sa.select(b.c.rate_limit, b.c.rate_changed_at, b.c.resets, b.c.lowest_limit, b.c.last_reset_at)
                .where(b.c.pacs_key == pacs_key)
            ).first()
        now = datetime.now(timezone.utc)
        if row is None:
            return BudgetRate(policy.max_per_window, policy.max_per_window, policy.max_per_window, 0, None, policy.window_s)
        current = policy.current(row.rate_limit, _utc(row.rate_changed_at), now)
        return BudgetRate(
            max_per_window=policy.max_per_window, current_per_window=current,
            lowest_per_window=min(row.lowest_limit or policy.max_per_window, current), resets=int(row.resets),
            last_reset_at=_utc(row.last_reset_at), window_s=policy.window_s,
        )  # fmt: skip

    def request_budget_stats(self, pacs_key: str) -> dict[str, int]:
        """``{'granted': n, 'deferred': n, 'in_log': n}`` for one PACS (zeros when unknown).

        ``deferred`` counts token requests answered "wait"; ``in_log`` the grants not yet pruned.
        """
        b, log = t.pacs_budgets, t.pacs_request_log
        with self._read() as conn:
            row = conn.execute(sa.select(b.c.granted, b.c.deferred).where(b.c.pacs_key == pacs_key)).first()
            in_log = conn.execute(
                sa.select(sa.func.count()).select_from(log).where(log.c.pacs_key == pacs_key)
            ).scalar_one()
        granted, deferred = (row[0], row[1]) if row else (0, 0)
        return {"granted": int(granted), "deferred": int(deferred), "in_log": int(in_log)}
