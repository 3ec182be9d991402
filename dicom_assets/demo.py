"""``dicom-assets demo``: the whole pipeline against the bundled PACS on loopback.

Generates a small synthetic cohort, serves it with the bundled PACS on a free 127.0.0.1 port,
writes a config for it, runs a sync pass through Dagster (instance under the workdir), then adds
a series to one patient and shows the archive sensor asking for that patient's zip to be rebuilt
and the rebuilt ``...__seriesCount<N+1>.zip``. Prints the figures.
"""

from __future__ import annotations

import os
import shutil
import socket
import time
from pathlib import Path

import yaml

from dicom_assets.devpacs import CohortSpec, DevPacs, add_series, generate_cohort

MARKER = ".dicom-assets-demo"
DEMO_PATIENT_IDS = ("DEMO-0001", "DEMO 0002/ü", "DEMO.0003", "DEMO-0004", "DEMO-0005", "DEMO-0006")


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


def write_demo_config(workdir: Path, pacs_port: int, receiver_port: int) -> Path:
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
        "selection": {"patient_id_regex": "^DEMO"},
        "paths": {"download_dir": "downloads", "archive_dir": "archives", "report_dir": "reports"},
        "archive": {"delimiter": "__seriesCount", "keep_superseded": False},
        "database": {"url": "sqlite:///state.sqlite"},
    }
    path = workdir / "config.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def run_demo(workdir: Path, patients: int = 4, slices: int = 24, size: int = 256) -> int:
    from dicom_assets.sync import run_sync

    started = time.monotonic()
    workdir = _prepare(workdir)
    ids = DEMO_PATIENT_IDS[:patients] if patients <= len(DEMO_PATIENT_IDS) else None
    spec = CohortSpec(
        patients=patients, studies_per_patient=2, series_per_study=2, slices_per_series=slices,
        rows=size, columns=size, patient_id_prefix="DEMO-", patient_ids=ids, seed=7,
    )
    cohort = generate_cohort(workdir / "pacs", spec)
    print(f"cohort: {len(cohort.patients)} patients, {len(cohort.series)} series, {cohort.instances} instances, {cohort.bytes / 1e6:.1f} MB")
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
        print(f"added series {added.series_instance_uid} to patient {patient!r}; syncing again")
        second = run_sync(config)
    _summary(workdir, first, second, time.monotonic() - started)
    return 0 if first.ok and second.ok else 1


def _summary(workdir: Path, first, second, seconds: float) -> None:  # type: ignore[no-untyped-def]
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
    print(f"inventory       {workdir / 'reports' / 'inventory.csv'}")
    print(f"dagster runs    {len(first.runs) + len(second.runs)} (DAGSTER_HOME={workdir / 'dagster_home'})")
    print(f"total           {seconds:.1f} s")
