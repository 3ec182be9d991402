"""A backfill over thousands of patients becomes a few runs of 200, through Dagster's own backfill
machinery: the daemon's iteration over a requested asset backfill, on a temporary instance whose
queued run coordinator (as in dagster.yaml) keeps the runs queued, so no run executes.

Creating a run writes one "materialization planned" event per partition (2,000 here); the
instance lives in /dev/shm when there is one, so that costs seconds rather than fsyncs.
"""

from __future__ import annotations

import logging
import tempfile
import time
from pathlib import Path

import dagster as dg
import pytest

from dicom_assets.defs.partitions import PATIENTS_PARTITION_SET, patients_backfill_policy
from dicom_assets_tests.pacs_fixtures import offline_config

PATIENTS = 2_000


def _backfill_runs(instance: dg.DagsterInstance, asset: str, partition_keys: list[str]) -> list[dg.DagsterRun]:
    """Request an asset backfill as the UI does and let the backfill daemon's iteration submit it."""
    # Dagster has no public API for this: these are the modules the UI and the daemon use.
    from dagster._core.execution.backfill import PartitionBackfill
    from dagster._core.remote_origin import InProcessCodeLocationOrigin
    from dagster._core.types.loadable_target_origin import LoadableTargetOrigin
    from dagster._core.utils import make_new_backfill_id
    from dagster._core.workspace.context import WorkspaceProcessContext
    from dagster._core.workspace.load_target import InProcessWorkspaceLoadTarget
    from dagster._daemon.backfill import execute_backfill_iteration

    origin = InProcessCodeLocationOrigin(LoadableTargetOrigin(module_name="dicom_assets.definitions", attribute="defs"))
    with WorkspaceProcessContext(instance, InProcessWorkspaceLoadTarget(origin)) as workspace:
        backfill = PartitionBackfill.from_asset_partitions(
            backfill_id=make_new_backfill_id(), asset_graph=workspace.create_request_context().asset_graph,
            partition_names=partition_keys, asset_selection=[dg.AssetKey(asset)], backfill_timestamp=time.time(),
            tags={}, dynamic_partitions_store=instance, all_partitions=False, title=None, description=None,
            run_config=None,
        )
        instance.add_backfill(backfill)
        runs_filter = dg.RunsFilter(tags={"dagster/backfill": backfill.backfill_id})
        submitted = -1
        for _ in range(10):  # until an iteration submits nothing more
            errors = [e for e in execute_backfill_iteration(workspace, logging.getLogger("backfill")) if e]
            assert not errors, errors[0].to_string()
            if instance.get_runs_count(runs_filter) == submitted:
                break
            submitted = instance.get_runs_count(runs_filter)
        return list(instance.get_runs(runs_filter))


def test_a_backfill_of_2000_patients_is_10_runs_of_200(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    config = offline_config(tmp_path / "config.yaml", f"sqlite:///{tmp_path / 'state.sqlite'}")
    monkeypatch.setenv("DICOM_ASSETS_CONFIG", str(config))
    keys = [f"PAT{i:05d}" for i in range(PATIENTS)]

    queued = {"run_coordinator": {"module": "dagster.core.run_coordinator", "class": "QueuedRunCoordinator"}}
    memory = "/dev/shm" if Path("/dev/shm").is_dir() else None
    with tempfile.TemporaryDirectory(dir=memory) as home, dg.instance_for_test(temp_dir=home, overrides=queued) as instance:
        instance.add_dynamic_partitions(PATIENTS_PARTITION_SET, keys)
        runs = _backfill_runs(instance, "downloaded_series", keys)

    per_run = patients_backfill_policy.max_partitions_per_run
    assert per_run == 200
    ranges = sorted((keys.index(r.tags["dagster/asset_partition_range_start"]),
                     keys.index(r.tags["dagster/asset_partition_range_end"])) for r in runs)
    assert len(runs) == PATIENTS // per_run == 10
    assert ranges == [(i, i + per_run - 1) for i in range(0, PATIENTS, per_run)]  # every patient once
    assert all(r.status == dg.DagsterRunStatus.QUEUED and r.asset_selection == {dg.AssetKey("downloaded_series")}
               for r in runs)
    with capsys.disabled():
        print(f"\nbackfill of downloaded_series over {PATIENTS:,} patients: {len(runs)} runs of {per_run} patients")
