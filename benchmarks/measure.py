"""Run a child process and measure it: wall seconds, CPU seconds (user+sys), peak RSS.

CPU seconds come from ``os.wait4`` on that very child (the kernel's own accounting, its reaped
descendants included), not from ``RUSAGE_CHILDREN`` deltas, which would mix in every other child
of the harness (Orthanc, storescp). Peak RSS does NOT come from ``wait4``: Linux folds the
memory of the process image replaced by ``exec`` into ``ru_maxrss``, and that image is a copy
of this (numpy-loaded, ~130 MB) Python, so even ``storescp`` would show 130 MB. Instead a
sampler reads the child's own high-water mark (``VmHWM`` in ``/proc/<pid>/status``, reset at
exec) every 0.05 s, together with its CPU times (psutil), so the CPU spent in one phase can
be read off between two timestamps (:func:`cpu_between`). Growth in the last 0.05 s before
exit can be missed.
"""

from __future__ import annotations

import os
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Sequence

import psutil

SAMPLE_INTERVAL_S = 0.05


@dataclass(frozen=True)
class Sample:
    at: float  # time.time()
    cpu_s: float  # user+sys of the process and its reaped children so far
    rss_bytes: int
    hwm_bytes: int  # peak RSS of the process so far (VmHWM)


@dataclass(frozen=True)
class ChildUsage:
    """What one finished child cost; ``returncode`` < 0 means killed by that signal."""

    argv: tuple[str, ...]
    returncode: int
    started_at: float
    wall_s: float
    cpu_s: float
    peak_rss_mb: float
    log_file: Path
    samples: tuple[Sample, ...] = ()

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log_file.read_text(errors="replace").splitlines()
        except OSError:
            return f"(no log at {self.log_file})"
        return "\n".join(text[-lines:])


def _vm_hwm_bytes(pid: int) -> int | None:
    """The process's peak resident set size so far (``VmHWM``); None once it has exited."""
    with open(f"/proc/{pid}/status", "rb") as status:
        for line in status:
            if line.startswith(b"VmHWM:"):
                return int(line.split()[1]) * 1024  # kB
    return None


class _Sampler(threading.Thread):
    """Polls a process's CPU times and RSS until stopped or the process is gone."""

    def __init__(self, pid: int) -> None:
        super().__init__(name=f"sampler-{pid}", daemon=True)
        self.samples: list[Sample] = []
        self._stop_event = threading.Event()
        self._process = psutil.Process(pid)

    def run(self) -> None:
        while not self._stop_event.is_set():
            try:
                with self._process.oneshot():
                    t = self._process.cpu_times()
                    rss = self._process.memory_info().rss
                hwm = _vm_hwm_bytes(self._process.pid)
            except (psutil.NoSuchProcess, psutil.ZombieProcess, psutil.AccessDenied, OSError):
                return
            if hwm is None:  # a zombie: exited, not reaped yet
                return
            self.samples.append(Sample(time.time(), t.user + t.system + t.children_user + t.children_system, rss, hwm))
            self._stop_event.wait(SAMPLE_INTERVAL_S)

    def stop(self) -> None:
        self._stop_event.set()
        self.join()


@dataclass
class RunningChild:
    """A started child; :meth:`finish` reaps it with ``wait4`` and returns its usage."""

    process: subprocess.Popen[bytes]
    argv: tuple[str, ...]
    log_file: Path
    started_at: float
    started_mono: float
    sampler: _Sampler = field(repr=False)

    def finish(self, timeout_s: float | None = None, terminate: bool = False) -> ChildUsage:
        """Wait for the child (SIGTERM it first with ``terminate``); kill it after ``timeout_s``."""
        if terminate and self.process.poll() is None:
            self.process.terminate()
        watchdog = threading.Timer(timeout_s, self._kill) if timeout_s else None
        if watchdog:
            watchdog.start()
        try:
            _, status, usage = os.wait4(self.process.pid, 0)
        finally:
            if watchdog:
                watchdog.cancel()
        wall = time.monotonic() - self.started_mono
        self.process.returncode = os.waitstatus_to_exitcode(status)  # so Popen never waits again
        self.sampler.stop()
        samples = tuple(self.sampler.samples)
        return ChildUsage(
            argv=self.argv,
            returncode=self.process.returncode,
            started_at=self.started_at,
            wall_s=wall,
            cpu_s=usage.ru_utime + usage.ru_stime,
            peak_rss_mb=max((s.hwm_bytes for s in samples), default=0) / 1e6,
            log_file=self.log_file,
            samples=samples,
        )

    def _kill(self) -> None:
        try:
            self.process.kill()
        except ProcessLookupError:
            pass


def settle_disk(pause_s: float = 1.0) -> None:
    """Write back every dirty page (the previous variant's 1 GB of instances and its deletion)
    and pause, so one variant's writeback does not land in the next one's seconds: without it,
    DCMTK's movescu+storescp ranged 69-286 MB/s from one run to the next on this machine."""
    os.sync()
    time.sleep(pause_s)


def start_child(argv: Sequence[str], log_file: Path, env: Mapping[str, str] | None = None, cwd: Path | None = None) -> RunningChild:
    """Start ``argv`` with stdout+stderr to ``log_file``; its CPU and RSS are sampled meanwhile."""
    log_file.parent.mkdir(parents=True, exist_ok=True)
    with open(log_file, "wb") as log:
        started_at, started_mono = time.time(), time.monotonic()
        process = subprocess.Popen(list(argv), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=dict(env) if env is not None else None, cwd=cwd)
    sampler = _Sampler(process.pid)
    sampler.start()
    return RunningChild(process, tuple(argv), log_file, started_at, started_mono, sampler)


def run_child(argv: Sequence[str], log_file: Path, env: Mapping[str, str] | None = None, cwd: Path | None = None,
              timeout_s: float | None = None) -> ChildUsage:  # fmt: skip
    """Start ``argv``, wait for it and return what it cost."""
    return start_child(argv, log_file, env, cwd).finish(timeout_s)


def _cpu_at(samples: Sequence[Sample], at: float) -> float:
    """The sampled CPU seconds at ``at``, linearly interpolated between the two nearest samples."""
    before = [s for s in samples if s.at <= at]
    after = [s for s in samples if s.at >= at]
    if not before:
        return samples[0].cpu_s
    if not after:
        return samples[-1].cpu_s
    a, b = before[-1], after[0]
    if b.at == a.at:
        return a.cpu_s
    return a.cpu_s + (b.cpu_s - a.cpu_s) * (at - a.at) / (b.at - a.at)


def cpu_between(samples: Sequence[Sample], start: float, end: float) -> float | None:
    """CPU seconds the sampled process used between two ``time.time()`` instants (None: no samples)."""
    if not samples:
        return None
    return max(0.0, _cpu_at(samples, end) - _cpu_at(samples, start))


def peak_rss_between(samples: Sequence[Sample], start: float, end: float) -> float | None:
    """Highest sampled RSS (MB, 10^6 bytes) between two instants (None: no sample in that window)."""
    inside = [s.rss_bytes for s in samples if start <= s.at <= end]
    return max(inside) / 1e6 if inside else None


def environment(base: Mapping[str, str] | None = None, **changes: str | None) -> dict[str, str]:
    """A copy of ``base`` (default: this process's environment) with ``changes``; None removes."""
    env = dict(os.environ if base is None else base)
    for key, value in changes.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    return env


def section_main(argv: Sequence[str] | None, description: str, default_patients: int, prefix: str, benchmark: Callable[[Path, int, str | None], dict]) -> int:
    """The command line of a section run on its own (``python -m benchmarks.<section>``): the
    cohort size, a work directory (default: a temp dir) and an empty state DB; prints JSON."""
    import argparse
    import json
    import logging
    import tempfile

    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--patients", type=int, default=default_patients)
    parser.add_argument("--work-dir", type=Path, help="cohort cache and state DB (default: a temp dir)")
    parser.add_argument("--database-url", help="an EMPTY state DB (default: SQLite in the work dir)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if args.work_dir is None:
        with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
            result = benchmark(Path(tmp), args.patients, args.database_url)
    else:
        result = benchmark(args.work_dir, args.patients, args.database_url)
    print(json.dumps(result))
    return 0
