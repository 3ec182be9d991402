"""Rebuild a patient's archive when its series count differs from its latest archive's."""


import dagster as dg

from dicom_assets.defs.archive.assets import patient_archive
from dicom_assets.defs.heartbeats.sensors import ARCHIVE_TAG
from dicom_assets.defs.partitions import PATIENTS_PARTITION_SET
from dicom_assets.defs.patient_runs import partitions_in_live_runs
from dicom_assets.defs.resources import DicomAssetsResource

CHUNK = 500


@dg.sensor(
    asset_selection=[patient_archive],
    minimum_interval_seconds=60,
    default_status=dg.DefaultSensorStatus.RUNNING,
)
def patient_archive_outdated(context: dg.SensorEvaluationContext, dicom: DicomAssetsResource) -> dg.SensorResult:
    """Reads the state DB in chunks (cursor = last partition key seen); never queries the PACS.

    The run key includes the series count and the latest archive, so a patient is requested once
    per change, not once per tick. A patient that a queued or running run covers is left for
    later: that run's own ``patient_archive`` step (or the next tick) builds the zip.
    """
    candidates = dicom.store().archive_candidates(after_key=context.cursor or None, limit=CHUNK)
    cursor = candidates[-1].partition_key if len(candidates) == CHUNK else None
    if candidates:
        held = partitions_in_live_runs(context.instance, context.instance.get_dynamic_partitions(PATIENTS_PARTITION_SET))
        candidates = [c for c in candidates if c.partition_key not in held]
    requests = [
        dg.RunRequest(
            partition_key=c.partition_key,
            run_key=f"{c.partition_key}:{c.series_count}:{c.archived_series_count}",
            tags={ARCHIVE_TAG: f"series count {c.archived_series_count} -> {c.series_count}"},
        )
        for c in candidates
    ]
    if not requests:
        return dg.SensorResult(skip_reason="every archive matches its patient's series count", cursor=cursor)
    return dg.SensorResult(run_requests=requests, cursor=cursor)
