"""The request-file sensor: an edited file launches discovery once per content, never per tick."""

from __future__ import annotations

from pathlib import Path

import dagster as dg

from dicom_assets_tests.pacs_fixtures import offline_config


def test_an_edited_request_file_launches_discovery_once(tmp_path: Path, sqlite_url: str) -> None:
    from dicom_assets import defs
    from dicom_assets.defs.resources import DicomAssetsResource

    request = tmp_path / "cohort.csv"
    request.write_text("PatientID\n000123\n", encoding="utf-8")
    config = offline_config(tmp_path / "c.yaml", sqlite_url, selection={"request_file": "cohort.csv"})
    resources = {"dicom": DicomAssetsResource(config_path=str(config))}
    sensor = defs.get_sensor_def("request_file_changed")
    with dg.instance_for_test() as instance:

        def tick(cursor: str | None) -> dg.SensorResult:
            return sensor(dg.build_sensor_context(instance=instance, resources=resources, cursor=cursor))

        first = tick(None)  # a file the sensor has not seen: discovery, keyed by its content
        (run,) = first.run_requests
        assert run.job_name in (None, "discover_patients") and run.run_key == f"request-file-{first.cursor}"
        unchanged = tick(first.cursor)
        assert not unchanged.run_requests and "unchanged" in unchanged.skip_reason.skip_message
        request.write_text("PatientID\n000123\n0042\n", encoding="utf-8")  # the researcher adds a row
        edited = tick(first.cursor)
        assert len(edited.run_requests) == 1 and edited.cursor != first.cursor
        assert edited.run_requests[0].run_key != run.run_key
        request.unlink()
        gone = tick(edited.cursor)
        assert not gone.run_requests and "cannot read the request file" in gone.skip_reason.skip_message


def test_without_a_request_file_the_sensor_skips(tmp_path: Path, sqlite_url: str) -> None:
    from dicom_assets import defs
    from dicom_assets.defs.resources import DicomAssetsResource

    config = offline_config(tmp_path / "c.yaml", sqlite_url)
    result = defs.get_sensor_def("request_file_changed")(
        dg.build_sensor_context(resources={"dicom": DicomAssetsResource(config_path=str(config))})
    )
    assert not result.run_requests and "selection.request_file is not set" in result.skip_reason.skip_message
