"""Register partitions for patients that are in the state DB but not yet in Dagster, and ask
for their per-patient pipeline runs, a chunk of patients per run.

The ``patients`` asset registers partitions itself; this sensor covers patients stored by any
other path (another deployment's discovery, a crashed run between upsert and registration). It
reads only the state DB and the instance, never the PACS, so a tick over 20,000 patients takes
well under Dagster's 60 s limit (measured in dicom_assets_tests/test_sensors.py).
"""

import dagster as dg

from dicom_assets.defs.jobs import patient_pipeline_job
from dicom_assets.defs.partitions import PATIENTS_PARTITION_SET, patient_partitions
from dicom_assets.defs.resources import DicomAssetsResource
from dicom_assets.defs.retrieval.schedules import patient_range_requests

MAX_NEW_PER_TICK = 5_000  # later ticks take the rest


@dg.sensor(job=patient_pipeline_job, minimum_interval_seconds=120, default_status=dg.DefaultSensorStatus.RUNNING)
def new_patients(context: dg.SensorEvaluationContext, dicom: DicomAssetsResource) -> dg.SensorResult:
    known = set(context.instance.get_dynamic_partitions(PATIENTS_PARTITION_SET))
    new = [key for key in dicom.store().all_partition_keys() if key not in known][:MAX_NEW_PER_TICK]
    if not new:
        return dg.SensorResult(skip_reason="every patient in the state DB has its partition")
    context.log.info(f"{len(new)} new patient partition(s)")
    return dg.SensorResult(
        dynamic_partitions_requests=[patient_partitions.build_add_request(new)],
        run_requests=patient_range_requests(new),
    )
