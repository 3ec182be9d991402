"""``run_sync`` housekeeping: runs left STARTED by a killed sync are failed by the next one."""

from __future__ import annotations

import os
import socket
import subprocess
from pathlib import Path

import dagster as dg

from dicom_assets.sync import SYNC_HOST_TAG, SYNC_PID_TAG, fail_dead_sync_runs


def _started_run(instance: dg.DagsterInstance, pid: int, host: str | None = None) -> str:
    run = instance.create_run_for_job(
        dg.JobDefinition(name="patient_pipeline", graph_def=dg.GraphDefinition(name="patient_pipeline")),
        tags={SYNC_HOST_TAG: host or socket.gethostname(), SYNC_PID_TAG: str(pid)},
    )
    instance.handle_run_event(
        run.run_id,
        dg.DagsterEvent(event_type_value="PIPELINE_START", job_name=run.job_name),
    )
    assert instance.get_run_by_id(run.run_id).status == dg.DagsterRunStatus.STARTED
    return run.run_id


def test_runs_of_dead_sync_processes_on_this_host_are_failed(tmp_path: Path) -> None:
    dead = subprocess.Popen(["true"])
    dead.wait()
    with dg.instance_for_test(temp_dir=str(tmp_path)) as instance:
        orphan = _started_run(instance, dead.pid)
        alive = _started_run(instance, os.getpid())
        elsewhere = _started_run(instance, dead.pid, host="another-host")
        assert fail_dead_sync_runs(instance) == [orphan]
        assert instance.get_run_by_id(orphan).status == dg.DagsterRunStatus.FAILURE
        assert instance.get_run_by_id(alive).status == dg.DagsterRunStatus.STARTED
        assert instance.get_run_by_id(elsewhere).status == dg.DagsterRunStatus.STARTED
        assert fail_dead_sync_runs(instance) == []  # once
