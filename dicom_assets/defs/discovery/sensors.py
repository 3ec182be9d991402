"""New work flows by itself: the per-patient pipeline for every patient with work no run has seen.

Discovery, by whatever path it ran (the nightly schedule, the UI, ``dagster job launch``, the
request-file sensor, another worker), leaves what it found in the state DB: a new patient, a
study or series count that changed, a series to fetch. Each tick this sensor

* registers a partition for every patient in the state DB that Dagster lacks (the ``patients``
  asset registers its own; this covers another deployment's discovery, or a run that died
  between storing and registering), and
* asks for pipeline runs, in ranges of at most 200 partitions, for the patients whose newest
  mark of work is later than the start of their last pipeline run
  (:meth:`~dicom_assets.store.StateStore.patients_with_unseen_work`), leaving out patients that
  a queued or running run already covers.

So a change is asked for once: the run stamps its patients when it starts, and what it could not
finish (the PACS down) waits for the hourly ``retrieval_schedule``, the safety net, rather than
being asked for on every tick. It looks every ``schedules.new_work_check_s`` (30 s) and reads only
the state DB and the instance, never the PACS: a tick over 20,000 patients takes well under
Dagster's 60 s limit (dicom_assets_tests/test_sensors.py).
"""

import dagster as dg

from dicom_assets.defs.jobs import patient_pipeline_job
from dicom_assets.defs.partitions import PATIENTS_PARTITION_SET, patient_partitions
from dicom_assets.defs.patient_runs import partitions_in_live_runs, range_tags, ranges_covering
from dicom_assets.defs.resources import DicomAssetsResource, schedule_settings

MAX_NEW_PER_TICK = 5_000  # partitions registered per tick; later ticks take the rest
MAX_WORK_PER_TICK = 50_000  # patients with unseen work read per tick
WORK_TAG = "dicom_assets/new_work"


@dg.sensor(job=patient_pipeline_job, minimum_interval_seconds=schedule_settings().new_work_check_s, default_status=dg.DefaultSensorStatus.RUNNING)
def new_patient_work(context: dg.SensorEvaluationContext, dicom: DicomAssetsResource) -> dg.SensorResult:
    store = dicom.store()
    known = list(context.instance.get_dynamic_partitions(PATIENTS_PARTITION_SET))
    registered = set(known)
    new = [key for key in store.all_partition_keys() if key not in registered][:MAX_NEW_PER_TICK]
    order = known + new
    work = store.patients_with_unseen_work(limit=MAX_WORK_PER_TICK)
    held = partitions_in_live_runs(context.instance, order) if work else set()
    marked = {w.partition_key: w.marked_at for w in work if w.partition_key not in held}
    position = {key: i for i, key in enumerate(order)}
    requests = []
    for start, end in ranges_covering(order, marked):
        keys = [k for k in order[position[start] : position[end] + 1] if k in marked]
        newest = max(marked[k] for k in keys)
        requests.append(
            dg.RunRequest(
                run_key=f"work:{start}..{end}@{newest.isoformat()}",
                tags={**range_tags(start, end), WORK_TAG: f"{len(keys)} patient(s), newest mark {newest.isoformat()}"},
            )
        )
    if new:
        context.log.info(f"{len(new)} new patient partition(s)")
    if requests:
        context.log.info(f"{len(marked)} patient(s) with new work in {len(requests)} run(s); {len(held)} held by live runs")
    if not new and not requests:
        reason = "no patient has work that no run has seen" if not work else f"{len(work)} patient(s) with work, all in live runs"
        return dg.SensorResult(skip_reason=reason)
    return dg.SensorResult(
        dynamic_partitions_requests=[patient_partitions.build_add_request(new)] if new else [],
        run_requests=requests,
    )
