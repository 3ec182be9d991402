"""The production Dagster instance (dagster.yaml): PostgreSQL storage from the environment, the
queued run coordinator and the `pacs` pool, with a real materialization stored through it; and
run monitoring freeing the `pacs` slot of a run killed with kill -9."""

from __future__ import annotations

import logging
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import dagster as dg
import pytest
import sqlalchemy as sa

from dicom_assets_tests.pacs_fixtures import offline_config

ROOT = Path(__file__).resolve().parents[1]


def test_production_instance_runs_a_materialization_on_postgresql(production_dagster_home: Path, tmp_path: Path,
                                                                   pg_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from dicom_assets import defs

    config = offline_config(tmp_path / "config.yaml", f"sqlite:///{tmp_path / 'state.sqlite'}")
    monkeypatch.setenv("DICOM_ASSETS_CONFIG", str(config))

    with dg.DagsterInstance.get() as instance:
        assert type(instance.run_storage).__name__ == "PostgresRunStorage"
        assert type(instance.run_coordinator).__name__ == "QueuedRunCoordinator"
        assert instance.get_concurrency_config().pool_config.default_pool_limit == 1
        result = defs.resolve_job_def("write_inventory").execute_in_process(instance=instance)
        assert result.success
        stored = instance.get_run_by_id(result.run_id)
        assert stored is not None and stored.is_success
        assert instance.get_latest_materialization_event(dg.AssetKey("inventory")) is not None
    assert (tmp_path / "reports" / "inventory.csv").exists()
    with sa.create_engine(pg_url).connect() as conn:  # the run is in PostgreSQL, not in files
        assert conn.execute(sa.text("SELECT count(*) FROM runs")).scalar() == 1


def test_every_step_that_talks_to_the_pacs_is_in_the_pacs_pool() -> None:
    from dicom_assets import defs

    graph = defs.get_repository_def().asset_graph
    pools = {key.to_user_string(): graph.get(key).pools for key in graph.get_all_asset_keys()}
    for name in ("patients", "studies", "series", "downloaded_series"):
        assert pools[name] == {"pacs"}, name
    for name in ("patient_archive", "validation_report", "inventory"):
        assert not pools[name], name


#: A run like a `dicom-assets sync` run (in-process, in its own process) whose step holds the
#: `pacs` slot until the process is killed.
_HOLD_THE_PACS_SLOT = """
import sys, time
from pathlib import Path
import dagster as dg
from dicom_assets.defs.partitions import PACS_POOL

@dg.op(pool=PACS_POOL)
def talk_to_the_pacs() -> None:
    Path(sys.argv[1]).write_text("holding the pacs slot")
    time.sleep(600)

@dg.job
def hold_the_pacs_slot() -> None:
    talk_to_the_pacs()

with dg.DagsterInstance.get() as instance:
    hold_the_pacs_slot.execute_in_process(instance=instance)
"""


def _hold_the_slot_then_kill_9(marker: Path) -> None:
    proc = subprocess.Popen([sys.executable, "-c", _HOLD_THE_PACS_SLOT, str(marker)], cwd=ROOT)
    try:
        deadline = time.monotonic() + 120
        while not marker.exists():
            assert proc.poll() is None, f"the run process exited with {proc.returncode} before taking the slot"
            assert time.monotonic() < deadline, "the run never took the pacs slot"
            time.sleep(0.1)
    finally:
        proc.kill()  # SIGKILL: no clean-up in the run process
        proc.wait()


def test_a_run_killed_with_kill_9_frees_its_pacs_slot(production_dagster_home: Path, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """The production dagster.yaml's run monitoring, as the daemon runs it: the dead run is failed
    once over max_runtime_seconds, its slot freed free_slots_after_run_end_seconds after that.
    The daemon's clock is moved forward instead of waiting a day."""
    from dagster._daemon.monitoring import concurrency, run_monitoring
    from dagster._core.workspace.context import WorkspaceProcessContext
    from dagster._core.workspace.load_target import EmptyWorkspaceTarget

    _hold_the_slot_then_kill_9(tmp_path / "holding")
    log = logging.getLogger("monitoring")
    with dg.DagsterInstance.get() as instance, WorkspaceProcessContext(instance, EmptyWorkspaceTarget()) as daemon:
        settings = instance.run_monitoring_settings
        assert instance.run_monitoring_enabled and settings["max_resume_run_attempts"] == 0
        assert "MONITORING" in instance.get_required_daemon_types()  # dagster-daemon runs it
        [run] = instance.get_runs()
        assert run.status == dg.DagsterRunStatus.STARTED  # nothing noticed the kill
        assert instance.event_log_storage.get_concurrency_info("pacs").active_run_ids == {run.run_id}

        def at(timestamp: float) -> WorkspaceProcessContext:
            """The daemon's clock set to ``timestamp``."""
            monkeypatch.setattr(run_monitoring, "get_current_timestamp", lambda: timestamp)
            monkeypatch.setattr(concurrency, "get_current_datetime", lambda: datetime.fromtimestamp(timestamp, timezone.utc))
            return daemon

        def slot_holders() -> set[str]:
            return instance.event_log_storage.get_concurrency_info("pacs").active_run_ids

        list(run_monitoring.execute_run_monitoring_iteration(at(time.time()), log))
        assert instance.get_run_by_id(run.run_id).status == dg.DagsterRunStatus.STARTED  # not before its time
        list(run_monitoring.execute_run_monitoring_iteration(at(time.time() + settings["max_runtime_seconds"] + 1), log))
        assert instance.get_run_by_id(run.run_id).status == dg.DagsterRunStatus.FAILURE

        ended = instance.get_run_record_by_id(run.run_id).end_time
        grace = settings["free_slots_after_run_end_seconds"]
        list(concurrency.execute_concurrency_slots_iteration(at(ended + grace - 1), log))
        assert slot_holders() == {run.run_id}  # a run that just ended may still be winding down
        list(concurrency.execute_concurrency_slots_iteration(at(ended + grace + 1), log))
        assert slot_holders() == set()  # free for the next PACS step
        assert instance.event_log_storage.get_concurrency_info("pacs").slot_count == 1
