"""``dicom-assets demo``: the whole pipeline against the bundled PACS on loopback.

Generates a small synthetic cohort, serves it with the bundled PACS on a free 127.0.0.1 port,
writes a researcher's request file (``request.csv``: a row per patient, one of them limited to
its latest study by a StudyDate window, and a row for a patient the PACS does not have) and a
config that selects by it, runs a sync pass through Dagster (instance under the workdir), then
adds a series to one patient and shows the archive sensor asking for that patient's zip to be
rebuilt and the rebuilt ``...__seriesCount<N+1>.zip``. Prints the figures and the request
report row by row (``reports/request_report.csv``), the not-found row with its reason.
"""

from __future__ import annotations

import csv
import os
import shutil
import socket
import time
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import yaml
from pydicom import dcmread

from dicom_assets.devpacs import CohortSpec, DevPacs, add_series, generate_cohort
from dicom_assets.devpacs.request_cohort import request_file_csv

if TYPE_CHECKING:
    from dicom_assets.sync import SyncReport

MARKER = ".dicom-assets-demo"
DEMO_PATIENT_IDS = ("DEMO-0001", "DEMO 0002/ü", "DEMO.0003", "DEMO-0004", "DEMO-0005", "DEMO-0006")
#: A PatientID the demo PACS never has: its row must come back "not found" in the report.
MISSING_PATIENT_ID = "DEMO-9999"
REQUEST_FILE = "request.csv"
REQUEST_COLUMNS = ("PatientID", "StudyDateFrom", "Subject")
FULL_PASS_WHY = (
    "second sync with --full-discovery: with a request file an incremental pass asks the PACS only about new rows "
    "and recent StudyDates, and this series joined an old study; a full pass (weekly by default) asks every row again"
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _prepare(workdir: Path) -> Path:
    """Use ``workdir`` afresh; only a directory this demo made before is ever wiped."""
    workdir = workdir.resolve()
    if workdir.exists() and any(workdir.iterdir()):
        if not (workdir / MARKER).exists():
            raise SystemExit(f"dicom-assets demo: {workdir} exists and was not made by the demo; choose another --workdir")
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / MARKER).write_text("made by dicom-assets demo; safe to delete\n")
    return workdir


def demo_selection(workdir: Path) -> dict[str, str]:
    """``request.csv`` as the selection when the demo wrote one; else (``dicom-assets dev`` on a
    fresh world, which has no request file) every ``DEMO`` patient, so the config still loads."""
    if (workdir / REQUEST_FILE).is_file():
        return {"request_file": REQUEST_FILE}  # relative to the config's directory
    return {"patient_id_regex": "^DEMO"}


def write_demo_config(workdir: Path, pacs_port: int, receiver_port: int) -> Path:
    """The demo's config: the bundled PACS, our receiver, and the selection of :func:`demo_selection`."""
    config = {
        "pacs": {
            "host": "127.0.0.1",
            "port": pacs_port,
            "called_ae_title": "DEVPACS",
            "calling_ae_title": "DICOM_ASSETS",
            "retrieve_method": "c-move",
            "max_requests_per_minute": 700,
            "max_concurrent_associations": 2,
            "timeout_s": 30,
        },
        "receiver": {"ae_title": "DICOM_ASSETS", "bind_address": "127.0.0.1", "port": receiver_port},
        "selection": demo_selection(workdir),
        "paths": {"download_dir": "downloads", "archive_dir": "archives", "report_dir": "reports"},
        "archive": {"delimiter": "__seriesCount", "keep_superseded": False},
        "database": {"url": "sqlite:///state.sqlite"},
    }
    path = workdir / "config.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False, allow_unicode=True))
    return path


def study_dates(pacs_dir: Path) -> dict[str, list[str]]:
    """PatientID -> the distinct StudyDates (``YYYYMMDD``) of its studies on disk, oldest first.

    Read from one file per study (``<StudyUID>/<SeriesUID>/<SOPUID>.dcm``), because the
    generator picks the dates and a date window must be written against the real ones.
    """
    dates: dict[str, set[str]] = {}
    for study_dir in sorted(p for p in pacs_dir.iterdir() if p.is_dir()):
        first = next(iter(sorted(study_dir.rglob("*.dcm"))), None)
        if first is not None:
            ds = dcmread(first, stop_before_pixels=True, specific_tags=["PatientID", "StudyDate"])
            dates.setdefault(str(ds.PatientID), set()).add(str(ds.StudyDate))
    return {pid: sorted(days) for pid, days in dates.items()}


def _iso(day: str) -> str:
    """``YYYYMMDD`` as ``YYYY-MM-DD`` (what a researcher types); anything else unchanged."""
    return f"{day[:4]}-{day[4:6]}-{day[6:]}" if len(day) == 8 and day.isdigit() else day


def demo_request_rows(patient_ids: Sequence[str], dates: dict[str, list[str]]) -> list[dict[str, str]]:
    """A row per patient by PatientID, then a row for :data:`MISSING_PATIENT_ID`.

    With three patients or more, the last one's row asks only from its latest StudyDate on: the
    window shows in the report (one study) and in its zip (half the series). The first patient
    gets a series added later and the second has the awkward ID, so both keep every study.
    """
    rows = [{"PatientID": pid, "Subject": f"S{i:02d}"} for i, pid in enumerate(patient_ids, start=1)]
    windowed = patient_ids[-1] if len(patient_ids) >= 3 else None
    if windowed is not None and len(dates.get(windowed, [])) > 1:
        rows[-1]["StudyDateFrom"] = _iso(dates[windowed][-1])
    rows.append({"PatientID": MISSING_PATIENT_ID, "Subject": "S99"})
    return rows


def write_demo_request(workdir: Path, patient_ids: Sequence[str]) -> Path:
    """``<workdir>/request.csv`` for the cohort under ``<workdir>/pacs`` (see :func:`demo_request_rows`)."""
    rows = demo_request_rows(patient_ids, study_dates(workdir / "pacs"))
    path = workdir / REQUEST_FILE
    path.write_text(request_file_csv(REQUEST_COLUMNS, rows), encoding="utf-8")
    return path


def _describe_request(path: Path) -> str:
    with path.open(newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    windows = [f"{r['PatientID']} from {r['StudyDateFrom']} on" for r in rows if r.get("StudyDateFrom")]
    return (f"request file {path}: {len(rows)} rows, one per patient"
            + (f" ({', '.join(windows)} only)" if windows else "") + f", and {MISSING_PATIENT_ID}, who is not on the PACS")  # fmt: skip


def run_demo(workdir: Path, patients: int = 4, slices: int = 24, size: int = 256) -> int:
    from dicom_assets.sync import run_sync

    started = time.monotonic()
    workdir = _prepare(workdir)
    ids = DEMO_PATIENT_IDS[:patients] if patients <= len(DEMO_PATIENT_IDS) else None
    spec = CohortSpec(
        patients=patients, studies_per_patient=2, series_per_study=2, slices_per_series=slices,
        rows=size, columns=size, patient_id_prefix="DEMO-", patient_ids=ids, seed=7,
    )  # fmt: skip
    cohort = generate_cohort(workdir / "pacs", spec)
    print(f"cohort: {len(cohort.patients)} patients, {len(cohort.series)} series, {cohort.instances} instances, {cohort.bytes / 1e6:.1f} MB")
    print(_describe_request(write_demo_request(workdir, spec.resolved_patient_ids())))
    receiver_port = _free_port()
    os.environ["DAGSTER_HOME"] = str(workdir / "dagster_home")
    (workdir / "dagster_home").mkdir()
    (workdir / "dagster_home" / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    with DevPacs(workdir / "pacs", move_destinations={"DICOM_ASSETS": ("127.0.0.1", receiver_port)}) as pacs:
        config = write_demo_config(workdir, pacs.port, receiver_port)
        print(f"bundled PACS DEVPACS on 127.0.0.1:{pacs.port}; config {config}")
        first = run_sync(config)
        patient = spec.resolved_patient_ids()[0]
        added = add_series(workdir / "pacs", patient, slices=slices, rows=size, columns=size)
        print(f"added series {added.series_instance_uid} to the first study of patient {patient!r}")
        print(FULL_PASS_WHY)
        second = run_sync(config, full_discovery=True)
    _summary(workdir, first, second, time.monotonic() - started)
    return 0 if first.ok and second.ok else 1


def request_report_lines(report_csv: Path) -> list[str]:
    """The request report in a few lines: counts by status, then every row with its answer
    (the reason for each row that is not complete), as the investigators will read it."""
    if not report_csv.is_file():
        return [f"request report  MISSING: {report_csv} was not written"]
    with report_csv.open(newline="", encoding="utf-8-sig") as f:
        rows = list(csv.DictReader(f))
    counts = Counter(r["status"] for r in rows)
    lines = [f"request report  {report_csv}: {len(rows)} rows: " + ", ".join(f"{n} {status}" for status, n in counts.items())]
    for r in rows:
        asked = f"PatientID {r.get('PatientID', '')}" + (f", StudyDate from {_iso(r['StudyDateFrom'])}" if r.get("StudyDateFrom") else "")
        answer = (f"{r['studies']} stud{'y' if r['studies'] == '1' else 'ies'}, {r['series_retrieved']} series retrieved"
                  if r["status"] == "complete" else r["reason"])  # fmt: skip
        lines.append(f"  row {r['row']:>2} {asked:<46} {r['status']:<10} {answer}")
    return lines


def _summary(workdir: Path, first: SyncReport, second: SyncReport, seconds: float) -> None:
    archives = sorted(p.name for p in (workdir / "archives").glob("*.zip"))
    mb = first.bytes_received / 1e6
    rate = mb / first.retrieval_seconds if first.retrieval_seconds else 0.0
    print("\n== dicom-assets demo summary")
    print(f"patients        {first.patient_counts.get('patients', 0)}")
    print(f"series          {sum(second.status_counts.values())} ({second.status_counts.get('complete', 0)} complete)")
    print(f"instances       {first.instances_received} retrieved in the first pass")
    print(f"retrieved       {mb:.1f} MB in {first.retrieval_seconds:.1f} s = {rate:.1f} MB/s")
    print(f"archives        {', '.join(archives)}")
    print(f"validation      {'all series match the PACS counts' if not (first.check_failures or second.check_failures) else 'MISMATCHES: see reports/validation'}")
    for line in request_report_lines(workdir / "reports" / "request_report.csv"):
        print(line)
    print(f"inventory       {workdir / 'reports' / 'inventory.csv'}")
    print(f"dagster runs    {len(first.runs) + len(second.runs)} (DAGSTER_HOME={workdir / 'dagster_home'})")
    print(f"total           {seconds:.1f} s")
