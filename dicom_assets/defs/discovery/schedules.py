"""Discovery on a schedule (default daily): C-FIND patients and register new partitions."""

import dagster as dg

from dicom_assets.defs.jobs import discover_patients_job
from dicom_assets.defs.resources import schedule_settings

_settings = schedule_settings()

discovery_schedule = dg.ScheduleDefinition(
    name="discovery_schedule",
    job=discover_patients_job,
    cron_schedule=_settings.discovery,
    execution_timezone=_settings.timezone,
    default_status=dg.DefaultScheduleStatus.RUNNING,
)
