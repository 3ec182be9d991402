"""What the adaptive concurrency measures (pacs/throughput.py): the CPU's busy share, read from
real files in /proc/stat's format and from this machine's own."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from dicom_assets.pacs.throughput import HostCpu


def test_host_cpu_reads_the_busy_share_of_the_machine_between_two_readings(tmp_path: Path) -> None:
    """/proc/stat's first line: user nice system idle iowait irq softirq steal (clock ticks)."""
    stat = tmp_path / "stat"
    cpu = HostCpu(str(stat))
    stat.write_text("cpu  100 0 50 800 50 0 0 0 0 0\ncpu0 1 2 3 4\n")
    before = cpu.reading()
    stat.write_text("cpu  160 0 70 810 50 0 5 5 0 0\n")  # 90 busy (steal counts) of 100
    assert HostCpu.busy_share(before, cpu.reading()) == pytest.approx(0.9)
    stat.write_text("cpu  1 2 x 4 5 6 7 8\n")
    assert cpu.reading() is None  # a field that is not a count: unknown, not an error in the monitor
    stat.write_text("intr 1 2 3\n")
    assert cpu.reading() is None and HostCpu.busy_share(before, None) is None  # not Linux's format: unknown
    assert HostCpu(str(tmp_path / "absent")).reading() is None
    if sys.platform == "linux":  # this machine's own
        busy, total = HostCpu().reading() or (0, 0)
        assert 0 < busy < total
