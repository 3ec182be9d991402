"""Jobs: the three runs a sync pass is made of, also launchable from the UI."""

import dagster as dg

from dicom_assets.defs.archive.assets import patient_archive
from dicom_assets.defs.archive.publish import published_archive
from dicom_assets.defs.deid.assets import deidentified_archive
from dicom_assets.defs.discovery.assets import patients, series, studies
from dicom_assets.defs.reporting.assets import inventory, validation_report
from dicom_assets.defs.retrieval.assets import downloaded_series

discover_patients_job = dg.define_asset_job(
    "discover_patients", selection=dg.AssetSelection.assets(patients), description="C-FIND patients, register partitions"
)

patient_pipeline_job = dg.define_asset_job(
    "patient_pipeline",
    selection=dg.AssetSelection.assets(
        studies, series, downloaded_series, patient_archive, deidentified_archive, published_archive, validation_report
    ),
    description="Per patient: studies, series, retrieval, archive, de-identified copy, validation (and its check)",
)

write_inventory_job = dg.define_asset_job(
    "write_inventory",
    selection=dg.AssetSelection.assets(inventory, "request_report"),
    description="The inventory CSV, and the request report (when selection.request_file is set)",
)
