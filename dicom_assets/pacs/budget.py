"""The PACS request budget: never more than N requests in any 60-second window.

The site's PACS resets every connection when it receives more than ~700 requests a minute.
Every association and every C-ECHO/C-FIND/C-MOVE/C-GET request takes one token. This is a
sliding-window limiter (stricter than a token bucket, which would allow a burst on top of the
rate): ``acquire`` blocks until the request fits in the window.
"""

from __future__ import annotations

import collections
import threading
import time
from typing import Callable, Protocol


class RequestBudget(Protocol):
    def acquire(self, what: str = "request") -> None:
        """Block until one more request may be sent to the PACS, then account for it."""


class SlidingWindowBudget:
    """In-process budget shared by every thread of this process that talks to one PACS."""

    def __init__(
        self,
        max_per_minute: int,
        window_s: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if max_per_minute < 1:
            raise ValueError("max_per_minute must be >= 1")
        self.max_per_minute = max_per_minute
        self.window_s = window_s
        self._clock = clock
        self._sleep = sleep
        self._sent: collections.deque[float] = collections.deque()
        self._lock = threading.Lock()
        self.total = 0
        self.waited_s = 0.0

    def acquire(self, what: str = "request") -> None:
        while True:
            with self._lock:
                now = self._clock()
                while self._sent and now - self._sent[0] >= self.window_s:
                    self._sent.popleft()
                if len(self._sent) < self.max_per_minute:
                    self._sent.append(now)
                    self.total += 1
                    return
                wait = self.window_s - (now - self._sent[0])
            self.waited_s += wait
            self._sleep(max(wait, 0.001))

    def in_window(self) -> int:
        with self._lock:
            now = self._clock()
            return sum(1 for t in self._sent if now - t < self.window_s)


class UnlimitedBudget:
    """For talking to our own bundled PACS in tests where the budget is not under test."""

    total = 0

    def acquire(self, what: str = "request") -> None:
        self.total += 1
