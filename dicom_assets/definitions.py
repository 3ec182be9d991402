"""The code location: every asset, check and sensor of the project, and the one resource."""

import dagster as dg

from dicom_assets.defs.archive.assets import patient_archive
from dicom_assets.defs.archive.checks import archive_intact
from dicom_assets.defs.archive.publish import published_archive
from dicom_assets.defs.archive.sensors import patient_archive_outdated
from dicom_assets.defs.deid.assets import deidentified_archive
from dicom_assets.defs.deid.sensors import deidentified_archive_outdated
from dicom_assets.defs.discovery.assets import patients, series, studies
from dicom_assets.defs.discovery.schedules import discovery_schedule
from dicom_assets.defs.discovery.sensors import new_patient_work
from dicom_assets.defs.heartbeats.sensors import heartbeat_fail, heartbeat_start, heartbeat_success
from dicom_assets.defs.jobs import discover_patients_job, patient_pipeline_job, write_inventory_job
from dicom_assets.defs.reporting.assets import inventory, validation_report
from dicom_assets.defs.reporting.checks import instance_counts_match, inventory_complete
from dicom_assets.defs.reporting.schedules import inventory_schedule
from dicom_assets.defs.requests.assets import request_report
from dicom_assets.defs.requests.sensors import request_file_changed
from dicom_assets.defs.resources import dicom_resource
from dicom_assets.defs.retrieval.assets import downloaded_series
from dicom_assets.defs.retrieval.schedules import retrieval_schedule

ALL_ASSETS = [patients, studies, series, downloaded_series, patient_archive, deidentified_archive, published_archive, validation_report, inventory, request_report]

defs = dg.Definitions(
    assets=ALL_ASSETS,
    asset_checks=[instance_counts_match, archive_intact, inventory_complete],
    jobs=[discover_patients_job, patient_pipeline_job, write_inventory_job],
    schedules=[discovery_schedule, retrieval_schedule, inventory_schedule],
    sensors=[new_patient_work, request_file_changed, patient_archive_outdated, deidentified_archive_outdated, heartbeat_start, heartbeat_success, heartbeat_fail],
    resources={"dicom": dicom_resource()},
    # Every run executes its steps in its own process, one after another. The steps of a
    # per-patient run depend on each other (only the archive, its de-identified copy and the
    # validation could overlap, and they are short); a process per step cost 5-12 s each on a
    # 2-core machine, about a minute per pipeline run before any work. Pools ("pacs") still hold.
    executor=dg.in_process_executor,
)
