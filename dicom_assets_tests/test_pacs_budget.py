"""The request budget never lets more than N requests into any 60-second window.

The in-process budget on a fake clock; the database budget on real PostgreSQL and SQLite, shared
by real threads and processes, with a short window to keep it fast.
"""

from __future__ import annotations

import multiprocessing
import threading
import time

import pytest

from dicom_assets.pacs.budget import WINDOW_ENV_VAR, DatabaseBudget, SlidingWindowBudget, budget_window_s, pacs_key
from dicom_assets.store import StateStore


class FakeClock:
    """A clock the budget sleeps on, so a minute passes instantly (time, not the budget, is faked)."""

    def __init__(self) -> None:
        self.now = 0.0
        self.lock = threading.Lock()

    def time(self) -> float:
        with self.lock:
            return self.now

    def sleep(self, seconds: float) -> None:
        with self.lock:
            self.now += seconds


def test_never_more_than_max_in_any_window() -> None:
    clock = FakeClock()
    budget = SlidingWindowBudget(10, clock=clock.time, sleep=clock.sleep)
    stamps = []
    for _ in range(35):
        budget.acquire()
        stamps.append(clock.time())
    for i, start in enumerate(stamps):
        in_window = [t for t in stamps[i:] if t - start < 60.0]
        assert len(in_window) <= 10
    assert budget.total == 35
    assert clock.now >= 180.0  # 35 requests at 10/minute need at least 3 full windows


def test_threads_share_one_budget() -> None:
    clock = FakeClock()
    budget = SlidingWindowBudget(20, clock=clock.time, sleep=clock.sleep)
    threads = [threading.Thread(target=lambda: [budget.acquire() for _ in range(10)]) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert budget.total == 40
    assert clock.now >= 60.0


# -- the shared budget in the state DB (real PostgreSQL and SQLite, real threads and processes) --

KEY = pacs_key("127.0.0.1", 11112, "DEVPACS")


def max_in_window(stamps: list[float], window_s: float) -> int:
    """The most stamps in any half-open window ``[t, t + window_s)`` (t = each stamp suffices)."""
    stamps = sorted(stamps)
    best = 0
    j = 0
    for i, start in enumerate(stamps):
        j = max(j, i)
        while j < len(stamps) and stamps[j] - start < window_s:
            j += 1
        best = max(best, j - i)
    return best


def test_max_in_window_detects_three_unshared_budgets() -> None:
    """The checker used below catches what per-process budgets do: three processes, 3N at once."""
    stamps: list[float] = []
    for _ in range(3):
        local = SlidingWindowBudget(5, window_s=60.0)
        for _ in range(5):
            local.acquire()
            stamps.append(time.time())
    assert max_in_window(stamps, 60.0) == 15
    assert max_in_window([0.0, 0.5, 1.0, 1.5], 1.0) == 2


def test_take_request_token_grants_n_then_says_how_long_to_wait(store: StateStore) -> None:
    for _ in range(3):
        assert store.take_request_token(KEY, 3, 30.0, "C-FIND") == 0.0
    wait = store.take_request_token(KEY, 3, 30.0, "C-FIND")
    assert 29.0 < wait <= 30.0
    assert store.take_request_token("other:104/PACS", 3, 30.0) == 0.0  # budgets are per PACS
    assert store.request_budget_stats(KEY) == {"granted": 3, "deferred": 1, "in_log": 3}
    # A short window: the wait it names is enough, and expired grants are pruned.
    short = "short:1/X"
    assert store.take_request_token(short, 1, 0.3) == 0.0
    wait = store.take_request_token(short, 1, 0.3)
    assert 0.0 < wait <= 0.3
    time.sleep(wait)
    assert store.take_request_token(short, 1, 0.3) == 0.0
    assert store.request_budget_stats(short) == {"granted": 2, "deferred": 1, "in_log": 1}
    with pytest.raises(ValueError):
        store.take_request_token(KEY, 0, 30.0)


def test_database_budget_never_more_than_n_in_a_window(store: StateStore) -> None:
    n, window = 4, 0.5
    budget = DatabaseBudget(store, KEY, n, window_s=window, margin_s=0.1)
    started = time.time()
    stamps = []
    for _ in range(13):
        budget.acquire("C-ECHO")
        stamps.append(time.time())
    assert max_in_window(stamps, window) <= n
    assert max_in_window(stamps, window) == n  # it is a budget, not a stall
    assert stamps[-1] - started >= 3 * (window + 0.1) - 0.05  # 13 grants at 4 per window: 3 waits
    assert budget.total == 13 and budget.waits >= 3


def _worker(url: str, n: int, window_s: float, margin_s: float, threads: int, each: int, go, out) -> None:  # type: ignore[no-untyped-def]
    """One process: ``threads`` threads share one DatabaseBudget on ``url``; stamps go to ``out``."""
    store = StateStore(url)
    budget = DatabaseBudget(store, KEY, n, window_s=window_s, margin_s=margin_s)
    stamps: list[float] = []
    lock = threading.Lock()

    def run() -> None:
        for _ in range(each):
            budget.acquire("C-FIND")
            with lock:
                stamps.append(time.time())

    go.wait(60)
    pool = [threading.Thread(target=run) for _ in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    store.dispose()
    out.put(stamps)


def test_processes_and_threads_share_one_budget(store: StateStore, db_url: str) -> None:
    """Three processes of three threads each, one state DB: never more than N in any window."""
    n, window, margin = 10, 1.0, 0.2
    processes, threads, each = 3, 3, 4  # 36 requests: at least 3 full waits at 10 per window
    ctx = multiprocessing.get_context("spawn")
    go, out = ctx.Event(), ctx.Queue()
    procs = [
        ctx.Process(target=_worker, args=(db_url, n, window, margin, threads, each, go, out)) for _ in range(processes)
    ]
    for p in procs:
        p.start()
    time.sleep(0.5)  # let them import and connect, so they really compete
    started = time.time()
    go.set()
    stamps = [t for _ in procs for t in out.get(timeout=60)]
    for p in procs:
        p.join(timeout=30)
        assert p.exitcode == 0
    assert len(stamps) == processes * threads * each
    assert max_in_window(stamps, window) <= n
    assert max(stamps) - started >= 3 * (window + margin) - 0.05
    stats = store.request_budget_stats(KEY)
    assert stats["granted"] == 36 and stats["deferred"] > 0
    assert stats["in_log"] <= n


def test_window_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(WINDOW_ENV_VAR, raising=False)
    assert budget_window_s() == 60.0
    monkeypatch.setenv(WINDOW_ENV_VAR, "2.5")
    assert budget_window_s() == 2.5
    monkeypatch.setenv(WINDOW_ENV_VAR, "0")
    with pytest.raises(ValueError, match=WINDOW_ENV_VAR):
        budget_window_s()
    assert pacs_key("PACS.example.org", 104, " AE ") == "pacs.example.org:104/AE"
