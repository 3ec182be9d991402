"""The new-patients sensor at scale: 20,000 patients in the state DB, one tick."""

from __future__ import annotations

import time
from pathlib import Path

import dagster as dg

from dicom_assets.defs.partitions import PATIENTS_PARTITION_SET
from dicom_assets.store import PatientRecord, StateStore
from dicom_assets_tests.pacs_fixtures import offline_config


def test_new_patients_registers_partitions_and_requests_chunked_runs(tmp_path: Path, pg_url: str, capsys) -> None:  # noqa: ANN001
    from dicom_assets import defs
    from dicom_assets.defs.resources import DicomAssetsResource

    store = StateStore(pg_url)
    store.create_schema()
    store.upsert_patients(PatientRecord(patient_id=f"PAT/{i:05d}") for i in range(20_000))
    config = offline_config(tmp_path / "c.yaml", pg_url)
    resources = {"dicom": DicomAssetsResource(config_path=str(config))}
    sensor = defs.get_sensor_def("new_patients")
    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions(PATIENTS_PARTITION_SET, ["PAT%2F00000"])  # one known already
        started = time.perf_counter()
        first = sensor(dg.build_sensor_context(instance=instance, resources=resources))
        tick_s = time.perf_counter() - started
        added = first.dynamic_partitions_requests[0].partition_keys
        assert len(added) == 5_000 and "PAT%2F00000" not in added
        assert len(first.run_requests) == 25  # 200 patients per run, never one run per patient
        assert first.run_requests[0].tags["dagster/asset_partition_range_start"] == added[0]
        instance.add_dynamic_partitions(PATIENTS_PARTITION_SET, list(added))
        ticks = 1
        while True:
            result = sensor(dg.build_sensor_context(instance=instance, resources=resources))
            if not result.dynamic_partitions_requests:
                break
            instance.add_dynamic_partitions(PATIENTS_PARTITION_SET, list(result.dynamic_partitions_requests[0].partition_keys))
            ticks += 1
        assert len(instance.get_dynamic_partitions(PATIENTS_PARTITION_SET)) == 20_000
        assert ticks == 4
    store.dispose()
    with capsys.disabled():
        print(f"\nnew_patients sensor: first tick over 20,000 patients took {tick_s:.2f} s")
