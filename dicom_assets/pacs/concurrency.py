"""How many retrieves run at once: the workers' gate, the throughput meter and the probe.

Retrieval starts ``pacs.max_concurrent_associations`` worker threads (the ceiling); worker ``i``
retrieves only while ``i`` is below the count in force and it holds a slot of the PACS in the
state DB (``pacs_slots``), so the workers of every process and machine together stay within
the count. A monitor thread measures, every epoch, the bytes this process received
(:data:`RECEIVED`, counted where instance data is written) and lets
:class:`~dicom_assets.pacs.adaptive_concurrency.ConcurrencyPolicy` move the count; the count is
kept in the PACS's budget row, where a reset (with the adaptive rate) or an A7xx/C0xx answer
halves it for every worker. Workers above the count finish their series, close their
association and wait. With ``pacs.adaptive_concurrency: false`` the count is the ceiling.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

from dicom_assets.layout import pid_alive
from dicom_assets.pacs.adaptive_concurrency import ConcurrencyPolicy, Probe
from dicom_assets.pacs.throughput import RECEIVED, ByteMeter, HostCpu

if TYPE_CHECKING:
    from dicom_assets.store import StateStore

log = logging.getLogger("dicom_assets.pacs")

SLOT_LEASE_S = 120.0  # renewed every epoch; the slot of a process that died frees itself after this
CUT_COOLDOWN_S = 2.0  # refusals within this time of the last cut are the same event (retries back off 2 s first)


@dataclass(frozen=True)
class ConcurrencyReport:
    """For the run's metadata: the count at the end, the highest reached, the cuts."""

    final: int
    peak: int
    cuts: int
    epochs: int


@dataclass(frozen=True)
class _EpochStart:
    """What an epoch's judgement compares with: the count, bytes, clock, faults, cuts and CPU
    ticks when it began."""

    limit: int
    bytes: int
    time: float
    faults: int
    cuts: int
    cpu: tuple[int, int] | None


class RetrieveGate:
    """Lets worker ``i`` retrieve while ``i`` < the count in force and it holds a PACS slot."""

    def __init__(
        self,
        policy: ConcurrencyPolicy,
        adaptive: bool,
        store: "StateStore | None" = None,
        pacs_key: str | None = None,
        meter: ByteMeter = RECEIVED,
        clock: Callable[[], float] = time.monotonic,
        faults: Callable[[], int] = lambda: 0,
        association_open_s: Callable[[], float | None] = lambda: None,
        host_cpu: HostCpu | None = None,
    ) -> None:
        self.policy = policy
        self.adaptive = adaptive
        self.store = store if adaptive and pacs_key else None
        self.pacs_key = pacs_key
        self.meter = meter
        self.clock = clock
        self.faults = faults  # connection faults seen so far: an epoch with one is not judged
        self.association_open_s = association_open_s  # how far away the PACS is (the warm-up scales with it)
        self.host_cpu = host_cpu or HostCpu()  # a full CPU ends the doubling: more associations would share it
        shared = self.store.concurrency_limit(pacs_key) if self.store is not None else None  # type: ignore[arg-type]
        self.probe: Probe = policy.first(shared) if adaptive else Probe(limit=policy.ceiling, base_limit=policy.ceiling)
        self.peak = self.probe.limit
        self.cuts = 0
        self.epochs = 0
        self._cond = threading.Condition()
        # One decision at a time: the monitor's judgement of an epoch and a worker's refusal each
        # read the count, change it and write it to the state DB. Unserialized, a doubling decided
        # just before a refusal was written after the cut and undid it (the store held 8 while
        # the gate ran at 2).
        self._decide = threading.Lock()
        self._finished = False
        self._holders: set[str] = set()
        self._left_in_epoch = False
        self._instances = 0
        self._seconds = 0.0
        self._monitor: threading.Thread | None = None
        self._written: int | None = None

    # ---- the workers' side

    @property
    def limit(self) -> int:
        return self.probe.limit

    def enter(self, index: int, holder: str) -> bool:
        """Block until worker ``index`` may retrieve (True), or the retrieval is over (False)."""
        while True:
            with self._cond:
                while not self._finished and index >= self.probe.limit:
                    self._cond.wait(0.5)
                if self._finished:
                    return False
                limit = self.probe.limit
            if self.store is None or self.store.take_pacs_slot(self.pacs_key, holder, limit, SLOT_LEASE_S):  # type: ignore[arg-type]
                with self._cond:
                    self._holders.add(holder)
                return True
            with self._cond:  # another process holds the slots: wait for one
                self._cond.wait(1.0)

    def keeps(self, index: int) -> bool:
        """After a series: may worker ``index`` go on (the count may have dropped)?"""
        return not self._finished and index < self.probe.limit

    def leave(self, holder: str) -> None:
        with self._cond:
            self._holders.discard(holder)
            self._left_in_epoch = True
            self._cond.notify_all()
        if self.store is not None:
            self.store.release_pacs_slots(self.pacs_key, [holder])  # type: ignore[arg-type]

    def finish(self) -> None:
        """Nothing left to claim, or the run stops: waiting workers leave."""
        with self._cond:
            self._finished = True
            self._cond.notify_all()

    def series_ended(self, instances: int, seconds: float) -> None:
        with self._cond:
            self._instances += instances
            self._seconds += seconds

    def refused(self) -> None:
        """An A7xx/C0xx answer: half the count, for every worker (once per event)."""
        if not self.adaptive:
            return
        with self._decide:
            if self.store is not None:
                limit = self.store.cut_concurrency(self.pacs_key, self.probe.limit, CUT_COOLDOWN_S)  # type: ignore[arg-type]
            else:
                limit = self.policy.cut(self.probe.limit)
            self._adopt(limit)

    # ---- the monitor

    def start(self) -> "RetrieveGate":
        if self.adaptive:
            self._free_dead_slots()
            self._write(self.probe.limit)  # in the PACS's row from the start: a reset cuts it at once
            self._monitor = threading.Thread(target=self._run, name="concurrency", daemon=True)
            self._monitor.start()
        return self

    def stop(self) -> ConcurrencyReport:
        self.finish()
        if self._monitor is not None:
            self._monitor.join(timeout=(self.policy.epoch_s + self.policy.max_warmup_s) * 3)
        return ConcurrencyReport(final=self.probe.limit, peak=self.peak, cuts=self.cuts, epochs=self.epochs)

    def _run(self) -> None:
        """One epoch after another; after a change of the count the first ``warmup`` seconds
        are not measured: new associations are still being set up. A run's first epoch, its
        start-up, is not measured either: it is the warm-up (at least as long), not a wait before
        it (over 20 ms that wait was 0.24 s at half the count's throughput)."""
        changed = True
        while True:
            startup = self.probe.in_startup
            if changed and not startup and self._wait(self.policy.warmup(self.association_open_s())):
                return
            start = self._open_epoch()
            if self._wait(self.policy.epoch_length(self.probe)):
                return
            if startup and self._wait(self.policy.warmup(self.association_open_s()) - (self.clock() - start.time)):
                return  # the start-up lasts the warm-up, known by now (the first associations have opened)
            self._close_epoch(start)
            changed = self.probe.limit != start.limit

    def _open_epoch(self) -> "_EpochStart":
        with self._cond:
            self._left_in_epoch = False
            self._instances, self._seconds = 0, 0.0
            limit = self.probe.limit
        return _EpochStart(limit, self.meter.total, self.clock(), self.faults(), self.cuts, self.host_cpu.reading())

    def _close_epoch(self, start: "_EpochStart") -> None:
        """Measure the epoch and judge it, as one decision (no refusal in between)."""
        with self._decide:
            with self._cond:
                # Judged only when every allowed worker retrieved through the whole epoch and the
                # PACS answered cleanly (no reset, refusal or broken connection in it).
                clean = self.faults() == start.faults and self.cuts == start.cuts
                saturated = clean and not self._left_in_epoch and len(self._holders) >= self.probe.limit
                instances, seconds = self._instances, self._seconds
            throughput = (self.meter.total - start.bytes) / max(self.clock() - start.time, 1e-6)
            cpu_busy = HostCpu.busy_share(start.cpu, self.host_cpu.reading())
            try:
                self._epoch(throughput, seconds / instances if instances else None, saturated, cpu_busy)
            except Exception:  # noqa: BLE001 - the count stays; retrieval goes on
                log.exception("concurrency probe failed; the count stays at %d", self.probe.limit)

    def _wait(self, seconds: float) -> bool:
        """Sleep ``seconds`` unless the retrieval ends first (True: it ended)."""
        with self._cond:
            return self._cond.wait_for(lambda: self._finished, timeout=seconds)

    def _epoch(self, throughput: float, latency: float | None, saturated: bool, cpu_busy: float | None = None) -> None:
        """Judge one epoch and write the count it leaves; called holding ``_decide``."""
        self.epochs += 1
        if self.store is not None:
            shared = self.store.concurrency_limit(self.pacs_key)  # type: ignore[arg-type]
            if shared is not None and shared < self.probe.limit and shared != self._written:
                self._adopt(shared)  # cut by a reset or another process's refusal
                return
            self.store.renew_pacs_slots(self.pacs_key, sorted(self._holders), SLOT_LEASE_S)  # type: ignore[arg-type]
        before = self.probe.limit
        with self._cond:
            self.probe = self.policy.after_epoch(self.probe, throughput, latency, saturated, cpu_busy)
            self.peak = max(self.peak, self.probe.limit)
            self._cond.notify_all()
        if self.probe.limit != before:
            cpu = f", CPU {cpu_busy:.0%} busy" if cpu_busy is not None else ""
            log.info("concurrent retrieves %d -> %d (%.1f MB/s at %d%s)", before, self.probe.limit, throughput / 1e6, before, cpu)
        if self.probe.limit != before or self._written is None:
            self._write(self.probe.limit)

    def _adopt(self, limit: int) -> None:
        with self._cond:
            if limit < self.probe.limit:
                self.cuts += 1
                log.warning("concurrent retrieves cut %d -> %d (the PACS refused or reset)", self.probe.limit, limit)
            self.probe = self.policy.adopt(self.probe, limit)
            self._cond.notify_all()
        self._written = limit

    def _write(self, limit: int) -> None:
        if self.store is not None:
            self.store.set_concurrency_limit(self.pacs_key, limit)  # type: ignore[arg-type]
        self._written = limit

    def _free_dead_slots(self) -> None:
        """Slots of this host's dead processes (kill -9) go at once, not after their lease."""
        if self.store is None:
            return
        host = socket.gethostname()
        dead = []
        for holder in self.store.pacs_slot_holders(self.pacs_key):  # type: ignore[arg-type]
            parts = holder.rsplit(":", 2)
            if len(parts) == 3 and parts[0] == host and parts[1].isdigit() and not pid_alive(int(parts[1])):
                dead.append(holder)
        self.store.release_pacs_slots(self.pacs_key, dead)  # type: ignore[arg-type]
