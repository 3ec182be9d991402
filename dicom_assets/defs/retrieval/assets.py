"""Retrieval asset: every not-yet-complete series of the patient, on local disk."""

import threading
import time

import dagster as dg

from dicom_assets.defs.discovery.assets import series
from dicom_assets.defs.partitions import PACS_POOL, per_patient_asset
from dicom_assets.defs.resources import DicomAssetsResource
from dicom_assets.retrieval import SeriesOutcome, release_dead_claims, retrieve_patients


class SeriesProgress:
    """The run log's progress lines: a series that did not complete at once, completed series
    in one line per ``every_s`` seconds.

    Each line is an event Dagster writes to its storage before the worker goes on: a line per
    series cost the retrieving worker a few ms between two series and a million-series run a
    million events. Called from the retrieval workers' threads.
    """

    def __init__(self, log: dg.DagsterLogManager, every_s: float = 5.0) -> None:
        self.log = log
        self.every_s = every_s
        self.done = 0
        self._lock = threading.Lock()
        self._pending: list[SeriesOutcome] = []
        self._last = time.monotonic()

    def note(self, outcome: SeriesOutcome) -> None:
        with self._lock:
            self.done += 1
            if outcome.status != "complete":
                self.log.warning(
                    f"[{self.done}] series {outcome.series_instance_uid}: {outcome.status}, {outcome.instances} instances, "
                    f"{outcome.seconds:.1f}s ({outcome.error})"
                )  # fmt: skip
                return
            self._pending.append(outcome)
            if time.monotonic() - self._last >= self.every_s:
                self._write()

    def flush(self) -> None:
        with self._lock:
            self._write()

    def _write(self) -> None:
        self._last = time.monotonic()
        if not self._pending:
            return
        done, self._pending = self._pending, []
        instances, size = sum(o.instances for o in done), sum(o.bytes_received for o in done)
        last = done[-1]
        self.log.info(
            f"[{self.done}] {len(done)} series complete since the last line ({instances} instances, {size / 1e6:.1f} MB), "
            f"the last {last.series_instance_uid} in {last.seconds:.1f}s"
        )  # fmt: skip


@per_patient_asset(
    pool=PACS_POOL,
    group_name="retrieval",
    kinds={"dicom"},
    deps=[series],
)
def downloaded_series(context: dg.AssetExecutionContext, dicom: DicomAssetsResource) -> dg.MaterializeResult:
    """C-MOVE (or C-GET) each pending/incomplete/failed series of the patients into download_dir."""
    settings = dicom.settings()
    store = dicom.store()
    patient_ids = dicom.patient_ids(context.partition_keys)
    released = release_dead_claims(store)
    if released:
        context.log.warning(f"{released} series claimed by a crashed run were released")
    progress = SeriesProgress(context.log)
    client = dicom.pacs()
    stats = retrieve_patients(settings, client, store, patient_ids, on_outcome=progress.note)
    progress.flush()
    rate = client.budget.rate() if hasattr(client.budget, "rate") else None
    budget = {} if rate is None else {
        "request_rate_per_min": rate.per_minute(rate.current_per_window),
        "lowest_request_rate_per_min": rate.per_minute(rate.lowest_per_window),
        "pacs_resets_seen": rate.resets,
    }  # fmt: skip
    return dg.MaterializeResult(
        metadata={**stats.metadata(), **budget, "patients": len(patient_ids), "method": "wado-rs" if settings.pacs.protocol == "dicomweb" else settings.pacs.retrieve_method}
    )
