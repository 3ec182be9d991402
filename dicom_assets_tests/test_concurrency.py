"""The adaptive count of concurrent retrieves (pacs/concurrency.py) with real parts: the bundled
PACS behind a 10 ms one-way delay on both paths (our associations to it, its C-MOVE associations
back to our receiver), the count and the slots in the state DB (PostgreSQL and SQLite)."""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

import pytest

from dicom_assets.discovery import discover_patients, discover_series, discover_studies
from dicom_assets.pacs.adaptive_concurrency import ConcurrencyPolicy
from dicom_assets.pacs.budget import DatabaseBudget, pacs_key
from dicom_assets.pacs.client import PacsClient
from dicom_assets.pacs.concurrency import RetrieveGate
from dicom_assets.retrieval import retrieve_patients
from dicom_assets.store import StateStore
from dicom_assets_tests.conftest import free_port
from dicom_assets_tests.delay_proxy import DelayProxy
from dicom_assets_tests.pacs_fixtures import make_settings, small_cohort

ONE_WAY_S = 0.010


@pytest.fixture
def store(db_url: str):  # noqa: ANN201
    state = StateStore(db_url)
    state.create_schema()
    yield state
    state.dispose()


def _discover_and_retrieve(settings, store: StateStore, port: int, ids: tuple[str, ...]):  # noqa: ANN001, ANN202
    """Discover the patients through the PACS's proxy port, retrieve them; (budget key, stats)."""
    key = pacs_key("127.0.0.1", port, "DEVPACS")
    client = PacsClient(settings.pacs, DatabaseBudget(store, key, 700))
    discover_patients(client, store, lambda ds: True)
    discover_studies(client, store, list(ids))
    discover_series(client, store, list(ids))
    return key, retrieve_patients(settings, client, store, list(ids))


def test_over_a_20ms_round_trip_the_count_grows_past_the_start(tmp_path: Path, store: StateStore, db_url: str) -> None:
    from dicom_assets.devpacs import DevPacs

    ids = tuple(f"WAN-{i}" for i in range(4))
    cohort = small_cohort(tmp_path / "pacs", patient_ids=ids, series=3, slices=40)
    receiver_port = free_port()
    with DelayProxy(("127.0.0.1", receiver_port), delay_s=ONE_WAY_S) as back, DevPacs(
        tmp_path / "pacs", move_destinations={"DICOM_ASSETS": ("127.0.0.1", back.port)}
    ) as pacs, DelayProxy(("127.0.0.1", pacs.port), delay_s=ONE_WAY_S) as there:
        settings = make_settings(tmp_path, there.port, receiver_port, db_url, max_concurrent_associations=8,
                                 start_concurrent_associations=2)
        key, stats = _discover_and_retrieve(settings, store, there.port, ids)
        peak_to_pacs = there.stats()["peak_active"]
    assert stats.count("complete") == len(cohort.series)
    assert stats.concurrency is not None
    assert stats.concurrency.peak >= 4 and stats.concurrency.cuts == 0  # doubled at least once: it paid
    assert peak_to_pacs <= 8 + 1  # never above the ceiling (+ the discovery association closing)
    state = store.concurrency_state(key)
    assert state.peak == stats.concurrency.peak and state.limit is not None and state.limit >= 2
    assert state.in_flight == 0  # every slot given back
    assert stats.metadata()["concurrent_retrieves_peak"] == stats.concurrency.peak


def test_a_pacs_that_answers_a702_above_two_retrieves_gets_fewer(tmp_path: Path, store: StateStore, db_url: str) -> None:
    from dicom_assets.devpacs import DevPacs

    ids = tuple(f"BUSY-{i}" for i in range(3))
    cohort = small_cohort(tmp_path / "pacs", patient_ids=ids, series=3, slices=30)
    receiver_port = free_port()
    with DevPacs(tmp_path / "pacs", move_destinations={"DICOM_ASSETS": ("127.0.0.1", receiver_port)},
                 max_retrieves_at_once=2) as pacs, DelayProxy(("127.0.0.1", pacs.port), delay_s=ONE_WAY_S) as there:
        settings = make_settings(tmp_path, there.port, receiver_port, db_url, max_concurrent_associations=8,
                                 start_concurrent_associations=4, retry_initial_s=0.2, retry_max_s=1.0, max_attempts=50)
        key, stats = _discover_and_retrieve(settings, store, there.port, ids)
        refused = pacs.refused_busy
    assert refused >= 1, "the PACS never refused: the test tested nothing"
    assert stats.count("complete") == len(cohort.series)  # refusals cost time, not series
    assert stats.concurrency is not None and stats.concurrency.cuts >= 1
    state = store.concurrency_state(key)
    assert state.cuts >= 1 and state.limit is not None and state.limit < state.peak  # fewer than it tried


def _gate(store: StateStore, ceiling: int = 4) -> RetrieveGate:
    return RetrieveGate(ConcurrencyPolicy(ceiling=ceiling, start=2), adaptive=True, store=store, pacs_key="pacs:104/AE")


def test_workers_of_two_processes_share_the_count_through_the_slots(store: StateStore) -> None:
    first, second = _gate(store), _gate(store)  # two processes' gates: count 2 (the start)
    assert first.enter(0, "host-a:1:1") and first.enter(1, "host-a:1:2")
    entered = threading.Event()
    waiter = threading.Thread(target=lambda: second.enter(0, "host-b:1:1") and entered.set())
    waiter.start()
    assert not entered.wait(1.5)  # both slots are held on the other machine
    first.leave("host-a:1:2")
    assert entered.wait(5.0)  # a slot came free: the other process goes on
    waiter.join()
    assert sorted(store.pacs_slot_holders("pacs:104/AE")) == ["host-a:1:1", "host-b:1:1"]
    first.finish()
    second.finish()
    assert not first.enter(0, "host-a:1:3")  # the retrieval is over: nobody enters


def test_a_refusal_halves_the_shared_count_once_per_event(store: StateStore) -> None:
    store.set_concurrency_limit("pacs:104/AE", 8)
    gate, other = _gate(store, ceiling=8), _gate(store, ceiling=8)
    assert gate.limit == 8  # what earlier runs found is where this one starts
    gate.refused()
    other.refused()  # the same A702 seen by another worker: within the cooldown, no second cut
    assert gate.limit == 4 and store.concurrency_limit("pacs:104/AE") == 4
    assert store.concurrency_state("pacs:104/AE").cuts == 1


def test_a_reset_halves_the_count_with_the_request_rate(store: StateStore) -> None:
    store.set_concurrency_limit("pacs:104/AE", 6)
    budget = DatabaseBudget(store, "pacs:104/AE", 700)
    budget.note_reset()
    assert store.concurrency_limit("pacs:104/AE") == 3
    assert budget.rate().current_per_window == 350  # one controller: both halved by the one reset


def test_slots_of_a_dead_process_on_this_host_are_freed_at_start(store: StateStore) -> None:
    host = socket.gethostname()
    store.take_pacs_slot("pacs:104/AE", f"{host}:999999:1", 2, 3600)  # no such pid: killed with kill -9
    store.take_pacs_slot("pacs:104/AE", f"{host}:999999:2", 2, 3600)
    gate = _gate(store).start()
    try:
        assert store.pacs_slot_holders("pacs:104/AE") == []
        assert gate.enter(0, f"{host}:1:1")
    finally:
        gate.stop()


def test_a_refusal_as_the_count_doubles_is_not_undone_by_the_doubling(store: StateStore) -> None:
    """A doubling and a refusal at the same moment: whichever lands last, the state DB and the
    gate agree on the count (the doubling used to be written after the cut and undo it)."""
    from dicom_assets.pacs.throughput import ByteMeter, HostCpu

    policy = ConcurrencyPolicy(ceiling=16, start=1, slow_start_epoch_s=0.01, warmup_s=0.0, max_warmup_s=0.0)
    disagreed = []
    for attempt in range(8):
        key = f"pacs:104/RACE{attempt}"
        meter = ByteMeter()
        # The CPU's share is not known here (no such file): this test's busy loop must not end the doubling.
        gate = RetrieveGate(policy, adaptive=True, store=store, pacs_key=key, meter=meter, host_cpu=HostCpu("/nonexistent/stat"))
        stop = threading.Event()

        def worker(i: int, gate: RetrieveGate = gate) -> None:
            while gate.enter(i, f"w{i}"):
                while gate.keeps(i) and not stop.is_set():
                    stop.wait(0.001)
                gate.leave(f"w{i}")
                if stop.is_set():
                    return

        def feed(gate: RetrieveGate = gate, meter: ByteMeter = meter) -> None:
            while not stop.is_set():  # every doubling pays: the bytes grow with the count
                meter.add(gate.limit * 10_000)
                stop.wait(0.0005)

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(16)] + [threading.Thread(target=feed)]
        gate.start()
        for thread in threads:
            thread.start()
        seen = gate.limit
        deadline = time.monotonic() + 5.0
        while gate.limit == seen and time.monotonic() < deadline:  # the monitor has just doubled
            pass
        gate.refused()
        time.sleep(0.1)  # the doubling's write, if it was to come, has come
        stop.set()
        gate.stop()
        for thread in threads:
            thread.join(5.0)
        assert gate.cuts == 1, "the refusal did not cut: the test tested nothing"
        if store.concurrency_limit(key) != gate.limit:
            disagreed.append((attempt, store.concurrency_limit(key), gate.limit))
    assert not disagreed, f"(attempt, state DB's count, gate's count): {disagreed}"

