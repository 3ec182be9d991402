"""The request budget never lets more than N requests into any 60-second window."""

from __future__ import annotations

import threading

from dicom_assets.pacs.budget import SlidingWindowBudget


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
