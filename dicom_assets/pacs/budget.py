"""The PACS request budget: never more than N requests in any 60-second window.

The site's PACS resets every connection when it receives more than ~700 requests a minute.
Every association and every C-ECHO/C-FIND/C-MOVE/C-GET request takes one token. Both budgets
here are sliding-window limiters (stricter than a token bucket, which would allow a burst on top
of the rate): ``acquire`` blocks until the request fits in the window.

* :class:`DatabaseBudget` is the one to use: the window lives in the state DB, so every thread,
  process, run and machine that talks to the same PACS (same ``host:port/called_ae``) shares it.
* :class:`SlidingWindowBudget` is the in-process one, for code paths without a state DB.

``DICOM_ASSETS_BUDGET_WINDOW_S`` overrides the 60-second window (:func:`budget_window_s`); it
exists for tests and benchmarks (a 60-request-per-5-seconds budget binds quickly), never set it in
production: the PACS's limit is per minute.
"""

from __future__ import annotations

import collections
import logging
import os
import random
import threading
import time
from typing import TYPE_CHECKING, Any, Callable, Protocol

from dicom_assets import stopping
from dicom_assets.pacs.adaptive_rate import BudgetRate, RatePolicy

log = logging.getLogger("dicom_assets.pacs")

if TYPE_CHECKING:
    from dicom_assets.store import StateStore

#: Overrides the budget window (seconds) of :class:`DatabaseBudget`; for tests and benchmarks.
WINDOW_ENV_VAR = "DICOM_ASSETS_BUDGET_WINDOW_S"
DEFAULT_WINDOW_S = 60.0
#: Added to the window the database enforces: slack for the spread of the delay between a grant
#: and the request's arrival at the PACS (scheduling, a retransmitted TCP SYN is 1 s).
DEFAULT_MARGIN_S = 1.0


def budget_window_s() -> float:
    """The budget window in seconds: ``$DICOM_ASSETS_BUDGET_WINDOW_S`` if set, else 60."""
    raw = os.environ.get(WINDOW_ENV_VAR, "").strip()
    if not raw:
        return DEFAULT_WINDOW_S
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"{WINDOW_ENV_VAR}={raw!r}: expected a number of seconds") from None
    if not value > 0:
        raise ValueError(f"{WINDOW_ENV_VAR}={raw!r}: must be > 0")
    return value


def pacs_key(host: str, port: int, called_ae_title: str) -> str:
    """The budget's name for one PACS: ``host:port/called_ae`` (host lower-cased).

    Every process configured with the same three values shares one budget; spell the host the
    same way everywhere (``pacs.example.org`` and its IP address would be two budgets).
    """
    return f"{host.strip().lower()}:{int(port)}/{called_ae_title.strip()}"


def server_key(client: Any) -> str:
    """The name of the server a client talks to, for watermarks: a DICOMweb client's
    ``server_key`` (``dicomweb.budget_key()``), else :func:`pacs_key` of its ``pacs:`` settings."""
    key = getattr(client, "server_key", None)
    if isinstance(key, str):
        return key
    s = client.settings
    return pacs_key(s.host, s.port, s.called_ae_title)


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


class DatabaseBudget:
    """The budget of one PACS, shared through the state DB by every process that uses it.

    ``acquire`` asks :meth:`StateStore.take_request_token` (one short transaction) for a token in
    a window of ``window_s + margin_s`` seconds, and sleeps for the time it is told to wait when
    the window is full.

    **Guarantee.** No ``max_per_minute + 1`` grants to one PACS ever fall in a half-open interval
    of ``W = window_s + margin_s`` seconds, whatever the number of threads, processes or machines
    (on one state DB, all configured with the same limit). Proof: the grants of a PACS are
    serialised by the lock on its ``pacs_budgets`` row and each is stamped, under the lock, with
    a time no earlier than the previous grant's (``max(clock, last_sent_at)``), so stamps increase
    in grant order. Suppose ``[s, s + W)`` held N + 1 grants and let ``g`` (stamp ``t_g``) be the
    last of them granted. The other N have stamps in ``[s, t_g]``, so ``> t_g - W``: pruning
    (which deletes only stamps ``<= t_g - W``) had not removed them, and all N were committed
    before ``g`` took the lock. ``g`` therefore counted at least N grants in its window and was
    refused - a contradiction.

    From grants to the PACS: a request reaches the PACS some delay ``d`` after its grant's stamp.
    If ``d`` varies by at most ``margin_s`` (``d_min <= d <= d_min + margin_s``), the requests
    arriving in any interval ``[a, a + window_s)`` were stamped in ``[a - d_min - margin_s,
    a - d_min + window_s)``, a half-open interval of ``window_s + margin_s`` seconds, so there are
    at most N of them: the PACS never sees more than N in any ``window_s`` window. (A grant never
    used, e.g. for an association that failed, only leaves the PACS more room.) Processes
    configured with different limits each keep their own limit against the shared log, so the
    PACS sees at most the largest of them.
    """

    def __init__(
        self,
        store: "StateStore",
        pacs_key: str,
        max_per_minute: int,
        window_s: float | None = None,
        margin_s: float = DEFAULT_MARGIN_S,
        sleep: Callable[[float], None] = stopping.sleep,
        adaptive: bool = True,
        floor: int | None = None,
    ) -> None:
        if max_per_minute < 1:
            raise ValueError("max_per_minute must be >= 1")
        if margin_s < 0:
            raise ValueError("margin_s must be >= 0")
        self.store = store
        self.pacs_key = pacs_key
        self.max_per_minute = max_per_minute
        self.window_s = budget_window_s() if window_s is None else float(window_s)
        if self.window_s <= 0:
            raise ValueError("window_s must be > 0")
        self.margin_s = margin_s
        floor = max(1, max_per_minute // 10) if floor is None else min(floor, max_per_minute)
        #: The adaptive rate (dicom_assets.pacs.adaptive_rate); None: always ``max_per_minute``.
        self.policy = RatePolicy(max_per_minute, floor, self.window_s) if adaptive else None
        self._sleep = sleep
        self._lock = threading.Lock()
        self.total = 0
        self.waits = 0
        self.waited_s = 0.0
        self.resets_noted = 0  # resets/aborts this process reported (adaptive concurrency's clean epochs)

    @property
    def enforced_window_s(self) -> float:
        """The window the database enforces: ``window_s + margin_s``."""
        return self.window_s + self.margin_s

    def acquire(self, what: str = "request") -> None:
        while True:
            wait = self.store.take_request_token(
                self.pacs_key, self.max_per_minute, self.enforced_window_s, what, policy=self.policy
            )
            if wait <= 0:
                with self._lock:
                    self.total += 1
                return
            # A little jitter so the waiters of many processes do not all retry at the same instant.
            wait = min(wait, self.enforced_window_s) + random.uniform(0.0, 0.01)
            with self._lock:
                self.waits += 1
                self.waited_s += wait
            self._sleep(wait)

    def note_reset(self) -> None:
        """The PACS reset or aborted an association: every worker on this state DB slows down."""
        with self._lock:
            self.resets_noted += 1
        if self.policy is None:
            return
        limit = self.store.note_pacs_reset(self.pacs_key, self.policy)
        log.warning(
            "%s reset or aborted an association: request rate now %d per %g s (of %d)",
            self.pacs_key, limit, self.window_s, self.max_per_minute,
        )  # fmt: skip

    def rate(self) -> BudgetRate:
        """The limit in force now, the lowest reached, and the resets seen (for status and metadata)."""
        policy = self.policy or RatePolicy(self.max_per_minute, self.max_per_minute, self.window_s)
        return self.store.budget_rate(self.pacs_key, policy)

    def describe(self) -> str:
        return (
            f"{self.max_per_minute} requests per {self.window_s:g} s to {self.pacs_key} "
            f"(shared through the state DB, {self.margin_s:g} s margin)"
        )
