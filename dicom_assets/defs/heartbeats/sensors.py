"""Run status sensors that ping the configured heartbeat URLs (``heartbeats:`` in the config).

They run in the Dagster daemon, for every run of this code location (runs of ``dicom-assets
sync`` included, since they are stored on the same instance): ``/start`` when a run starts,
the plain URL on success, ``/fail`` on failure.
"""

import dagster as dg

from dicom_assets.defs.resources import DicomAssetsResource
from dicom_assets.heartbeat import Signal, ping

#: Which check a job's runs report to; archive-sensor runs carry the tag below.
CHECK_OF_JOB = {"discover_patients": "discovery", "patient_pipeline": "retrieval", "write_inventory": "inventory"}
ARCHIVE_TAG = "dicom_assets/reason"


def check_of_run(run: dg.DagsterRun) -> str | None:
    if ARCHIVE_TAG in run.tags:
        return "archive"
    return CHECK_OF_JOB.get(run.job_name)


def _notify(context: dg.RunStatusSensorContext, dicom: DicomAssetsResource, signal: Signal) -> dg.SkipReason | None:
    check = check_of_run(context.dagster_run)
    url = getattr(dicom.settings().heartbeats, check) if check else None
    if not url:
        return dg.SkipReason(f"no heartbeat configured for job {context.dagster_run.job_name}")
    ping(url, signal, body=f"{context.dagster_run.job_name} run {context.dagster_run.run_id}")
    return None


@dg.run_status_sensor(run_status=dg.DagsterRunStatus.STARTED, name="heartbeat_start", default_status=dg.DefaultSensorStatus.RUNNING)
def heartbeat_start(context: dg.RunStatusSensorContext, dicom: DicomAssetsResource):
    return _notify(context, dicom, "start")


@dg.run_status_sensor(run_status=dg.DagsterRunStatus.SUCCESS, name="heartbeat_success", default_status=dg.DefaultSensorStatus.RUNNING)
def heartbeat_success(context: dg.RunStatusSensorContext, dicom: DicomAssetsResource):
    return _notify(context, dicom, "success")


@dg.run_status_sensor(run_status=dg.DagsterRunStatus.FAILURE, name="heartbeat_fail", default_status=dg.DefaultSensorStatus.RUNNING)
def heartbeat_fail(context: dg.RunStatusSensorContext, dicom: DicomAssetsResource):
    return _notify(context, dicom, "fail")
