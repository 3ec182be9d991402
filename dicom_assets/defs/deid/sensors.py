"""Rebuild a patient's de-identified zip when their identifiable archive was rebuilt."""


import dagster as dg

from dicom_assets.defs.deid.assets import deidentified_archive
from dicom_assets.defs.resources import DicomAssetsResource

CHUNK = 500


@dg.sensor(asset_selection=[deidentified_archive], minimum_interval_seconds=60, default_status=dg.DefaultSensorStatus.RUNNING)
def deidentified_archive_outdated(context: dg.SensorEvaluationContext, dicom: DicomAssetsResource) -> dg.SensorResult:
    """Reads the state DB in chunks (cursor = last partition key seen), never the PACS. The run
    key names the identifiable archive, so each rebuild is asked for once, not once per tick."""
    if dicom.settings().deidentify is None:
        return dg.SensorResult(skip_reason="no deidentify: section in the config")
    candidates = dicom.store().deidentified_candidates(after_key=context.cursor or None, limit=CHUNK)
    cursor = candidates[-1].partition_key if len(candidates) == CHUNK else None
    requests = [dg.RunRequest(partition_key=c.partition_key, run_key=f"deid:{c.partition_key}:{c.archive_id}") for c in candidates]
    if not requests:
        return dg.SensorResult(skip_reason="every de-identified zip is made from its patient's latest archive", cursor=cursor)
    return dg.SensorResult(run_requests=requests, cursor=cursor)
