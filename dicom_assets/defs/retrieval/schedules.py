"""Retrieval on a schedule (default hourly): the per-patient pipeline over every patient.

The safety net: new work starts by itself (sensor ``new_patient_work``); this retries what a
run could not finish (the PACS was down, a series failed) and catches anything missed.

One run request per chunk of patients (a partition range), never one run per patient; the
state DB's claims make a run that overlaps another skip series already being fetched.
"""

import dagster as dg

from dicom_assets.defs.jobs import patient_pipeline_job
from dicom_assets.defs.partitions import PATIENTS_PARTITION_SET
from dicom_assets.defs.patient_runs import patient_range_requests
from dicom_assets.defs.resources import schedule_settings

_settings = schedule_settings()


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
