"""Heartbeats: healthchecks.io-style pings to a local HTTP server, from the run status sensors."""

from __future__ import annotations

import http.server
import threading
from pathlib import Path
from typing import Iterator

import dagster as dg
import pytest

from dicom_assets.heartbeat import ping, redact
from dicom_assets_tests.conftest import free_port
from dicom_assets_tests.pacs_fixtures import offline_config


class _Recorder(http.server.BaseHTTPRequestHandler):
    seen: list[tuple[str, str, str]] = []

    def do_POST(self) -> None:  # noqa: N802 - http.server's naming
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0)).decode()
        type(self).seen.append(("POST", self.path, body))
        self.send_response(200)
        self.end_headers()
        self.wfile.write(b"OK")

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def checks_server() -> Iterator[tuple[str, list]]:
    handler = type("Recorder", (_Recorder,), {"seen": []})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", handler.seen
    server.shutdown()


def test_ping_paths_and_failures_never_raise(checks_server) -> None:
    base, seen = checks_server
    assert ping(f"{base}/uuid-1", "start", body="run 1")
    assert ping(f"{base}/uuid-1/", "success")
    assert ping(f"{base}/uuid-1", "fail")
    assert [(m, p) for m, p, _ in seen] == [("POST", "/uuid-1/start"), ("POST", "/uuid-1"), ("POST", "/uuid-1/fail")]
    assert seen[0][2] == "run 1"
    assert ping(f"http://127.0.0.1:{free_port()}/nobody-listens", "start", timeout_s=2) is False
    assert redact("https://hc-ping.com/secret-uuid") == "https://hc-ping.com/…"


def _config(tmp_path: Path, base: str, report_dir: Path) -> Path:
    return offline_config(
        tmp_path / "config.yaml", f"sqlite:///{tmp_path / 'state.sqlite'}", str(report_dir),
        heartbeats={"inventory": f"{base}/inv-check"},
    )  # fmt: skip


def _evaluate(sensor_name: str, instance, run, resources) -> None:  # noqa: ANN001
    from dicom_assets import defs

    sensor = defs.get_sensor_def(sensor_name)
    event = next(iter(instance.all_logs(run.run_id, of_type={
        "heartbeat_start": dg.DagsterEventType.RUN_START,
        "heartbeat_success": dg.DagsterEventType.RUN_SUCCESS,
        "heartbeat_fail": dg.DagsterEventType.RUN_FAILURE,
    }[sensor_name]))).dagster_event
    context = dg.build_run_status_sensor_context(
        sensor_name=sensor_name, dagster_event=event, dagster_instance=instance, dagster_run=run, resources=resources
    )
    sensor(context)


def test_run_status_sensors_ping_the_job_check(checks_server, tmp_path: Path) -> None:
    from dicom_assets import defs
    from dicom_assets.defs.resources import DicomAssetsResource

    base, seen = checks_server
    good = _config(tmp_path, base, tmp_path / "reports")
    with dg.instance_for_test() as instance:
        resources = {"dicom": DicomAssetsResource(config_path=str(good))}
        job = defs.resolve_job_def("write_inventory")
        ok = job.execute_in_process(instance=instance, resources=resources)
        assert ok.success
        run = instance.get_run_by_id(ok.run_id)
        _evaluate("heartbeat_start", instance, run, resources)
        _evaluate("heartbeat_success", instance, run, resources)

        (tmp_path / "not-a-dir").write_text("a file where the report directory must go")
        (tmp_path / "bad").mkdir()
        bad = _config(tmp_path / "bad", base, tmp_path / "not-a-dir")
        bad_resources = {"dicom": DicomAssetsResource(config_path=str(bad))}
        failed = job.execute_in_process(instance=instance, resources=bad_resources, raise_on_error=False)
        assert not failed.success
        _evaluate("heartbeat_fail", instance, instance.get_run_by_id(failed.run_id), bad_resources)
    assert [p for _, p, _ in seen] == ["/inv-check/start", "/inv-check", "/inv-check/fail"]
    assert ok.run_id in seen[1][2]


def test_no_heartbeat_configured_is_a_skip(tmp_path: Path) -> None:
    from dicom_assets import defs
    from dicom_assets.defs.heartbeats.sensors import check_of_run

    config = offline_config(tmp_path / "c.yaml", f"sqlite:///{tmp_path / 's.sqlite'}", str(tmp_path / "r"))
    from dicom_assets.defs.resources import DicomAssetsResource

    with dg.instance_for_test() as instance:
        resources = {"dicom": DicomAssetsResource(config_path=str(config))}
        result = defs.resolve_job_def("write_inventory").execute_in_process(instance=instance, resources=resources)
        run = instance.get_run_by_id(result.run_id)
        assert check_of_run(run) == "inventory"
        _evaluate("heartbeat_success", instance, run, resources)  # must not raise nor ping anything
