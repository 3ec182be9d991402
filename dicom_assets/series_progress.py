"""The run log's progress lines of a retrieval: what a user watching the run needs, batched.

Each line a Dagster run logs is an event written to its storage before the worker goes on: a
line per series cost the retrieving worker a few ms between two series, and a million-series
run a million events. So a series that did not complete is logged at once (someone may act on
it), and completed series are summed up in one line per ``every_s`` seconds.
"""

from __future__ import annotations

import threading
import time
from typing import Protocol

from dicom_assets.series_attempt import SeriesOutcome


class ProgressLog(Protocol):
    """Where the lines go: a Dagster run's ``context.log`` or a :class:`logging.Logger`."""

    def info(self, msg: str) -> object: ...

    def warning(self, msg: str) -> object: ...


class SeriesProgress:
    """Called with each series' outcome from the retrieval workers' threads; ``flush`` writes
    the completed series not yet in a line (call it when retrieval ends)."""

    def __init__(self, log: ProgressLog, every_s: float = 5.0) -> None:
        self.log = log
        self.every_s = every_s
        self.done = 0
        self._lock = threading.Lock()
        self._pending: list[SeriesOutcome] = []
        self._last = time.monotonic()

    def note(self, outcome: SeriesOutcome) -> None:
        with self._lock:
            self.done += 1
            if outcome.status != "complete":
                self.log.warning(
                    f"[{self.done}] series {outcome.series_instance_uid}: {outcome.status}, {outcome.instances} instances, "
                    f"{outcome.seconds:.1f}s ({outcome.error})"
                )  # fmt: skip
                return
            self._pending.append(outcome)
            if time.monotonic() - self._last >= self.every_s:
                self._write()

    def flush(self) -> None:
        with self._lock:
            self._write()

    def _write(self) -> None:
        self._last = time.monotonic()
        if not self._pending:
            return
        done, self._pending = self._pending, []
        instances, size = sum(o.instances for o in done), sum(o.bytes_received for o in done)
        last = done[-1]
        self.log.info(
            f"[{self.done}] {len(done)} series complete since the last line ({instances} instances, {size / 1e6:.1f} MB), "
            f"the last {last.series_instance_uid} in {last.seconds:.1f}s"
        )  # fmt: skip
