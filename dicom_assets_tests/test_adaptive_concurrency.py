"""The arithmetic of the adaptive count of concurrent retrieves (pacs/adaptive_concurrency.py):
links simulated as throughput-per-count curves, no network."""

from __future__ import annotations

from typing import Callable

from dicom_assets.pacs.adaptive_concurrency import ConcurrencyPolicy, Probe, reset_cut


def _run(policy: ConcurrencyPolicy, link: Callable[[int], float], epochs: int, latency: Callable[[int], float] = lambda n: 0.03) -> list[int]:
    probe = policy.first(None)
    counts = []
    for _ in range(epochs):
        probe = policy.after_epoch(probe, link(probe.limit), latency(probe.limit), saturated=True)
        counts.append(probe.limit)
    return counts


def wan(per_association: float, capacity: float) -> Callable[[int], float]:
    """A round-trip-bound link: each association adds its share until the capacity."""
    return lambda n: min(n * per_association, capacity)


def test_a_wan_link_reaches_the_ceiling_in_two_doublings_after_the_start_up_epoch() -> None:
    policy = ConcurrencyPolicy(ceiling=8, start=2)
    counts = _run(policy, wan(16e6, 1e9), 6)
    assert counts[:4] == [2, 4, 8, 8]  # the first epoch is the start-up: measured from the second
    assert counts[-1] == 8


def test_the_start_up_epoch_is_not_the_base_a_doubling_must_beat() -> None:
    """A run's first epoch holds the associations opening (93 MB/s at 4 C-GETs that then moved
    225-300): judged against it, any doubling paid and loopback C-GET went to 8 (207 MB/s)."""
    policy = ConcurrencyPolicy(ceiling=8, start=4)
    probe = policy.after_epoch(policy.first(None), 93e6, 0.03, saturated=True)
    assert probe.limit == 4 and probe.started and probe.base_throughput == 0  # not a base
    probe = policy.after_epoch(probe, 260e6, 0.01, saturated=True)
    assert probe.limit == 8 and probe.base_throughput == 260e6
    probe = policy.after_epoch(probe, 230e6, 0.01, saturated=True)  # 8 does not pay ...
    probe = policy.after_epoch(probe, 240e6, 0.01, saturated=True)  # ... in its second look either
    assert probe.base_limit == 4 and not probe.slow_start and probe.limit == 2  # back, and half the start tried


def test_loopback_where_more_associations_do_not_pay_stays_at_the_start() -> None:
    policy = ConcurrencyPolicy(ceiling=8, start=2)
    counts = _run(policy, lambda n: 150e6 if n == 1 else 300e6 * (1.05 if n > 2 else 1.0), 12)
    assert counts[:3] == [2, 4, 4]  # the start-up epoch, then the first probe, measured twice
    assert counts[3] == 1  # 5 % more is not a quarter of the doubling's 100 %: half the start is tried once
    assert counts[4:12] == [2] * 8  # 1 moved less than 2: back to the start


def test_a_start_above_what_the_pacs_and_machine_serve_well_comes_down_to_half() -> None:
    """Loopback C-GET on 2 cores shared with Orthanc: 2 associations 344-404 MB/s, 4 225-353, 8
    less; nothing but a refusal or a 3x slower instance went below the start before."""
    policy = ConcurrencyPolicy(ceiling=8, start=4)
    link = {1: 200e6, 2: 380e6, 4: 300e6, 8: 250e6}
    counts = _run(policy, lambda n: link[n], 10)
    assert counts[:4] == [4, 8, 8, 2]  # start-up, the doubling (twice), then half the start
    assert counts[4:] == [2] * 6  # 2 moved more than 4: kept, and never halved again
    grown = _run(policy, lambda n: {4: 60e6, 8: 115e6, 2: 30e6}.get(n, 0.0), 6)
    assert 2 not in grown and grown[-1] == 8  # a start whose doubling paid is never halved


def test_a_link_full_at_five_settles_at_full_throughput_below_the_ceiling() -> None:
    policy = ConcurrencyPolicy(ceiling=16, start=2, reprobe_after_epochs=5)
    link = wan(16e6, 80e6)
    counts = _run(policy, link, 40)
    assert counts[:6] == [2, 4, 8, 16, 16, 8]  # 8 paid (1.25x of 4), 16 did not in two epochs: back to 8
    assert 5 <= counts[-1] <= 9 and link(counts[-1]) == 80e6  # full, and not at the ceiling
    assert counts.count(16) == 2  # the doubling past the knee was refused after its second look


def test_epochs_with_idle_workers_change_nothing() -> None:
    policy = ConcurrencyPolicy(ceiling=8, start=2)
    probe = policy.first(None)
    assert policy.after_epoch(probe, 50e6, 0.03, saturated=False) == probe
    assert policy.after_epoch(probe, 0.0, None, saturated=True) == probe


def test_a_refusal_halves_and_probing_resumes_one_at_a_time() -> None:
    policy = ConcurrencyPolicy(ceiling=8, start=2)
    probe = Probe(limit=8, base_limit=8, base_throughput=128e6, slow_start=False)
    assert policy.cut(8) == 4 and policy.cut(1) == 1
    after = policy.adopt(probe, policy.cut(8))
    assert after.limit == 4 and not after.slow_start


def test_rising_time_per_instance_backs_off_by_one() -> None:
    policy = ConcurrencyPolicy(ceiling=8, start=2)
    probe = Probe(limit=6, base_limit=6, base_throughput=90e6, slow_start=False, best_latency=0.02)
    after = policy.after_epoch(probe, 90e6, 0.07, saturated=True)  # 3.5x the best: the PACS queues us
    assert after.limit == 5


def test_the_shared_count_of_earlier_runs_is_the_start_within_the_ceiling() -> None:
    policy = ConcurrencyPolicy(ceiling=8, start=2)
    assert policy.first(6).limit == 6 and not policy.first(6).slow_start
    assert policy.first(20).limit == 8
    assert ConcurrencyPolicy(ceiling=1, start=2).first(None).limit == 1


def test_a_reset_halves_but_not_below_two_a_refusal_goes_down_to_one() -> None:
    assert [reset_cut(n) for n in (8, 5, 3, 2, 1)] == [4, 2, 2, 2, 1]  # a flaky link is not cured by fewer
    assert [ConcurrencyPolicy(ceiling=8).cut(n) for n in (8, 3, 2, 1)] == [4, 1, 1, 1]  # A7xx: the PACS said so


def test_the_warm_up_after_a_change_scales_with_how_far_the_pacs_is() -> None:
    """Not judged before the new associations' bytes flow: 6x an association's set-up (about two
    round trips), at least 0.2 s (loopback, or not known yet), at most 2 s."""
    policy = ConcurrencyPolicy(ceiling=8)
    assert [round(policy.warmup(s), 3) for s in (None, 0.001, 0.04, 0.2, 5.0)] == [0.2, 0.2, 0.24, 1.2, 2.0]


def test_a_doubling_judged_before_its_associations_ran_gets_a_second_epoch() -> None:
    """Over a WAN the first epoch after 4 -> 8 can end before the four new associations move
    bytes; judged on it alone, 8 fell back to 4 (0.58x of fixed 8 in the WAN benchmark)."""
    policy = ConcurrencyPolicy(ceiling=8, start=2)
    probe = Probe(limit=8, base_limit=4, base_throughput=64e6)  # 2 -> 4 paid before
    looked = policy.after_epoch(probe, 70e6, 0.03, saturated=True)  # 1.09x: the new four not running yet
    assert looked.limit == 8 and looked.second_look
    kept = policy.after_epoch(looked, 120e6, 0.03, saturated=True)  # all eight running
    assert kept.limit == 8 and kept.base_limit == 8 and not kept.second_look
    refused = policy.after_epoch(looked, 70e6, 0.03, saturated=True)  # still no gain: back to 4
    assert refused.limit == 4 and not refused.slow_start


def test_a_full_cpu_at_the_start_tries_half_the_start_instead_of_doubling() -> None:
    """Loopback on 2 cores, the PACS on the same machine: at 4 associations every core is busy,
    and the doubling to 8 (two epochs and their warm-ups) took a 2.4 s C-GET run from 387 MB/s
    to 291. With the CPU full, no doubling: half the start is tried, kept when it moves as much."""
    policy = ConcurrencyPolicy(ceiling=8, start=4)
    link = {2: 460e6, 4: 390e6, 8: 250e6}
    probe = policy.after_epoch(policy.first(None), 90e6, 0.03, saturated=True, cpu_busy=0.97)  # the start-up
    probe = policy.after_epoch(probe, link[4], 0.01, saturated=True, cpu_busy=0.95)
    assert probe.limit == 2 and probe.base_limit == 4 and not probe.slow_start  # not 8
    probe = policy.after_epoch(probe, link[2], 0.01, saturated=True, cpu_busy=0.93)
    assert probe.limit == 2 and probe.base_limit == 2  # 2 moved more than 4: kept
    probe = policy.after_epoch(probe, link[2], 0.01, saturated=True, cpu_busy=0.99)
    assert probe.limit == 2  # settled: a full CPU is not a reason to go lower still


def test_an_idle_cpu_lets_the_doubling_go_on() -> None:
    """Over a WAN the associations mostly wait for round trips and the CPU is idle: the count
    doubles as before, and the CPU's share only stops the doubling once it is full."""
    policy = ConcurrencyPolicy(ceiling=16, start=4)
    link = wan(16e6, 1e9)
    probe = policy.after_epoch(policy.first(None), 20e6, 0.03, saturated=True, cpu_busy=0.2)
    probe = policy.after_epoch(probe, link(4), 0.03, saturated=True, cpu_busy=0.3)
    assert probe.limit == 8 and probe.slow_start
    probe = policy.after_epoch(probe, link(8), 0.03, saturated=True, cpu_busy=0.92)  # 8 paid, and filled the CPU
    assert probe.base_limit == 8 and probe.limit == 8 and not probe.slow_start  # kept, no doubling to 16, not halved


def test_half_the_start_is_kept_unless_it_moves_clearly_less() -> None:
    """Within the noise of an epoch (589 against 624 MB/s) the fewer associations are kept: less
    load on the PACS and less CPU here; clearly less (under 90 %) goes back to the start."""
    policy = ConcurrencyPolicy(ceiling=8, start=4)
    at_start = policy.after_epoch(policy.first(None), 90e6, 0.03, saturated=True, cpu_busy=0.97)
    halved = policy.after_epoch(at_start, 624e6, 0.01, saturated=True, cpu_busy=0.95)
    assert halved.limit == 2
    assert policy.after_epoch(halved, 589e6, 0.01, saturated=True, cpu_busy=0.93).limit == 2
    assert policy.after_epoch(halved, 540e6, 0.01, saturated=True, cpu_busy=0.93).limit == 4
