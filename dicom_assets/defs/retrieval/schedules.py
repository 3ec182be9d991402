"""Retrieval on a schedule (default hourly): the per-patient pipeline over every patient.

One run request per chunk of patients (a partition range), never one run per patient; the
state DB's claims make a run that overlaps another skip series already being fetched.
"""

import dagster as dg

from dicom_assets.defs.jobs import patient_pipeline_job
from dicom_assets.defs.partitions import PATIENTS_PARTITION_SET
from dicom_assets.defs.resources import schedule_settings

PATIENTS_PER_RUN = 200
_settings = schedule_settings()


def patient_range_requests(keys: list[str], chunk: int = PATIENTS_PER_RUN) -> list[dg.RunRequest]:
    """Run requests covering ``keys`` (in partition order) in ranges of at most ``chunk``."""
    return [
        dg.RunRequest(
            tags={
                "dagster/asset_partition_range_start": keys[i],
                "dagster/asset_partition_range_end": keys[min(i + chunk, len(keys)) - 1],
            }
        )
        for i in range(0, len(keys), chunk)
    ]


@dg.schedule(
    name="retrieval_schedule",
    job=patient_pipeline_job,
    cron_schedule=_settings.retrieval,
    execution_timezone=_settings.timezone,
    default_status=dg.DefaultScheduleStatus.RUNNING,
)
def retrieval_schedule(context: dg.ScheduleEvaluationContext):
    keys = list(context.instance.get_dynamic_partitions(PATIENTS_PARTITION_SET))
    if not keys:
        return dg.SkipReason("no patient partitions yet: discovery has not run")
    return patient_range_requests(keys)
