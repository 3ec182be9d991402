"""Schedules: cron strings from the config, and retrieval runs in chunks of patients."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import dagster as dg

from dicom_assets.defs.partitions import PATIENTS_PARTITION_SET
from dicom_assets_tests.pacs_fixtures import offline_config


def test_cron_strings_come_from_the_config(tmp_path: Path) -> None:
    config = offline_config(tmp_path / "config.yaml", schedules={
        "discovery": "15 3 * * *", "retrieval": "*/20 * * * *", "inventory": "0 7 * * 1", "timezone": "Europe/Zurich",
    })  # fmt: skip
    code = ("import dicom_assets; r = dicom_assets.defs.get_repository_def(); "
            "print(sorted((s.name, s.cron_schedule, s.execution_timezone) for s in r.schedule_defs))")
    done = subprocess.run([sys.executable, "-c", code], env={**os.environ, "DICOM_ASSETS_CONFIG": str(config)},
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == str([
        ("discovery_schedule", "15 3 * * *", "Europe/Zurich"),
        ("inventory_schedule", "0 7 * * 1", "Europe/Zurich"),
        ("retrieval_schedule", "*/20 * * * *", "Europe/Zurich"),
    ])


def test_default_schedules_without_a_config() -> None:
    from dicom_assets import defs

    schedules = {s.name: s.cron_schedule for s in defs.get_repository_def().schedule_defs}
    assert schedules == {"discovery_schedule": "0 2 * * *", "retrieval_schedule": "0 * * * *", "inventory_schedule": "30 6 * * *"}


def test_retrieval_schedule_requests_chunks_of_patients_not_one_run_each() -> None:
    from dicom_assets import defs

    schedule = defs.get_schedule_def("retrieval_schedule")
    with dg.instance_for_test() as instance:
        empty = schedule(dg.build_schedule_context(instance=instance))
        assert isinstance(empty, dg.SkipReason)
        keys = [f"P{i:05d}" for i in range(450)]
        instance.add_dynamic_partitions(PATIENTS_PARTITION_SET, keys)
        requests = schedule(dg.build_schedule_context(instance=instance))
    ranges = [(r.tags["dagster/asset_partition_range_start"], r.tags["dagster/asset_partition_range_end"]) for r in requests]
    assert ranges == [("P00000", "P00199"), ("P00200", "P00399"), ("P00400", "P00449")]
