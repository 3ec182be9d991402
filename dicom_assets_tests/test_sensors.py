"""The new-work sensor (defs/discovery/sensors.py): partitions for new patients, pipeline runs in
ranges for work no run has seen, nothing for patients a live run holds; 20,000 patients in a tick."""

from __future__ import annotations

import time
from pathlib import Path

import dagster as dg

from dicom_assets.defs.partitions import PATIENTS_PARTITION_SET
from dicom_assets.defs.patient_runs import RANGE_END_TAG, RANGE_START_TAG, range_tags, ranges_covering
from dicom_assets.store import PatientRecord, StateStore
from dicom_assets_tests.pacs_fixtures import offline_config


def _sensor_and_resources(tmp_path: Path, pg_url: str):  # noqa: ANN202
    from dicom_assets import defs
    from dicom_assets.defs.resources import DicomAssetsResource

    config = offline_config(tmp_path / "c.yaml", pg_url)
    return defs.get_sensor_def("new_patient_work"), {"dicom": DicomAssetsResource(config_path=str(config))}


def _ranges(result: dg.SensorResult) -> list[tuple[str, str]]:
    return [(r.tags[RANGE_START_TAG], r.tags[RANGE_END_TAG]) for r in result.run_requests]


def test_ranges_cover_every_wanted_patient_with_as_few_runs_as_the_spread_allows() -> None:
    order = [f"P{i:03d}" for i in range(1000)]
    assert ranges_covering(order, []) == []
    assert ranges_covering(order, ["P005"]) == [("P005", "P005")]
    assert ranges_covering(order, ["P010", "P001", "P209"]) == [("P001", "P010"), ("P209", "P209")]
    wanted = order[::7]
    ranges = ranges_covering(order, wanted, span=200)
    assert len(ranges) == 5
    covered = {k for s, e in ranges for k in order[order.index(s) : order.index(e) + 1]}
    assert set(wanted) <= covered and all(order.index(e) - order.index(s) < 200 for s, e in ranges)
    assert ranges_covering(order, ["not a partition"]) == []


def test_new_patients_get_partitions_and_chunked_runs_over_20000(tmp_path: Path, pg_url: str, capsys) -> None:  # noqa: ANN001
    store = StateStore(pg_url)
    store.create_schema()
    store.upsert_patients(PatientRecord(patient_id=f"PAT/{i:05d}") for i in range(20_000))
    sensor, resources = _sensor_and_resources(tmp_path, pg_url)
    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions(PATIENTS_PARTITION_SET, ["PAT%2F00000"])  # one known already
        started = time.perf_counter()
        first = sensor(dg.build_sensor_context(instance=instance, resources=resources))
        tick_s = time.perf_counter() - started
        added = first.dynamic_partitions_requests[0].partition_keys
        assert len(added) == 5_000 and "PAT%2F00000" not in added
        # Runs only over registered partitions: the known one and the 5,000 just added, 200 per run.
        assert len(first.run_requests) == 26
        assert _ranges(first)[0] == ("PAT%2F00000", added[198])
        assert _ranges(first)[-1][1] == added[-1]
        assert all(r.run_key and r.run_key.startswith("work:") for r in first.run_requests)
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
        assert len(result.run_requests) == 100  # every patient's work, none registered anew
    store.dispose()
    with capsys.disabled():
        print(f"\nnew_patient_work sensor: first tick over 20,000 patients took {tick_s:.2f} s")


@dg.op
def _nothing() -> None: ...


@dg.job
def _a_pipeline_run_stand_in() -> None:
    """Run records are what the sensor reads: their status and partition (range) tags."""
    _nothing()


def test_work_is_asked_for_once_and_never_for_patients_a_live_run_holds(tmp_path: Path, pg_url: str) -> None:
    store = StateStore(pg_url)
    store.create_schema()
    keys = [f"P{i}" for i in range(6)]
    store.upsert_patients(PatientRecord(patient_id=k) for k in keys)
    sensor, resources = _sensor_and_resources(tmp_path, pg_url)
    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions(PATIENTS_PARTITION_SET, keys)
        first = sensor(dg.build_sensor_context(instance=instance, resources=resources))
        assert _ranges(first) == [("P0", "P5")]
        again = sensor(dg.build_sensor_context(instance=instance, resources=resources))
        assert [r.run_key for r in again.run_requests] == [r.run_key for r in first.run_requests]  # Dagster launches one

        # A run not started yet holds P0..P2; a run of P4 alone is running. Only P3 and P5 are asked for.
        job = _a_pipeline_run_stand_in
        queued = instance.create_run_for_job(job, tags=range_tags("P0", "P2"), status=dg.DagsterRunStatus.NOT_STARTED)
        single = instance.create_run_for_job(job, tags={"dagster/partition": "P4"}, status=dg.DagsterRunStatus.STARTED)
        held = sensor(dg.build_sensor_context(instance=instance, resources=resources))
        assert _ranges(held) == [("P3", "P5")]
        assert held.run_requests[0].tags["dicom_assets/new_work"].startswith("2 patient(s)")

        # The runs start on their patients and end: their work is seen, nothing is asked for again.
        time.sleep(0.01)
        store.mark_pipeline_started(keys)
        for run in (queued, single):
            instance.report_run_failed(run)  # (it could not finish: the schedule retries, not the sensor)
        done = sensor(dg.build_sensor_context(instance=instance, resources=resources))
        assert not done.run_requests and "no patient has work" in done.skip_reason.skip_message
    store.dispose()
