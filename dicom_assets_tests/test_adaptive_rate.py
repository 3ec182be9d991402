"""The adaptive request rate: halve on a reset, once per cooldown, recover a tenth per window.

The arithmetic on fixed times; the shared state through the state DB (PostgreSQL and SQLite),
where every process that talks to the PACS reads the same limit.
"""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

from dicom_assets.pacs.adaptive_rate import RatePolicy
from dicom_assets.pacs.budget import DatabaseBudget
from dicom_assets.store import StateStore

T0 = datetime(2026, 12, 6, 12, 0, tzinfo=timezone.utc)
POLICY = RatePolicy(max_per_window=700, floor=70, window_s=60.0)


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def test_a_reset_halves_and_recovery_adds_a_tenth_per_window() -> None:
    assert POLICY.current(None, None, T0) == 700
    cut = POLICY.after_reset(None, None, T0)
    assert cut == 350
    assert POLICY.current(cut, T0, at(59)) == 350
    assert POLICY.current(cut, T0, at(60)) == 420
    assert POLICY.current(cut, T0, at(299)) == 630
    assert POLICY.current(cut, T0, at(300)) == 700 and POLICY.current(cut, T0, at(3600)) == 700  # capped


def test_resets_within_the_cooldown_cut_once_and_the_floor_holds() -> None:
    assert POLICY.after_reset(350, T0, at(POLICY.cooldown_s - 0.1)) is None  # the same event seen by 4 workers
    limit, changed = 700, None
    for n in range(10):  # a reset every 10 s for 100 s: 350, 175, 87, 70, 70 ...
        new = POLICY.after_reset(limit if changed else None, changed, at(10 * n))
        assert new is not None
        limit, changed = new, at(10 * n)
    assert limit == 70
    assert POLICY.current(70, changed, at(90 + 59)) == 70  # no recovery while resets keep coming


def test_the_shared_limit_lives_in_the_state_db(store: StateStore) -> None:
    key = "pacs:104/ADAPT"
    policy = RatePolicy(max_per_window=8, floor=2, window_s=3600.0)  # an hour: no recovery during the test
    fresh = store.budget_rate(key, policy)
    assert (fresh.current_per_window, fresh.resets, fresh.last_reset_at) == (8, 0, None)
    assert store.note_pacs_reset(key, policy) == 4
    assert store.note_pacs_reset(key, policy) == 4  # within the cooldown: counted, not cut again
    granted = 0
    while store.take_request_token(key, 8, 3600.0, "C-GET", policy=policy) == 0.0:
        granted += 1
    assert granted == 4  # the cut limit, not the configured 8
    assert store.take_request_token(key, 8, 3600.0, "C-GET") == 0.0  # without the policy: the plain maximum
    rate = store.budget_rate(key, policy)
    assert (rate.current_per_window, rate.lowest_per_window, rate.resets) == (4, 4, 2)
    assert rate.last_reset_at is not None and "2 resets" in rate.describe()


def test_a_budget_on_another_handle_sees_the_cut(store: StateStore, db_url: str) -> None:
    """Two budgets (two processes' worth: separate StateStore handles) share one limit."""
    other = StateStore(db_url)
    try:
        mine = DatabaseBudget(store, "pacs:104/SHARED", 60, window_s=60.0)
        theirs = DatabaseBudget(other, "pacs:104/SHARED", 60, window_s=60.0)
        mine.note_reset()
        assert theirs.rate().current_per_window == 30 and theirs.rate().resets == 1
        still = DatabaseBudget(other, "pacs:104/SHARED", 60, window_s=60.0, adaptive=False)
        assert still.policy is None and still.rate().resets == 1
    finally:
        other.dispose()
