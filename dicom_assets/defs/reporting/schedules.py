"""The inventory on a schedule (default daily)."""

import dagster as dg

from dicom_assets.defs.jobs import write_inventory_job
from dicom_assets.defs.resources import schedule_settings

_settings = schedule_settings()

inventory_schedule = dg.ScheduleDefinition(
    name="inventory_schedule",
    job=write_inventory_job,
    cron_schedule=_settings.inventory,
    execution_timezone=_settings.timezone,
    default_status=dg.DefaultScheduleStatus.RUNNING,
)
