"""``dicom-assets demo`` selects by a request file: its rows, its date window, the row the PACS
cannot answer ("not found" in the report and in the printed summary), and the second sync that
finds a series added to an old study (a full pass: an incremental one would not ask).

``test_cli.py::test_demo_runs_end_to_end`` runs the demo with two patients (no window); this
one runs it with three, so the window row is there too. ~15 s.
"""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dicom_assets.demo import FULL_PASS_WHY, MISSING_PATIENT_ID, demo_request_rows, demo_selection

pytestmark = pytest.mark.timeout(180)


def test_request_rows_name_every_patient_window_the_last_of_three_and_end_with_a_missing_one() -> None:
    dates = {"A": ["20190101", "20210505"], "B": ["20200101"], "C": ["20180101", "20220202"]}
    rows = demo_request_rows(["A", "B", "C"], dates)
    assert [r["PatientID"] for r in rows] == ["A", "B", "C", MISSING_PATIENT_ID]
    assert [r.get("StudyDateFrom") for r in rows] == [None, None, "2022-02-02", None]
    assert all("StudyDateFrom" not in r for r in demo_request_rows(["A", "C"], dates))  # two patients: no window


def test_a_world_without_request_file_selects_by_regex(tmp_path: Path) -> None:
    """``dicom-assets dev`` on a fresh world writes the demo config before any request.csv exists."""
    assert demo_selection(tmp_path) == {"patient_id_regex": "^DEMO"}
    (tmp_path / "request.csv").write_text("PatientID\nDEMO-0001\n")
    assert demo_selection(tmp_path) == {"request_file": "request.csv"}


def _report(path: Path) -> dict[str, dict[str, str]]:
    with path.open(newline="", encoding="utf-8-sig") as f:
        return {row["PatientID"]: row for row in csv.DictReader(f)}


def test_demo_answers_every_request_row_and_names_the_one_not_found(tmp_path: Path) -> None:
    env = {**os.environ, "DAGSTER_DISABLE_TELEMETRY": "1"}
    env.pop("DICOM_ASSETS_CONFIG", None)
    done = subprocess.run(
        [sys.executable, "-m", "dicom_assets.cli", "demo", "--workdir", "w", "--patients", "3", "--slices", "2", "--size", "32"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=150,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    work = tmp_path / "w"
    report = _report(work / "reports" / "request_report.csv")
    assert list(report) == ["DEMO-0001", "DEMO 0002/\u00fc", "DEMO.0003", MISSING_PATIENT_ID]  # file order
    missing = report[MISSING_PATIENT_ID]
    assert missing["status"] == "not found"
    assert f"PatientID '{MISSING_PATIENT_ID}'" in missing["reason"]
    assert [report[p]["status"] for p in ("DEMO-0001", "DEMO 0002/\u00fc", "DEMO.0003")] == ["complete"] * 3
    assert report["DEMO.0003"]["StudyDateFrom"] and report["DEMO.0003"]["studies"] == "1"  # the window keeps one study
    assert report["DEMO-0001"]["series_retrieved"] == "5"  # 2 studies x 2 series + the series added to an old study
    archives = sorted(p.name for p in (work / "archives").glob("*.zip"))
    assert archives == ["DEMO%200002%2F\u00fc__seriesCount4.zip", "DEMO%2E0003__seriesCount2.zip", "DEMO-0001__seriesCount5.zip"]
    assert FULL_PASS_WHY in done.stdout
    summary = done.stdout.split("== dicom-assets demo summary", 1)[1]
    assert "3 complete, 1 not found" in summary
    assert f"not found  no study with PatientID '{MISSING_PATIENT_ID}'" in summary
