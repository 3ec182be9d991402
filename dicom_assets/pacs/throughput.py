"""The bytes of instance data this process receives, for the adaptive concurrency's epochs
(:mod:`dicom_assets.pacs.concurrency`): counted where the data is written, as it arrives, so a
multi-GB instance counts while it streams, not only when it ends."""

from __future__ import annotations

import threading


class ByteMeter:
    """Bytes of instance data received by this process (every retrieval path adds to it)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._total = 0

    def add(self, n: int) -> None:
        with self._lock:
            self._total += n

    @property
    def total(self) -> int:
        with self._lock:
            return self._total


#: The process's meter: the storage SCP, the C-GET sinks and WADO-RS add to it.
RECEIVED = ByteMeter()


class HostCpu:
    """How busy this machine's CPUs were between two readings (Linux ``/proc/stat``).

    More associations only move more while something is idle: once every core is busy (our
    receiving and writing, on loopback the PACS too) they share the CPU and each goes slower;
    loopback C-GET on 2 cores: 2 associations 463 MB/s, 4 387, 8 slower still with up to twice
    the CPU seconds. Elsewhere than Linux nothing is known (None), and the count is probed as before.
    """

    def __init__(self, stat: str = "/proc/stat") -> None:
        self.stat = stat

    def reading(self) -> tuple[int, int] | None:
        """(busy, total) clock ticks of all CPUs since boot, or None when unknown."""
        try:
            with open(self.stat, encoding="ascii") as f:
                fields = f.readline().split()
        except OSError:
            return None
        if len(fields) < 6 or fields[0] != "cpu" or not all(v.isdigit() for v in fields[1:9]):
            return None
        ticks = [int(v) for v in fields[1:9]]  # user nice system idle iowait irq softirq steal
        idle = ticks[3] + ticks[4]  # steal is busy: another guest has the core
        return sum(ticks) - idle, sum(ticks)

    @staticmethod
    def busy_share(before: tuple[int, int] | None, after: tuple[int, int] | None) -> float | None:
        """Share (0..1) of the CPUs' time that was busy between two readings."""
        if before is None or after is None or after[1] <= before[1]:
            return None
        return (after[0] - before[0]) / (after[1] - before[1])
