"""The adaptive number of concurrent retrieves: find what the link and the PACS sustain.

Over a WAN every C-STORE waits a round trip for its response before the PACS sends the next
instance, so one association is bound by the round trip (about 16 MB/s at 20 ms and 0.5 MB per
instance) and the throughput grows with the number of associations until the link, the PACS or
our CPU is full. On loopback it does not grow at all past two. Nobody can know the right count
for their site in advance, and too many make a PACS answer A7xx/C0xx or reset.

So the count is probed, like TCP's congestion window, one epoch (a second of transfer, 0.3 s
while doubling) at a time:

* **grow while it pays**: from the starting count (its first epoch, the run's start-up, is not
  measured), double while each step brings at least a
  quarter of the proportional gain (4 associations must give >= 1.25x the throughput of 2), then, after
  the first step that does not (a doubling gets a second epoch before it is refused: the first
  may end before the new associations' bytes flow), go back to the last good count and probe one
  more at a time every ``reprobe_after_epochs`` epochs; no doubling while this machine's CPUs
  are all busy (``cpu_full``: more associations would share them); when the very first doubling
  did not pay or the CPU was full at the start, half the start is tried once and kept unless
  it moves clearly less (under 90 %);
* **back off** to half on an A7xx/C0xx answer or a reset (a reset with the adaptive request rate,
  in one update of the PACS's row: one controller for both; not below 2, see
  :data:`RESET_FLOOR`), and by one when the time per instance
  rises ``latency_factor`` times above the best seen (the PACS queues our requests);
* between 1 and the ceiling, ``pacs.max_concurrent_associations``.

This module is only the arithmetic; :mod:`dicom_assets.pacs.concurrency` measures, gates the
workers and keeps the shared limit in the state DB.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass


#: A reset halves the count but not below this: links reset for reasons of their own (a VPN's
#: nightly drop, a flaky hop) that fewer associations do not cure, and two is what retrieval ran
#: with before it adapted. A7xx/C0xx, the PACS's own "too many", go down to 1.
RESET_FLOOR = 2


def reset_cut(count: int) -> int:
    """The count after a reset: half, not below :data:`RESET_FLOOR` (nor above ``count``)."""
    return max(min(RESET_FLOOR, count), count // 2)


@dataclass(frozen=True)
class Probe:
    """Where the probing of one PACS stands, in this process."""

    limit: int  # concurrent retrieves allowed now
    base_limit: int  # the last count whose throughput is known (the fallback of a probe)
    base_throughput: float = 0.0  # bytes/s measured at base_limit; 0: not measured yet
    slow_start: bool = True  # doubling until the first step that does not pay
    settled_epochs: int = 0  # epochs at base_limit since the last probe
    best_latency: float | None = None  # the lowest seconds per instance seen
    second_look: bool = False  # the doubling to ``limit`` did not pay in its first epoch
    started: bool = False  # the first epoch of a run (the workers' start-up) has passed

    @property
    def in_startup(self) -> bool:
        """The next epoch is the run's start-up: not measured (only a first probe has one)."""
        return self.slow_start and not self.started


@dataclass(frozen=True)
class ConcurrencyPolicy:
    """How the count moves: between 1 and ``ceiling``, one decision per epoch."""

    ceiling: int
    start: int = 4  # pacs.start_concurrent_associations: the first run against a PACS; later ones start from what it found
    epoch_s: float = 1.0
    #: Epochs while doubling are shorter: the ramp to a WAN's count costs two or three of them at
    #: a fraction of the throughput, and a doubling's gain (about 2x) stands well above the noise
    #: of 0.3 s of transfer (some 10 MB at 2 associations over 20 ms). The WAN benchmark (1.09 GB
    #: over 20 ms): defaults 0.88x of fixed 8 with 0.5 s, 0.89-0.91x with 0.3 s; 0.2 s epochs after
    #: a 0.15 s warm-up judged 8 associations before they all ran and fell back to 4 (0.58x on
    #: 2.2 GB), so the warm-up is 6x an association's set-up (0.93x on 2.2 GB).
    slow_start_epoch_s: float = 0.3
    #: Not measured after a change: the new associations are being set up (TCP, A-ASSOCIATE,
    #: the C-MOVE, the PACS's association back, the first instance: ~6 round trips). At least
    #: ``warmup_s``; ``warmup_per_open`` times the time an association takes to open (about two
    #: round trips) when that is known, so a far PACS is not judged before its bytes flow; at most
    #: ``max_warmup_s``.
    warmup_s: float = 0.2
    warmup_per_open: float = 6.0
    max_warmup_s: float = 2.0
    reprobe_after_epochs: int = 15
    latency_factor: float = 3.0
    #: Share of this machine's CPU time busy in an epoch from which slow start stops doubling
    #: (:class:`~dicom_assets.pacs.throughput.HostCpu`); ``reprobe_after_epochs``' one-at-a-time
    #: probes still run, so a WAN retrieval on a machine busy with other work can still grow.
    cpu_full: float = 0.9
    #: Share of the start's throughput that half the start must move to be kept: loopback C-GET
    #: on 2 cores went back from 2 to 4 on 589 against 624 MB/s (0.94), where 2 moves 463-521
    #: over a whole run and 4 387-448.
    fewer_share: float = 0.9
    #: Share of the proportional gain a larger count must bring to be kept (0.25: doubling from
    #: 4 to 8 must give 1.25x the throughput; a link that is filling up gives less than 2x, and
    #: noise between epochs is some 10 %).
    gain_share: float = 0.25

    def warmup(self, association_open_s: float | None) -> float:
        """Seconds not measured after a change of the count."""
        scaled = self.warmup_per_open * association_open_s if association_open_s else 0.0
        return min(self.max_warmup_s, max(self.warmup_s, scaled))

    def epoch_length(self, probe: Probe) -> float:
        """Seconds of the next epoch: short while doubling, then ``epoch_s``."""
        return self.slow_start_epoch_s if probe.slow_start else self.epoch_s

    def first(self, shared_limit: int | None) -> Probe:
        """The probe at the start of a retrieval: from the count the state DB holds (what
        earlier runs found), else from ``start``; within the ceiling."""
        limit = self._within(shared_limit if shared_limit is not None else self.start)
        return Probe(limit=limit, base_limit=limit, slow_start=shared_limit is None)

    def _within(self, count: int) -> int:
        return max(1, min(self.ceiling, count))

    def cut(self, limit: int) -> int:
        """The count after an A7xx/C0xx answer or a reset: half, at least 1."""
        return max(1, limit // 2)

    def adopt(self, probe: Probe, shared_limit: int) -> Probe:
        """Another worker or process cut the shared count: follow it, probe again slowly."""
        limit = self._within(shared_limit)
        return Probe(limit=limit, base_limit=limit, slow_start=False, best_latency=probe.best_latency)

    def after_epoch(self, probe: Probe, throughput: float, latency: float | None, saturated: bool,
                    cpu_busy: float | None = None) -> Probe:
        """The probe after an epoch at ``probe.limit`` that moved ``throughput`` bytes/s.

        ``latency``: seconds per instance of the attempts that ended in the epoch (None: none
        ended). ``saturated``: every allowed worker had a series during the epoch; an epoch with
        idle workers (the end of a run) says nothing about the count and changes nothing.
        ``cpu_busy``: share of this machine's CPU time that was busy in the epoch (None: unknown).
        """
        if not saturated or throughput <= 0:
            return probe
        best = latency if probe.best_latency is None or (latency is not None and latency < probe.best_latency) else probe.best_latency
        probe = dataclasses.replace(probe, best_latency=best)
        if probe.limit > probe.base_limit:
            return self._judge_probe(probe, throughput, cpu_busy)
        if probe.limit < probe.base_limit:
            return self._judge_fewer(probe, throughput)
        if probe.in_startup:
            # The run's first epoch holds its start-up (associations opening, a C-GET's IMAGE-level
            # query before the first byte): 93 MB/s at 4 C-GETs where 4 move 225-300, and a base
            # that low lets any doubling "pay". It is not a base; the next epoch is.
            return dataclasses.replace(probe, started=True)
        measured = throughput if probe.base_throughput <= 0 else (probe.base_throughput + throughput) / 2
        probe = dataclasses.replace(probe, base_throughput=measured)
        if latency is not None and best is not None and latency > self.latency_factor * best and probe.limit > 1:
            return Probe(limit=probe.limit - 1, base_limit=probe.limit - 1, slow_start=False, best_latency=best)
        if probe.slow_start and self._cpu_full(cpu_busy):
            # Every core is busy: a doubling would share the CPU, not move more (loopback C-GET on
            # 2 cores: 4 associations 387 MB/s, 8 fewer, and the epochs spent finding that out
            # took a 2.4 s run from 387 to 291). Settle here, or try half the start.
            return self._stop_doubling(probe)
        if probe.slow_start or probe.settled_epochs + 1 >= self.reprobe_after_epochs:
            return self._step_up(probe)
        return dataclasses.replace(probe, settled_epochs=probe.settled_epochs + 1)

    def _cpu_full(self, cpu_busy: float | None) -> bool:
        return cpu_busy is not None and cpu_busy >= self.cpu_full

    def _judge_probe(self, probe: Probe, throughput: float, cpu_busy: float | None) -> Probe:
        """Keep the larger count if it paid, else go back to the last good one.

        A doubling that did not pay is measured once more first: its first epoch can end while
        the new associations are still being set up (over 20 ms a C-MOVE's first instance comes
        some six round trips after the change), and one such epoch used to undo the doubling to 8
        that the WAN benchmark needs (0.58x of fixed 8 on 2.2 GB).
        """
        step = (probe.limit - probe.base_limit) / probe.base_limit
        if throughput >= probe.base_throughput * (1 + self.gain_share * step):
            kept = dataclasses.replace(probe, base_limit=probe.limit, base_throughput=throughput, settled_epochs=0, second_look=False)
            if not probe.slow_start:
                return kept
            return self._stop_doubling(kept) if self._cpu_full(cpu_busy) else self._step_up(kept)
        if probe.slow_start and not probe.second_look:
            return dataclasses.replace(probe, second_look=True)
        if probe.slow_start:
            return self._stop_doubling(probe)
        return dataclasses.replace(probe, limit=probe.base_limit, settled_epochs=0, second_look=False)

    def _stop_doubling(self, probe: Probe) -> Probe:
        """The end of slow start: back to (or stay at) the last good count and probe one at a
        time from there. When that is still the start (the very first doubling did not pay, or
        the CPU was full at the start), the start itself may be more than the PACS and this
        machine serve well (loopback C-GET here: 2 associations 344-404 MB/s, 4 225-353), and
        nothing else ever goes below it: half is tried once."""
        back = dataclasses.replace(probe, limit=probe.base_limit, slow_start=False, settled_epochs=0, second_look=False)
        if probe.base_limit == self._within(self.start) and probe.base_limit >= 2:
            return dataclasses.replace(back, limit=probe.base_limit // 2)
        return back

    def _judge_fewer(self, probe: Probe, throughput: float) -> Probe:
        """After trying half the start: keep it unless it moved clearly less (``fewer_share``:
        fewer associations are less load on the PACS and less CPU here, and the noise between
        epochs is some 10 %), else go back. Only an epoch without a worker leaving is judged
        (the gate's ``saturated``), so the series the extra workers finish do not count for it."""
        if throughput >= self.fewer_share * probe.base_throughput:
            return dataclasses.replace(probe, base_limit=probe.limit, base_throughput=throughput, settled_epochs=0)
        return dataclasses.replace(probe, limit=probe.base_limit, settled_epochs=0)

    def _step_up(self, probe: Probe) -> Probe:
        limit = min(self.ceiling, probe.limit * 2 if probe.slow_start else probe.limit + 1)
        if limit == probe.limit:  # at the ceiling: nothing to probe
            return dataclasses.replace(probe, slow_start=False, settled_epochs=0)
        return dataclasses.replace(probe, limit=limit, settled_epochs=0)
