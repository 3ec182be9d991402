"""Stop when asked: SIGTERM/SIGINT end ``dicom-assets sync`` within seconds, whatever it is doing.

The stop flag on its own; then real ``dicom-assets sync`` processes against the bundled PACS
(C-GET, in this process) signalled in the middle of an instance's transfer, while a retrieval
worker waits for a PACS that went away mid-retrieval (behind :class:`FlakyProxy`), and while
discovery waits for a PACS that never answered. Each time: exit status 143 (SIGTERM) or 130
(SIGINT) within 10 s, no claim left, no series complete or failed because of the stop, no temp
file left; the next sync finishes the job. The seconds each stop took are printed (``-s``).
"""

from __future__ import annotations

import signal
import threading
import time
from pathlib import Path

import pytest

from dicom_assets import stopping
from dicom_assets.devpacs import DevPacs
from dicom_assets_tests.conftest import free_port
from dicom_assets_tests.flaky_proxy import FlakyProxy
from dicom_assets_tests.sync_process import (
    RECEIVER_AE, check_downloads, finish_sync, make_cohort, run_sync, series_rows, start_sync, write_config,
)  # fmt: skip

STOP_LIMIT_S = 10.0  # the promise: a stopped sync is gone within 10 s


def test_a_stop_wakes_waits_and_runs_closers() -> None:
    flag = stopping.StopFlag()
    closed: list[str] = []
    key = flag.add_closer(lambda: closed.append("socket"))
    flag.remove_closer(flag.add_closer(lambda: closed.append("removed")))
    threading.Timer(0.2, lambda: flag.request("SIGTERM received", signal.SIGTERM)).start()
    started = time.monotonic()
    with pytest.raises(stopping.Stopped, match="SIGTERM"):
        flag.wait(30)
    assert time.monotonic() - started < 5 and closed == ["socket"]
    flag.add_closer(lambda: closed.append("late"))  # registered after the stop: runs at once
    assert closed == ["socket", "late"] and flag.requested
    flag.remove_closer(key)
    assert stopping.exit_status(signal.SIGTERM) == 143 and stopping.exit_status(signal.SIGINT) == 130
    flag.clear()
    flag.wait(0)  # cleared: no longer raises


def _signal_when(proc, condition, signum: int, timeout: float = 60) -> float:  # type: ignore[no-untyped-def]
    """Poll ``condition`` every 2 ms; once true, send ``signum``; returns the seconds until exit."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert proc.poll() is None, "the sync ended before the moment to stop it came"
        assert time.monotonic() < deadline, "the moment to stop the sync never came"
        time.sleep(0.002)
    sent = time.monotonic()
    proc.send_signal(signum)
    try:
        proc.wait(timeout=30)
    except Exception:
        proc.kill()
        raise
    return time.monotonic() - sent


def _left_clean(tmp_path: Path, pg_url: str) -> list[dict]:  # type: ignore[type-arg]
    """No claim held, nothing failed, complete only with every instance, no temp file anywhere."""
    rows = series_rows(pg_url)
    assert not [r for r in rows if r["download_status"] in ("in_progress", "failed") or r["claimed_by"]], rows
    for r in rows:
        if r["download_status"] == "complete":
            assert r["downloaded_instances"] == r["expected_instances"], r
        assert r["attempts"] == 0, r  # the stop cost no attempt
    temps = [p for p in tmp_path.rglob("*.part")]
    assert temps == [], temps
    return rows


@pytest.mark.parametrize("method", ["c-get", "c-move"])
def test_sigterm_in_the_middle_of_an_instance(tmp_path: Path, pg_url: str, method: str) -> None:
    cohort = make_cohort(tmp_path / "pacs", patients=2, series=2, slices=6, size=1024, seed=31)  # 2 MB instances
    receiver_port = free_port()
    with DevPacs(tmp_path / "pacs", move_destinations={RECEIVER_AE: ("127.0.0.1", receiver_port)}) as pacs:
        config = write_config(tmp_path, pacs.port, receiver_port, pg_url, retrieve_method=method)
        downloads = tmp_path / "downloads"
        proc = start_sync(tmp_path, config, tmp_path / "stopped.log")
        seconds = _signal_when(proc, lambda: any(downloads.rglob("*.part")), signal.SIGTERM)
        code, output = finish_sync(proc, tmp_path / "stopped.log", 5)
        rows = _left_clean(tmp_path, pg_url)
        done = sum(r["download_status"] == "complete" for r in rows)
        again, output2 = run_sync(tmp_path, config, "resumed")
    print(f"\n[stop] SIGTERM mid-instance ({method}): exit {code} after {seconds:.2f} s; {done}/{len(rows)} series were complete")
    assert code == 143, output[-3000:]
    assert seconds < STOP_LIMIT_S
    assert "stopped (SIGTERM received)" in output
    assert again == 0, output2[-3000:]
    check_downloads(downloads, cohort)


def test_sigterm_while_a_worker_waits_for_a_pacs_that_went_away(tmp_path: Path, pg_url: str) -> None:
    make_cohort(tmp_path / "pacs", patients=2, series=2, slices=20, size=256, seed=32)
    with DevPacs(tmp_path / "pacs") as pacs, FlakyProxy(("127.0.0.1", pacs.port), reset_every=None) as proxy:
        config = write_config(
            tmp_path, proxy.port, free_port(), pg_url, retrieve_method="c-get",
            wait_for_pacs_s=600, retry_initial_s=2, retry_max_s=120,
        )  # fmt: skip
        downloads = tmp_path / "downloads"
        proc = start_sync(tmp_path, config, tmp_path / "stopped.log")

        def went_away_a_while_ago() -> bool:
            if proxy.is_up and any(downloads.rglob("*.dcm")):
                proxy.go_down()  # mid-retrieval: the worker now backs off and waits
                went_away_a_while_ago.at = time.monotonic()  # type: ignore[attr-defined]
            return not proxy.is_up and time.monotonic() - went_away_a_while_ago.at > 3.0  # type: ignore[attr-defined]

        seconds = _signal_when(proc, went_away_a_while_ago, signal.SIGTERM)
        code, output = finish_sync(proc, tmp_path / "stopped.log", 5)
        _left_clean(tmp_path, pg_url)
    print(f"\n[stop] SIGTERM during the wait for a PACS that went away: exit {code} after {seconds:.2f} s")
    assert code == 143, output[-3000:]
    assert seconds < STOP_LIMIT_S


def test_sigint_while_discovery_waits_and_a_second_signal_exits_at_once(tmp_path: Path, pg_url: str) -> None:
    with DevPacs(tmp_path / "pacs") as pacs, FlakyProxy(("127.0.0.1", pacs.port), reset_every=None) as proxy:
        proxy.go_down()
        config = write_config(tmp_path, proxy.port, free_port(), pg_url, wait_for_pacs_s=600, retry_initial_s=2)
        log = tmp_path / "discovery.log"
        proc = start_sync(tmp_path, config, log)
        seconds = _signal_when(proc, lambda: "not answering" in log.read_text(errors="replace"), signal.SIGINT)
        code, output = finish_sync(proc, log, 5)
        proc2 = start_sync(tmp_path, config, tmp_path / "twice.log")
        time.sleep(3)  # discovery is waiting
        proc2.send_signal(signal.SIGTERM)
        proc2.send_signal(signal.SIGTERM)
        code2, _ = finish_sync(proc2, tmp_path / "twice.log", STOP_LIMIT_S)
    print(f"\n[stop] SIGINT while discovery waits for a PACS that never answered: exit {code} after {seconds:.2f} s")
    assert code == 130, output[-3000:]
    assert seconds < STOP_LIMIT_S
    assert code2 == 143


#: A Dagster run of the pipeline in the main thread of its own process, as the run worker runs
#: it: Dagster's own signal handling turns SIGTERM/SIGINT into an interrupt of the step.
DAGSTER_RUN = """
import dagster as dg
from dicom_assets.definitions import defs
from dicom_assets.defs.partitions import PATIENTS_PARTITION_SET
from dicom_assets.defs.patient_runs import patient_range_requests
instance = dg.DagsterInstance.get()
assert defs.resolve_job_def("discover_patients").execute_in_process(instance=instance).success
[request] = patient_range_requests(list(instance.get_dynamic_partitions(PATIENTS_PARTITION_SET)))
result = defs.resolve_job_def("patient_pipeline").execute_in_process(
    instance=instance, tags=dict(request.tags), raise_on_error=False
)
print("run", result.run_id, instance.get_run_by_id(result.run_id).status, flush=True)
"""


def test_sigterm_to_a_dagster_run_of_the_pipeline(tmp_path: Path, pg_url: str) -> None:
    import os
    import subprocess
    import sys

    from dicom_assets_tests.sync_process import dagster_home

    make_cohort(tmp_path / "pacs", patients=2, series=2, slices=6, size=1024, seed=33)
    with DevPacs(tmp_path / "pacs") as pacs:
        config = write_config(tmp_path, pacs.port, free_port(), pg_url, retrieve_method="c-get")
        env = {**os.environ, "DAGSTER_HOME": str(dagster_home(tmp_path)), "DICOM_ASSETS_CONFIG": str(config)}
        log = tmp_path / "run.log"
        with open(log, "wb") as out:
            proc = subprocess.Popen([sys.executable, "-c", DAGSTER_RUN], cwd=tmp_path, env=env, stdout=out, stderr=subprocess.STDOUT)
        seconds = _signal_when(proc, lambda: any((tmp_path / "downloads").rglob("*.part")), signal.SIGTERM)
        code, output = finish_sync(proc, log, 5)
        _left_clean(tmp_path, pg_url)
    print(f"\n[stop] SIGTERM to a Dagster run of patient_pipeline: exit {code} after {seconds:.2f} s")
    assert seconds < STOP_LIMIT_S, output[-3000:]
    assert "stopping: interrupted (DagsterExecutionInterruptedError)" in output  # the workers were told at once
    assert "DagsterRunStatus.FAILURE" in output or "DagsterRunStatus.CANCELED" in output, output[-3000:]
