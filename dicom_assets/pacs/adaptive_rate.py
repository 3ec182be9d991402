"""The adaptive request rate: halve when the PACS resets associations, recover additively.

A PACS shared with other clients resets every connection when *all* its clients together send
more than its limit, whatever our own budget says. Resets are the only signal we get, so the
shared budget (:class:`~dicom_assets.pacs.budget.DatabaseBudget`) treats them like TCP treats
loss: cut the rate in half (at most once per cooldown, so the four workers that see one reset
cut it once), then add a tenth of the configured maximum back every window. From the floor of
a tenth of 700/min the rate is back at 700 in nine minutes; from a single halving in five.

The state (current limit, when it last changed, resets seen, lowest limit) lives in the state DB
(``pacs_budgets``), so every worker and machine slows down together; this module is only the
arithmetic, with no SQL.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime


@dataclass(frozen=True)
class RatePolicy:
    """How the limit of one PACS moves: ``max_per_window`` at most, ``floor`` at least."""

    max_per_window: int
    floor: int
    window_s: float

    @property
    def step(self) -> int:
        """Requests per window added back after each window without a cut."""
        return max(1, self.max_per_window // 10)

    @property
    def cooldown_s(self) -> float:
        """Resets within this time of the last cut do not cut again (one event, many sockets)."""
        return self.window_s / 6

    def current(self, limit: int | None, changed_at: datetime | None, now: datetime) -> int:
        """The limit in force at ``now``: the last cut plus the recovery since, capped at the max."""
        if limit is None or changed_at is None:
            return self.max_per_window
        windows = max(0, int((now - changed_at).total_seconds() // self.window_s))
        return min(self.max_per_window, max(self.floor, limit) + windows * self.step)

    def after_reset(self, limit: int | None, changed_at: datetime | None, now: datetime) -> int | None:
        """The new limit after a reset at ``now`` (its recovery starts again from now), or None
        when the reset falls in the cooldown of the last cut. At the floor, resets keep the rate
        there: recovery waits for a quiet window."""
        if limit is not None and changed_at is not None and (now - changed_at).total_seconds() < self.cooldown_s:
            return None
        return max(self.floor, self.current(limit, changed_at, now) // 2)


@dataclass(frozen=True)
class BudgetRate:
    """What ``dicom-assets status`` and the run metadata show about a PACS's budget."""

    max_per_window: int
    current_per_window: int
    lowest_per_window: int
    resets: int
    last_reset_at: datetime | None
    window_s: float

    def per_minute(self, per_window: int) -> int:
        """A limit per window as requests per minute (the window is 60 s but in tests)."""
        return round(per_window * 60.0 / self.window_s)

    def describe(self) -> str:
        line = (
            f"request rate {self.per_minute(self.current_per_window)}/min of {self.per_minute(self.max_per_window)}/min"
            f" (lowest {self.per_minute(self.lowest_per_window)}/min); {self.resets} resets by the PACS"
        )
        if self.last_reset_at is not None:
            line += f", last at {self.last_reset_at:%Y-%m-%d %H:%M:%S} UTC"
        return line
