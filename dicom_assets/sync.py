"""One complete pass through Dagster: discover, register partitions, retrieve, archive, validate,
inventory. Used by ``dicom-assets sync`` and ``dicom-assets demo``; the runs it makes are ordinary
runs of the code location's jobs on the instance at ``DAGSTER_HOME``, so they show in the UI.
"""

from __future__ import annotations

import os
import socket
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, TextIO

import dagster as dg

from dicom_assets import stopping
from dicom_assets.config import CONFIG_ENV_VAR, Settings, load_settings
from dicom_assets.layout import pid_alive
from dicom_assets.defs.partitions import PATIENTS_PARTITION_SET
from dicom_assets.defs.patient_runs import patient_range_requests
from dicom_assets.store import StateStore


@dataclass
class SyncReport:
    runs: list[str] = field(default_factory=list)
    seconds: float = 0.0
    retrieval_seconds: float = 0.0
    bytes_received: int = 0
    instances_received: int = 0
    status_counts: dict[str, int] = field(default_factory=dict)
    patient_counts: dict[str, int] = field(default_factory=dict)
    failed_runs: list[str] = field(default_factory=list)
    check_failures: int = 0
    stopped: str | None = None  # why the pass ended early (SIGTERM, SIGINT, ...)

    @property
    def ok(self) -> bool:
        bad = self.status_counts.get("failed", 0) + self.status_counts.get("incomplete", 0)
        return not bad and not self.failed_runs


class ProgressPrinter:
    """Polls the state DB while runs execute: a bar on a terminal, plain lines otherwise."""

    def __init__(self, store: StateStore, out: TextIO = sys.stderr, interval_s: float = 0.5) -> None:
        self.store = store
        self.out = out
        self.interval_s = interval_s if out.isatty() else 5.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="sync-progress", daemon=True)
        self._last = ""

    def __enter__(self) -> "ProgressPrinter":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.render(final=True)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.render()

    def render(self, final: bool = False) -> None:
        try:
            counts = self.store.status_counts()
        except Exception:  # noqa: BLE001 - progress display must never break the sync
            return
        total = sum(counts.values()) - counts.get("skipped", 0)  # skipped series are not to be fetched
        done = counts.get("complete", 0)
        line = (
            f"series {done}/{total} complete, {counts.get('in_progress', 0)} in progress, "
            f"{counts.get('incomplete', 0)} incomplete, {counts.get('failed', 0)} failed"
        ) + (f", {counts['skipped']} skipped" if counts.get("skipped") else "")
        if self.out.isatty():
            width = 30
            filled = int(width * done / total) if total else 0
            self.out.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {line}" + ("\n" if final else ""))
            self.out.flush()
        elif line != self._last or final:
            self.out.write(f"progress: {line}\n")
            self.out.flush()
        self._last = line


def dagster_instance() -> dg.DagsterInstance:
    """The instance at ``$DAGSTER_HOME`` (created if the directory is missing)."""
    home = os.environ.get("DAGSTER_HOME")
    if not home:
        raise RuntimeError("DAGSTER_HOME is not set: point it at the Dagster instance directory (see README)")
    Path(home).mkdir(parents=True, exist_ok=True)
    return dg.DagsterInstance.get()


#: What the runs print on the console; everything still goes to the run's event log (the UI).
CONSOLE_LOG_LEVEL = os.environ.get("DICOM_ASSETS_CONSOLE_LOG_LEVEL", "WARNING")


#: Tags on every run a sync executes in its own process: which host and process run it.
SYNC_HOST_TAG = "dicom_assets/sync_host"
SYNC_PID_TAG = "dicom_assets/sync_pid"


def fail_dead_sync_runs(instance: dg.DagsterInstance) -> list[str]:
    """Mark failed the runs of syncs on this host whose process is gone; returns their ids.

    A sync runs its jobs inside its own process. Killed (``kill -9``, power loss), nothing
    ever reports its run as ended: the daemon's run monitoring cannot see a process it did not
    launch, so the run would stay STARTED and hold its ``pacs`` pool slot until the
    ``max_runtime_seconds`` backstop. The next sync on the same host knows better.
    """
    host = socket.gethostname()
    runs = instance.get_runs(
        filters=dg.RunsFilter(
            statuses=[dg.DagsterRunStatus.STARTED, dg.DagsterRunStatus.STARTING, dg.DagsterRunStatus.CANCELING],
            tags={SYNC_HOST_TAG: host},
        )
    )
    failed = []
    for run in runs:
        pid = run.tags.get(SYNC_PID_TAG, "")
        if not pid.isdigit() or pid_alive(int(pid)):
            continue
        instance.report_run_failed(run, f"the dicom-assets sync process {host}:{pid} running it is gone (killed?)")
        instance.event_log_storage.free_concurrency_slots_for_run(run.run_id)
        failed.append(run.run_id)
    return failed


def _run(job: dg.JobDefinition, instance: dg.DagsterInstance, report: SyncReport, tags: dict[str, str] | None = None) -> dg.ExecuteInProcessResult:
    run_config = {"loggers": {"console": {"config": {"log_level": CONSOLE_LOG_LEVEL}}}}
    tags = {**(tags or {}), SYNC_HOST_TAG: socket.gethostname(), SYNC_PID_TAG: str(os.getpid())}
    result = job.execute_in_process(instance=instance, tags=tags, raise_on_error=False, run_config=run_config)
    report.runs.append(result.run_id)
    if not result.success:
        report.failed_runs.append(f"{job.name} ({result.run_id})")
    for event in result.all_events:
        if event.event_type_value == "ASSET_CHECK_EVALUATION" and not event.event_specific_data.passed:
            report.check_failures += 1
    return result


def _retrieval_figures(result: dg.ExecuteInProcessResult, report: SyncReport) -> None:
    for event in result.get_asset_materialization_events():
        mat = event.event_specific_data.materialization
        if mat.asset_key == dg.AssetKey("downloaded_series"):
            md = mat.metadata
            report.retrieval_seconds += float(md["seconds"].value)
            report.bytes_received += int(md["bytes_received"].value)
            report.instances_received += int(md["instances_on_disk"].value)
            return  # one materialization event per partition of the range, all with the run's totals


def run_sync(
    config_file: str | os.PathLike[str] | None = None,
    log: Callable[[str], None] = lambda line: print(line, file=sys.stderr),
    progress: bool = True,
    full_discovery: bool = False,
) -> SyncReport:
    """Run discovery, then the per-patient pipeline in chunks of patients, then the inventory.

    ``full_discovery`` makes the discovery pass ask for every StudyDate (see dicom_assets.discovery).
    """
    from dicom_assets.defs.discovery.assets import FULL_DISCOVERY_TAG
    from dicom_assets.definitions import defs  # imported late: loading the code location is slow

    started = time.monotonic()
    settings: Settings = load_settings(config_file)
    os.environ[CONFIG_ENV_VAR] = str(Path(config_file or os.environ[CONFIG_ENV_VAR]).resolve())
    store = StateStore(settings.database.url)
    store.create_schema()
    instance = dagster_instance()
    report = SyncReport()
    for run_id in fail_dead_sync_runs(instance):
        log(f"marked run {run_id} failed: the sync that ran it was killed")

    log("discovering patients ...")
    _run(defs.resolve_job_def("discover_patients"), instance, report, {FULL_DISCOVERY_TAG: "true"} if full_discovery else None)
    if _stopped(report):
        return _finish(report, store, started)
    keys = instance.get_dynamic_partitions(PATIENTS_PARTITION_SET)
    log(f"{len(keys)} patient partition(s); running the per-patient pipeline")
    printer = ProgressPrinter(store) if progress else None
    if printer:
        printer.__enter__()
    try:
        for request in patient_range_requests(list(keys)):
            result = _run(defs.resolve_job_def("patient_pipeline"), instance, report, dict(request.tags))
            _retrieval_figures(result, report)
            if _stopped(report):
                return _finish(report, store, started)
    finally:
        if printer:
            printer.__exit__(None, None, None)
    log("writing the inventory ...")
    _run(defs.resolve_job_def("write_inventory"), instance, report)
    return _finish(report, store, started)


def _stopped(report: SyncReport) -> bool:
    """A stop was requested (SIGTERM/SIGINT): no further run is started."""
    if stopping.PROCESS.requested:
        report.stopped = stopping.PROCESS.reason
    return report.stopped is not None


def _finish(report: SyncReport, store: StateStore, started: float) -> SyncReport:
    report.status_counts = store.status_counts()
    report.patient_counts = store.patient_counts()
    report.seconds = time.monotonic() - started
    return report
