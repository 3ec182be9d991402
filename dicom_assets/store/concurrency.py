"""The concurrent retrieves of a PACS: the count in force (``pacs_budgets.concurrency_*``) and
the leased slots of the workers retrieving now (``pacs_slots``), shared by every process.

The arithmetic of the count is :mod:`dicom_assets.pacs.adaptive_concurrency`; the worker side is
:mod:`dicom_assets.pacs.concurrency`. Slots are taken under the lock of the PACS's budget row,
so two machines never both take the last one.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from typing import Sequence

import sqlalchemy as sa

from dicom_assets.store import tables as t
from dicom_assets.store.base import _utc
from dicom_assets.store.budget import BudgetQueries


@dataclass(frozen=True)
class ConcurrencyState:
    """What ``dicom-assets status`` and the run metadata show (None: never probed)."""

    limit: int | None
    peak: int | None
    cuts: int
    in_flight: int  # slots held now (not expired)


class ConcurrencyQueries(BudgetQueries):
    """The shared count of concurrent retrieves and the slots that enforce it."""

    def concurrency_limit(self, pacs_key: str) -> int | None:
        """The count in force for this PACS, or None when no retrieval has probed it yet."""
        b = t.pacs_budgets.c
        with self._read() as conn:
            return conn.execute(sa.select(b.concurrency_limit).where(b.pacs_key == pacs_key)).scalar()

    def set_concurrency_limit(self, pacs_key: str, limit: int) -> None:
        """Record a probe's decision (and the peak)."""
        b = t.pacs_budgets
        with self._write() as conn:
            row, _ = self._lock_budget_row(conn, pacs_key)
            if row.concurrency_limit == limit:
                return
            conn.execute(sa.update(b).where(b.c.pacs_key == pacs_key).values(
                concurrency_limit=limit,
                concurrency_peak=sa.case((b.c.concurrency_peak > limit, b.c.concurrency_peak), else_=limit),
            ))  # fmt: skip

    def cut_concurrency(self, pacs_key: str, current: int, cooldown_s: float) -> int:
        """An A7xx/C0xx answer: halve the count (at least 1) unless it was cut within
        ``cooldown_s`` (the other workers saw the same refusal). Returns the count in force."""
        b = t.pacs_budgets
        with self._write() as conn:
            row, now = self._lock_budget_row(conn, pacs_key)
            limit = row.concurrency_limit if row.concurrency_limit is not None else current
            changed = row.concurrency_cut_at
            if changed is not None and (now - _utc(changed)).total_seconds() < cooldown_s:
                return limit
            cut = max(1, limit // 2)
            conn.execute(sa.update(b).where(b.c.pacs_key == pacs_key).values(
                concurrency_limit=cut, concurrency_cut_at=self._budget_time(now), concurrency_cuts=b.c.concurrency_cuts + 1,
            ))  # fmt: skip
            return cut

    def take_pacs_slot(self, pacs_key: str, holder: str, limit: int, lease_s: float) -> bool:
        """Take (or renew) ``holder``'s slot if fewer than ``limit`` others hold one; expired
        slots are dropped first."""
        s = t.pacs_slots
        with self._write() as conn:
            _, now = self._lock_budget_row(conn, pacs_key)
            conn.execute(sa.delete(s).where(s.c.pacs_key == pacs_key, s.c.expires_at <= self._budget_time(now)))
            others = conn.execute(
                sa.select(sa.func.count()).select_from(s).where(s.c.pacs_key == pacs_key, s.c.holder != holder)
            ).scalar_one()
            if others >= limit:
                return False
            expires = self._budget_time(now + timedelta(seconds=lease_s))
            conn.execute(self._insert(s).values(pacs_key=pacs_key, holder=holder, expires_at=expires)
                         .on_conflict_do_update(index_elements=[s.c.pacs_key, s.c.holder], set_={"expires_at": expires}))
        return True

    def renew_pacs_slots(self, pacs_key: str, holders: Sequence[str], lease_s: float) -> None:
        """Push these holders' leases to now + ``lease_s``: without the budget row's lock, which
        every request's token takes (a renewal changes no count, so it needs no order)."""
        s = t.pacs_slots
        if not holders:
            return
        with self._write() as conn:
            conn.execute(sa.update(s).where(s.c.pacs_key == pacs_key, s.c.holder.in_(list(holders)))
                         .values(expires_at=self._now_plus(lease_s)))

    def release_pacs_slots(self, pacs_key: str, holders: Sequence[str]) -> int:
        s = t.pacs_slots
        if not holders:
            return 0
        with self._write() as conn:
            return conn.execute(sa.delete(s).where(s.c.pacs_key == pacs_key, s.c.holder.in_(list(holders)))).rowcount

    def pacs_slot_holders(self, pacs_key: str) -> list[str]:
        s = t.pacs_slots
        with self._read() as conn:
            return list(conn.execute(sa.select(s.c.holder).where(s.c.pacs_key == pacs_key)).scalars())

    def concurrency_state(self, pacs_key: str) -> ConcurrencyState:
        b, s = t.pacs_budgets.c, t.pacs_slots
        with self._read() as conn:
            row = conn.execute(sa.select(b.concurrency_limit, b.concurrency_peak, b.concurrency_cuts).where(b.pacs_key == pacs_key)).first()
            held = conn.execute(sa.select(sa.func.count()).select_from(s).where(s.c.pacs_key == pacs_key)).scalar_one()
        if row is None:
            return ConcurrencyState(None, None, 0, int(held))
        return ConcurrencyState(row[0], row[1], int(row[2]), int(held))
