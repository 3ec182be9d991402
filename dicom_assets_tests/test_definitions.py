"""The whole asset graph through Dagster against the bundled PACS and a real PostgreSQL."""

from __future__ import annotations

import csv
import zipfile
from pathlib import Path

import dagster as dg
import pytest
import yaml

from dicom_assets.defs.resources import DicomAssetsResource
from dicom_assets.layout import archive_name, patient_key
from dicom_assets.store import StateStore
from dicom_assets_tests.conftest import free_port
from dicom_assets_tests.pacs_fixtures import small_cohort

ASSET_KEYS = {"patients", "studies", "series", "downloaded_series", "patient_archive", "deidentified_archive", "published_archive", "validation_report", "inventory", "request_report"}


def test_code_location_has_exactly_the_documented_assets() -> None:
    from dicom_assets import defs

    repo = defs.get_repository_def()
    keys = {k.to_user_string() for k in repo.asset_graph.get_all_asset_keys()}
    assert keys == ASSET_KEYS
    assert {s.name for s in repo.sensor_defs} >= {"patient_archive_outdated", "request_file_changed"}
    assert {"discover_patients", "patient_pipeline", "write_inventory"} <= {j.name for j in repo.get_all_jobs()}


@pytest.fixture
def deployment(tmp_path: Path, pg_url: str, monkeypatch: pytest.MonkeyPatch):
    """A served cohort, a config file pointing at it, and a Dagster instance in tmp_path."""
    from dicom_assets.devpacs import DevPacs

    cohort = small_cohort(tmp_path / "pacs")
    receiver_port = free_port()
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "dagster_home"))
    with DevPacs(tmp_path / "pacs", move_destinations={"DICOM_ASSETS": ("127.0.0.1", receiver_port)}) as pacs:
        config = {
            "pacs": {"host": "127.0.0.1", "port": pacs.port, "called_ae_title": "DEVPACS", "timeout_s": 10, "straggler_timeout_s": 1},
            "receiver": {"ae_title": "DICOM_ASSETS", "bind_address": "127.0.0.1", "port": receiver_port},
            "selection": {"patient_id_regex": "^PAT"},
            "paths": {"download_dir": "downloads", "archive_dir": "archives", "report_dir": "reports"},
            "database": {"url": pg_url},
        }
        path = tmp_path / "config.yaml"
        path.write_text(yaml.safe_dump(config))
        monkeypatch.setenv("DICOM_ASSETS_CONFIG", str(path))
        yield cohort, path, tmp_path


def _zip_members(path: Path) -> list[str]:
    with zipfile.ZipFile(path) as zf:
        assert zf.testzip() is None
        return [n for n in zf.namelist() if n.endswith(".dcm")]


def test_sync_then_new_series_rebuilds_archive_through_the_sensor(deployment) -> None:
    from dicom_assets import defs
    from dicom_assets.devpacs import add_series
    from dicom_assets.sync import run_sync

    cohort, config_path, root = deployment
    report = run_sync(config_path, progress=False)
    assert report.ok, report
    assert report.status_counts["complete"] == len(cohort.series)

    archives = sorted(p.name for p in (root / "archives").glob("*.zip"))
    expected = sorted(archive_name(pid, "__seriesCount", 2) for pid in cohort.patients)
    assert archives == expected
    for pid in cohort.patients:
        assert len(_zip_members(root / "archives" / archive_name(pid, "__seriesCount", 2))) == 8

    with open(root / "reports" / "inventory.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert sorted(r["series_instance_uid"] for r in rows) == sorted(s.series_instance_uid for s in cohort.series)
    assert {r["download_status"] for r in rows} == {"complete"}
    assert all(r["archive_name"].endswith("__seriesCount2.zip") for r in rows)
    for pid in cohort.patients:
        assert (root / "reports" / "validation" / f"{patient_key(pid)}.csv").exists()
    assert report.check_failures == 0

    # A patient gains a series on the PACS; discovery and retrieval pick it up for that partition.
    patient = cohort.patients[1]
    key = patient_key(patient)
    add_series(root / "pacs", patient, slices=3, rows=32, columns=32)
    instance = dg.DagsterInstance.get()
    resources = {"dicom": DicomAssetsResource(config_path=str(config_path))}
    job = defs.resolve_job_def("patient_pipeline")
    result = job.execute_in_process(
        instance=instance, partition_key=key, asset_selection=[dg.AssetKey("studies"), dg.AssetKey("series"), dg.AssetKey("downloaded_series")]
    )
    assert result.success
    [retrieved] = result.asset_materializations_for_node("downloaded_series")
    md = {k: v.value for k, v in retrieved.metadata.items()}
    assert md["series_complete"] == 1 and md["connection_faults"] == 0 and md["pacs_resets_seen"] == 0
    assert md["request_rate_per_min"] == md["lowest_request_rate_per_min"] > 0  # no reset: the configured rate

    # The sensor asks for exactly that patient's archive, once.
    sensor = defs.get_sensor_def("patient_archive_outdated")
    tick = sensor(dg.build_sensor_context(instance=instance, resources=resources))
    assert [r.partition_key for r in tick.run_requests] == [key]
    assert tick.run_requests[0].run_key == f"{key}:3:2"

    rebuilt = job.execute_in_process(instance=instance, partition_key=key, asset_selection=[dg.AssetKey("patient_archive")])
    assert rebuilt.success
    names = sorted(p.name for p in (root / "archives").glob("*.zip"))
    assert archive_name(patient, "__seriesCount", 3) in names
    assert archive_name(patient, "__seriesCount", 2) not in names  # superseded zip removed after verification
    assert len(_zip_members(root / "archives" / archive_name(patient, "__seriesCount", 3))) == 11
    assert len(names) == len(cohort.patients)

    again = sensor(dg.build_sensor_context(instance=instance, resources=resources))
    assert not again.run_requests


def test_inventory_materializes_alone_from_the_cli(deployment) -> None:
    """`dagster asset materialize --select inventory` with the module from the environment."""
    import os
    import subprocess
    import sys

    cohort, config_path, root = deployment
    store = StateStore(yaml.safe_load(config_path.read_text())["database"]["url"])
    store.create_schema()
    (root / "dagster_home").mkdir(exist_ok=True)
    env = {**os.environ, "DAGSTER_CLI_ASSET_MATERIALIZE_MODULE_NAME": "dicom_assets"}
    dagster = Path(sys.executable).with_name("dagster")
    done = subprocess.run([str(dagster), "asset", "materialize", "--select", "inventory"], env=env, cwd=root,
                          capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (root / "reports" / "inventory.csv").read_text().startswith("patient_id,")
