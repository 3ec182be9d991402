"""Retrieval asset: every not-yet-complete series of the patient, on local disk."""

import dagster as dg

from dicom_assets.defs.discovery.assets import series
from dicom_assets.defs.partitions import PACS_POOL, per_patient_asset
from dicom_assets.defs.resources import DicomAssetsResource
from dicom_assets.retrieval import release_dead_claims, retrieve_patients
from dicom_assets.series_progress import SeriesProgress


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
