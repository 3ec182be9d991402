"""The `dicom-assets` command as a user runs it (subprocesses, real files, loopback only)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import yaml

from dicom_assets_tests.pacs_fixtures import offline_config

CLI = [sys.executable, "-m", "dicom_assets.cli"]


def _run(args: list[str], cwd: Path, env: dict[str, str] | None = None, timeout: int = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(CLI + args, cwd=cwd, env={**os.environ, **(env or {})}, capture_output=True, text=True, timeout=timeout)


def test_config_error_exits_2_and_names_the_key(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"pacs": {"host": "127.0.0.1", "port": "many", "called_ae_title": "X"},
                                   "paths": {"download_dir": "a", "archive_dir": "b", "report_dir": "c"}}))
    done = _run(["status", "--config", str(bad)], tmp_path)
    assert done.returncode == 2
    assert "pacs.port" in done.stderr


def test_status_on_an_empty_state_db(tmp_path: Path) -> None:
    config = offline_config(tmp_path / "c.yaml", "sqlite:///state.sqlite")
    done = _run(["status"], tmp_path, env={"DICOM_ASSETS_CONFIG": str(config)})
    assert done.returncode == 0, done.stderr
    assert "complete" in done.stdout and "patients     0" in done.stdout
    assert "request rate 700/min of 700/min (lowest 700/min); 0 resets by the PACS" in done.stdout
    assert (tmp_path / "state.sqlite").exists()


def test_status_counts_the_request_rows_by_answer(tmp_path: Path) -> None:
    from dicom_assets.request_file import read_request_file
    from dicom_assets.store import StateStore

    (tmp_path / "cohort.csv").write_text("PatientID\n000123\nNOPE\n0042\n", encoding="utf-8")
    config = offline_config(tmp_path / "c.yaml", "sqlite:///state.sqlite", selection={"request_file": "cohort.csv"})
    store = StateStore(f"sqlite:///{tmp_path / 'state.sqlite'}")
    store.create_schema()
    store.sync_request_rows(read_request_file(tmp_path / "cohort.csv").rows)
    first, nope, _ = store.request_rows()
    store.record_row_resolution(first.row_key, "found", None, [("1.1", "000123")])
    store.record_row_resolution(nope.row_key, "not_found", "no study", [])
    store.dispose()
    done = _run(["status"], tmp_path, env={"DICOM_ASSETS_CONFIG": str(config)})
    assert done.returncode == 0, done.stderr
    assert "request rows 3 in the state DB (1 found, 1 not found, 1 unresolved)" in done.stdout


def test_retry_lists_given_up_series_then_makes_them_claimable(tmp_path: Path) -> None:
    from dicom_assets.store import PatientRecord, SeriesRecord, StateStore, StudyRecord

    config = offline_config(tmp_path / "c.yaml", "sqlite:///state.sqlite")
    store = StateStore(f"sqlite:///{tmp_path / 'state.sqlite'}")
    store.create_schema()
    store.upsert_patients([PatientRecord("P1")])
    store.upsert_studies([StudyRecord("1.1", "P1")])
    store.upsert_series([SeriesRecord("1.1.1", "1.1", "P1", expected_instances=3), SeriesRecord("1.1.2", "1.1", "P1")])
    for _ in range(5):  # given up: 5 attempts refused by the PACS
        assert store.claim_next_series(["P1"], "w", 30, only=["1.1.1"])
        store.finish_series("1.1.1", "w", "failed", 1, 10, error="status 0xA702", count_attempt=True)
    env = {"DICOM_ASSETS_CONFIG": str(config)}
    assert _run(["retry"], tmp_path, env=env).returncode == 2  # which series? it says
    dry = _run(["retry", "--failed", "--dry-run"], tmp_path, env=env)
    assert dry.returncode == 0, dry.stderr
    assert "1.1.1\tfailed\t1/3 instances\t5 attempts\tstatus 0xA702" in dry.stdout and "1.1.2" not in dry.stdout
    assert "1 series would be made claimable again (dry run" in dry.stdout
    assert store.get_series("1.1.1").attempts == 5
    done = _run(["retry", "--failed"], tmp_path, env=env)
    assert done.returncode == 0 and "1 series claimable again" in done.stdout
    state = store.get_series("1.1.1")
    assert (state.download_status, state.attempts) == ("incomplete", 0)
    store.dispose()


def test_pacs_generate_and_add_series(tmp_path: Path) -> None:
    done = _run(["pacs", "generate", "--dir", "cohort", "--patients", "2", "--slices", "2", "--size", "16"], tmp_path)
    assert done.returncode == 0, done.stderr
    assert "2 patients, 4 series, 8 instances" in done.stdout
    added = _run(["pacs", "add-series", "--dir", "cohort", "--patient-id", "DEMO0001", "--slices", "3", "--size", "16"], tmp_path)
    assert added.returncode == 0, added.stderr
    assert len(list((tmp_path / "cohort").rglob("*.dcm"))) == 11


def test_demo_runs_end_to_end(tmp_path: Path) -> None:
    done = _run(["demo", "--workdir", "w", "--patients", "2", "--slices", "3", "--size", "32"], tmp_path, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "dicom-assets demo summary" in done.stdout
    archives = sorted(p.name for p in (tmp_path / "w" / "archives").glob("*.zip"))
    assert archives == ["DEMO%200002%2F\u00fc__seriesCount4.zip", "DEMO-0001__seriesCount5.zip"]
    assert (tmp_path / "w" / "reports" / "inventory.csv").exists()
    # A second demo in the same workdir starts afresh; a foreign directory is never wiped.
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "precious.txt").write_text("keep")
    refused = _run(["demo", "--workdir", "mine"], tmp_path)
    assert refused.returncode != 0 and (foreign / "precious.txt").exists()


def test_sync_refuses_an_unwritable_json_summary_before_starting(tmp_path) -> None:
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-m", "dicom_assets.cli", "sync", "--config", str(tmp_path / "missing.yaml"),
         "--json-summary", str(tmp_path / "no-such-dir" / "s.json")],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert out.returncode == 2
    assert "--json-summary" in out.stderr and "not writable" in out.stderr
