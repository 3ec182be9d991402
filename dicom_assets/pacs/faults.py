"""How a PACS client rides out faults: the request gate, the outage clock and the backoff.

* :class:`RequestGate` holds back every new request of a client during blackout windows and
  after a backoff hold (one worker's A702 slows every worker down).
* :class:`OutageClock` measures an outage: the time since the PACS last made progress, started
  by the first connection fault after progress. A client waits out an outage for up to
  ``pacs.wait_for_pacs_s`` (then the run stops with :class:`~dicom_assets.pacs.errors.PacsUnreachable`
  and no attempt used); progress (an answered request, new instances on disk) ends it. A link
  that resets every few seconds while instances keep arriving is therefore never an outage,
  and a PACS that answers C-ECHO but resets every retrieve before anything arrives is one.
* :class:`Backoff` is the capped exponential backoff with jitter (tenacity's strategy), reset by
  progress.

Every wait sleeps through :func:`dicom_assets.stopping.sleep`, so SIGTERM ends it at once.
"""

from __future__ import annotations

import logging
import threading
import time
from datetime import datetime
from datetime import time as dtime
from types import SimpleNamespace
from typing import Callable, Sequence

from tenacity import wait_exponential_jitter

from dicom_assets import stopping

log = logging.getLogger("dicom_assets.pacs")


class RequestGate:
    """Holds back new requests: during blackout windows (local time) and after backoff holds.

    Shared by every session of a :class:`~dicom_assets.pacs.client.PacsClient` (so one worker's
    backoff after an A702 slows every worker down). ``wait`` blocks until a request may be sent.
    """

    def __init__(
        self,
        windows: Sequence[tuple[dtime, dtime]] = (),
        now: Callable[[], datetime] = datetime.now,
        sleep: Callable[[float], None] = stopping.sleep,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.windows = list(windows)
        self._now = now
        self._sleep = sleep
        self._clock = clock
        self._hold_until = float("-inf")
        self._lock = threading.Lock()
        self.waited_s = 0.0

    def blackout_remaining(self, now: datetime | None = None) -> float:
        """Seconds until the blackout window containing ``now`` (local time) ends; 0 outside."""
        now = now or self._now()
        t = now.hour * 3600 + now.minute * 60 + now.second + now.microsecond / 1e6
        remaining = 0.0
        for start, end in self.windows:
            s, e = start.hour * 3600 + start.minute * 60 + start.second, end.hour * 3600 + end.minute * 60 + end.second
            inside = s <= t < e if s < e else (t >= s or t < e)
            if inside:
                remaining = max(remaining, (e - t) % 86400)
        return remaining

    def hold(self, seconds: float) -> None:
        """Send nothing for ``seconds`` from now (backoff after an overload status or a fault)."""
        with self._lock:
            self._hold_until = max(self._hold_until, self._clock() + seconds)

    def wait(self) -> float:
        """Block until no blackout window and no hold applies; returns the seconds waited."""
        waited = 0.0
        announced = False
        while True:
            blackout = self.blackout_remaining()
            with self._lock:
                held = max(0.0, self._hold_until - self._clock())
            pause = max(blackout, held)
            if pause <= 0:
                self.waited_s += waited
                return waited
            if blackout > 0 and not announced:
                log.info("blackout window: no PACS requests for %.0f s", blackout)
                announced = True
            step = min(pause, 60.0)  # re-evaluate at least every minute (clock changes, new holds)
            self._sleep(step)
            waited += step


class OutageClock:
    """Seconds since the PACS last made progress, counted from the first fault after it.

    Shared by every worker of a client: while any worker brings instances in, the PACS is not
    "down" for the others, whose faults then cost time, never the run.
    """

    def __init__(self, limit_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.limit_s = limit_s
        self._clock = clock
        self._since: float | None = None
        self._lock = threading.Lock()
        self.faults = 0  # connection faults seen, ever (for the run's metadata)

    def progress(self) -> None:
        """The PACS answered or delivered: any outage is over."""
        with self._lock:
            self._since = None

    def fault(self) -> float:
        """A connection fault: starts the outage if none is running; returns its length so far."""
        with self._lock:
            self.faults += 1
            if self._since is None:
                self._since = self._clock()
            return self._clock() - self._since

    def elapsed(self) -> float:
        with self._lock:
            return 0.0 if self._since is None else self._clock() - self._since

    def remaining(self) -> float:
        """Seconds of ``pacs.wait_for_pacs_s`` this outage has left (the full limit when none runs)."""
        return max(0.0, self.limit_s - self.elapsed())

    @property
    def exhausted(self) -> bool:
        with self._lock:
            return self._since is not None and self._clock() - self._since >= self.limit_s


class Backoff:
    """Capped exponential backoff with jitter: ``initial * 2^n + U(0, initial)``, at most ``max_s``.

    ``next()`` gives the next delay; ``reset()`` (after progress) starts again from ``initial``.
    """

    def __init__(self, initial_s: float, max_s: float) -> None:
        self._strategy = wait_exponential_jitter(initial=1, exp_base=2, multiplier=initial_s, max=max_s, jitter=initial_s)
        self._n = 0

    def next(self) -> float:
        self._n += 1
        return float(self._strategy(SimpleNamespace(attempt_number=self._n)))  # type: ignore[arg-type]

    def reset(self) -> None:
        self._n = 0
