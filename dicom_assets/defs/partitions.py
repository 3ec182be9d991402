"""One dynamic partition per selected patient; the key is ``layout.patient_key(PatientID)``."""

import dagster as dg

PATIENTS_PARTITION_SET = "patients"
patient_partitions = dg.DynamicPartitionsDefinition(name=PATIENTS_PARTITION_SET)

#: Many patients in one run: a backfill over thousands of partitions must not become thousands of runs.
patients_backfill_policy = dg.BackfillPolicy.multi_run(max_partitions_per_run=200)


#: The concurrency pool of every step that talks to the PACS (limited in dagster.yaml).
PACS_POOL = "pacs"


def per_patient_asset(**kwargs):  # type: ignore[no-untyped-def]
    """``@dg.asset`` partitioned per patient, many patients per run (see the backfill policy)."""
    return dg.asset(partitions_def=patient_partitions, backfill_policy=patients_backfill_policy, **kwargs)
