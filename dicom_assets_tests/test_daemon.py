"""Unattended: `dagster-daemon run` alone, on the production instance (PostgreSQL), makes new work
flow. One discovery launched from the CLI ends with every patient zipped and validated, with no
other launch and no schedule tick; a series added on the PACS and one more discovery rebuild the
zip. Run records are read through Dagster's public API."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import dagster as dg
import pytest
import yaml

from dicom_assets.layout import archive_name, patient_key
from dicom_assets_tests.conftest import free_port, stop_process_group
from dicom_assets_tests.pacs_fixtures import small_cohort

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
PATIENTS = ("DAEMON-1", "DAEMON-2", "DAEMON-3")
NEVER = "0 0 1 1 *"  # the schedules would fire on 1 January only: nothing here waits for them
CHECK_S = 5  # schedules.new_work_check_s: the sensor looks every 5 s (30 s by default)


def _wait_for(what: str, done: Callable[[], bool], daemon: subprocess.Popen, log: Path, timeout_s: float = 240) -> float:
    """Seconds until ``done()``; fails with the daemon's log if it never happens or the daemon died."""
    started = time.monotonic()
    while not done():
        if daemon.poll() is not None or time.monotonic() - started > timeout_s:
            tail = "\n".join(log.read_text(errors="replace").splitlines()[-40:])
            pytest.fail(f"{what}: not after {time.monotonic() - started:.0f} s (daemon exit {daemon.poll()})\n{tail}")
        time.sleep(1)
    return time.monotonic() - started


def _launch_discovery(env: dict[str, str]) -> None:
    """What an operator types: the job goes to the queue; the daemon starts it."""
    subprocess.run([str(BIN / "dagster"), "job", "launch", "-j", "discover_patients", "-w", "workspace.yaml"],
                   cwd=ROOT, env=env, check=True, capture_output=True, timeout=120)


def _runs_by_origin(instance: dg.DagsterInstance) -> dict[str, list[dg.DagsterRun]]:
    out: dict[str, list[dg.DagsterRun]] = {}
    for record in instance.get_run_records():
        run = record.dagster_run
        origin = run.tags.get("dagster/sensor_name") or run.tags.get("dagster/schedule_name") or "launched"
        out.setdefault(f"{origin}:{run.job_name}", []).append(run)
    return out


@pytest.mark.timeout(600)
def test_one_launched_discovery_ends_with_every_patient_zipped_under_the_daemon(
    production_dagster_home: Path, state_pg_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from dicom_assets.devpacs import DevPacs, add_series

    small_cohort(tmp_path / "pacs", patient_ids=PATIENTS)
    receiver_port = free_port()
    config = tmp_path / "config.yaml"
    env = {**os.environ, "DICOM_ASSETS_CONFIG": str(config), "PATH": f"{BIN}:{os.environ.get('PATH', '')}"}
    archives, reports = tmp_path / "archives", tmp_path / "reports"
    log = tmp_path / "daemon.log"
    with DevPacs(tmp_path / "pacs", move_destinations={"DICOM_ASSETS": ("127.0.0.1", receiver_port)}) as pacs:
        config.write_text(yaml.safe_dump({
            "pacs": {"host": "127.0.0.1", "port": pacs.port, "called_ae_title": "DEVPACS", "timeout_s": 10, "straggler_timeout_s": 1},
            "receiver": {"ae_title": "DICOM_ASSETS", "bind_address": "127.0.0.1", "port": receiver_port},
            "paths": {"download_dir": str(tmp_path / "downloads"), "archive_dir": str(archives), "report_dir": str(reports)},
            "database": {"url": state_pg_url},
            "schedules": {"discovery": NEVER, "retrieval": NEVER, "inventory": NEVER, "new_work_check_s": CHECK_S},
        }))  # fmt: skip
        with open(log, "wb") as out:
            daemon = subprocess.Popen([str(BIN / "dagster-daemon"), "run", "-w", "workspace.yaml"], cwd=ROOT, env=env,
                                      stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            def zipped(count: int, patients: tuple[str, ...] = PATIENTS) -> Callable[[], bool]:
                return lambda: all((archives / archive_name(p, "__seriesCount", count)).exists() for p in patients) and all(
                    (reports / "validation" / f"{patient_key(p)}.csv").exists() for p in patients)

            _launch_discovery(env)
            first_s = _wait_for("every patient zipped and validated", zipped(2), daemon, log)
            with dg.DagsterInstance.get() as instance:
                _wait_for("the runs ended", lambda: not instance.get_runs(
                    filters=dg.RunsFilter(statuses=[dg.DagsterRunStatus.QUEUED, dg.DagsterRunStatus.STARTING, dg.DagsterRunStatus.STARTED])),
                    daemon, log)  # fmt: skip
                runs = _runs_by_origin(instance)
                assert set(runs) == {"launched:discover_patients", "new_patient_work:patient_pipeline"}, runs
                assert len(runs["new_patient_work:patient_pipeline"]) == 1  # the three new patients, one run
                assert all(r.status == dg.DagsterRunStatus.SUCCESS for rs in runs.values() for r in rs)
                for p in PATIENTS:
                    rows = (reports / "validation" / f"{patient_key(p)}.csv").read_text().splitlines()
                    assert len(rows) == 3 and all(",ok," in row or row.endswith(",ok") for row in rows[1:]), rows

                # A series is added on the PACS; one more discovery, and the zip is rebuilt by itself.
                add_series(tmp_path / "pacs", PATIENTS[1], slices=3, rows=32, columns=32)
                _launch_discovery(env)
                superseded = archives / archive_name(PATIENTS[1], "__seriesCount", 2)
                second_s = _wait_for("the zip rebuilt with the new series, the old one removed",
                                     lambda: zipped(3, PATIENTS[1:2])() and not superseded.exists(), daemon, log)  # fmt: skip
                _wait_for("the runs ended", lambda: not instance.get_runs(
                    filters=dg.RunsFilter(statuses=[dg.DagsterRunStatus.QUEUED, dg.DagsterRunStatus.STARTING, dg.DagsterRunStatus.STARTED])),
                    daemon, log)  # fmt: skip
                time.sleep(3 * CHECK_S)  # more sensor looks: nothing is asked for twice
                runs = _runs_by_origin(instance)
                assert len(runs["launched:discover_patients"]) == 2
                assert len(runs["new_patient_work:patient_pipeline"]) == 2, runs
                assert set(runs) == {"launched:discover_patients", "new_patient_work:patient_pipeline"}, runs
                assert all(r.status == dg.DagsterRunStatus.SUCCESS for rs in runs.values() for r in rs)
            assert sorted(p.name for p in archives.glob("*.zip")) == sorted(
                archive_name(p, "__seriesCount", 3 if p == PATIENTS[1] else 2) for p in PATIENTS)
        finally:
            stop_process_group(daemon, 60)
    with capsys.disabled():
        print(f"\nunder dagster-daemon alone: launch -> every patient zipped {first_s:.0f} s; new series -> zip rebuilt {second_s:.0f} s")
