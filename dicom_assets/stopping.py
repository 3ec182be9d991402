"""Stop when asked: one process-wide flag that every wait and every open connection honours.

cron's ``timeout``, systemd and Kubernetes stop a job with SIGTERM and kill it (SIGKILL) after a
grace period (30 s in Kubernetes). A sync must therefore end within seconds of the signal, in
whatever it is doing: a backoff wait, a wait for the PACS to come back, the request budget's
wait, or a transfer in the middle of an instance. So:

* every wait of the domain code sleeps with :func:`sleep` (or :meth:`StopFlag.wait`), which
  returns early and raises :class:`Stopped` once a stop is requested;
* every blocking socket (associations to the PACS, the storage SCP) registers a closer with
  :meth:`StopFlag.on_stop`; a stop request shuts those sockets, so a read that waits for the
  PACS returns at once and the code above sees a broken connection, then :class:`Stopped`;
* the code that claimed series releases them untouched (no attempt counted, never ``complete``
  or ``failed`` because of the stop).

The CLI sets the flag from its signal handlers (:mod:`dicom_assets.cli`); a Dagster run's step
sets it when Dagster raises its interrupt in the main thread (retrieval does that).
"""

from __future__ import annotations

import itertools
import logging
import signal
import threading
import time
from contextlib import contextmanager
from typing import Callable, Iterator, TypeVar

log = logging.getLogger("dicom_assets.stopping")
T = TypeVar("T")


class Stopped(Exception):
    """The process was asked to stop (SIGTERM, SIGINT, a Dagster run terminated): unwind, keep
    what is on disk, release claims, report nothing as failed."""


class StopFlag:
    """A stop request and the closers to run when it comes (thread-safe)."""

    def __init__(self) -> None:
        self._event = threading.Event()
        self._lock = threading.Lock()
        self._closers: dict[int, Callable[[], None]] = {}
        self._ids = itertools.count()
        self.reason: str | None = None
        self.signal_number: int | None = None

    @property
    def requested(self) -> bool:
        return self._event.is_set()

    def request(self, reason: str, signal_number: int | None = None) -> None:
        """Ask everything to stop: wake every wait, shut every registered connection."""
        with self._lock:
            if self._event.is_set():
                return
            self.reason = reason
            self.signal_number = signal_number
            self._event.set()
            closers = list(self._closers.values())
        log.warning("stopping: %s", reason)
        for close in closers:
            try:
                close()
            except Exception:  # noqa: BLE001 - a closer that fails must not keep the others from running
                log.debug("a stop closer failed", exc_info=True)

    def clear(self) -> None:
        """Forget a stop request (for a process that goes on, e.g. a test runner)."""
        with self._lock:
            self._event.clear()
            self.reason = None
            self.signal_number = None

    def check(self) -> None:
        """Raise :class:`Stopped` if a stop was requested."""
        if self._event.is_set():
            raise Stopped(f"stopped: {self.reason}")

    def wait(self, seconds: float) -> None:
        """Sleep ``seconds`` unless a stop comes first; then raise :class:`Stopped`."""
        if seconds > 0:
            self._event.wait(seconds)
        self.check()

    def add_closer(self, close: Callable[[], None]) -> int:
        """Run ``close`` when a stop is requested (at once if it already was); returns a key
        for :meth:`remove_closer`. A closer must be quick and safe from another thread
        (``socket.shutdown``, setting an event)."""
        with self._lock:
            key = next(self._ids)
            self._closers[key] = close
            already = self._event.is_set()
        if already:
            close()
        return key

    def remove_closer(self, key: int) -> None:
        with self._lock:
            self._closers.pop(key, None)

    @contextmanager
    def on_stop(self, close: Callable[[], None]) -> Iterator[None]:
        """Run ``close`` if a stop is requested while inside the block (at once if already)."""
        key = self.add_closer(close)
        try:
            yield
        finally:
            self.remove_closer(key)


#: The process's stop flag: set by signals (CLI) or a Dagster interrupt, read by every wait.
PROCESS = StopFlag()


def sleep(seconds: float) -> None:
    """``time.sleep`` that a stop request interrupts (raises :class:`Stopped`)."""
    PROCESS.wait(seconds)


def exit_status(signal_number: int | None) -> int:
    """The shell's status for a process ended by a signal: 128 + N (SIGTERM 143, SIGINT 130)."""
    return 128 + (signal_number or signal.SIGTERM)


#: How long a stopped command waits for its work to unwind before it exits anyway (Kubernetes
#: kills after 30 s; the issue's promise is 10 s).
GRACE_S = 8.0


class _Outcome:
    value: object = None
    error: BaseException | None = None


def run_stoppable(work: Callable[[], T], grace_s: float = GRACE_S) -> T:
    """Run ``work`` in a worker thread while this (main) thread answers SIGTERM and SIGINT.

    The first signal requests a stop (:data:`PROCESS`): waits end, sockets close, claims are
    released, and ``work`` unwinds. If it has not within ``grace_s``, or at a second signal, the
    process exits at once with 128 + the signal number. ``work`` runs outside the main thread
    so that nothing it calls (Dagster replaces the handlers while a run executes in the main
    thread) can take the signals away. Returns ``work``'s result or raises its exception; after
    a stop the caller reads :data:`PROCESS` and exits with :func:`exit_status`.
    """
    outcome = _Outcome()

    def target() -> None:
        try:
            outcome.value = work()
        except BaseException as exc:  # noqa: BLE001 - handed to the main thread
            outcome.error = exc

    def on_signal(signum: int, _frame: object) -> None:
        if PROCESS.requested:  # a second signal: no more waiting
            _exit_now(signum, "a second signal: exiting at once")
        PROCESS.request(f"{signal.Signals(signum).name} received", signum)

    thread = threading.Thread(target=target, name="dicom-assets-work", daemon=True)
    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        thread.start()
        stop_seen_at: float | None = None
        while thread.is_alive():
            thread.join(0.1)
            if PROCESS.requested:
                stop_seen_at = stop_seen_at or time.monotonic()
                if time.monotonic() - stop_seen_at > grace_s:
                    _exit_now(PROCESS.signal_number, f"still unwinding after {grace_s:g} s: exiting")
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if outcome.error is not None:
        raise outcome.error
    return outcome.value  # type: ignore[return-value]


def _exit_now(signal_number: int | None, why: str) -> None:
    import os
    import sys

    print(f"dicom-assets: {why}; run the same command again to resume", file=sys.stderr, flush=True)
    os._exit(exit_status(signal_number))
