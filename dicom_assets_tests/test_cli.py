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
    assert (tmp_path / "state.sqlite").exists()


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
