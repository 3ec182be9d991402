"""Discovery assets: patients (unpartitioned), then studies and series per patient."""


import dagster as dg

from dicom_assets.defs.partitions import PACS_POOL, PATIENTS_PARTITION_SET, per_patient_asset
from dicom_assets.defs.resources import DicomAssetsResource
from dicom_assets.discovery import discover_patients, discover_series, discover_studies


@dg.asset(group_name="discovery", kinds={"dicom"}, pool=PACS_POOL)
def patients(context: dg.AssetExecutionContext, dicom: DicomAssetsResource) -> dg.MaterializeResult:
    """Every PACS patient accepted by the selection rule, with one partition registered each."""
    keys, stats = discover_patients(dicom.pacs(), dicom.store(), dicom.selection_rule())
    known = set(context.instance.get_dynamic_partitions(PATIENTS_PARTITION_SET))
    new = [k for k in keys if k not in known]
    if new:
        context.instance.add_dynamic_partitions(PATIENTS_PARTITION_SET, new)
    context.log.info(f"{stats.found} patients on the PACS, {stats.kept} selected, {len(new)} new partitions")
    for pid in stats.skipped:
        context.log.warning(f"skipped patient {pid!r} (see the log above for why)")
    return dg.MaterializeResult(metadata={**stats.metadata(), "partitions_added": len(new), "partitions_total": len(known) + len(new)})


@per_patient_asset(
    pool=PACS_POOL,
    group_name="discovery",
    kinds={"dicom"},
    deps=[patients],
)
def studies(context: dg.AssetExecutionContext, dicom: DicomAssetsResource) -> dg.MaterializeResult:
    """The patient's studies (keyed by StudyInstanceUID), one C-FIND per patient."""
    stats = discover_studies(dicom.pacs(), dicom.store(), dicom.patient_ids(context.partition_keys))
    context.log.info(f"{stats.found} studies for {len(context.partition_keys)} patient(s)")
    return dg.MaterializeResult(metadata={**stats.metadata(), "patients": len(context.partition_keys)})


@per_patient_asset(
    pool=PACS_POOL,
    group_name="discovery",
    kinds={"dicom"},
    deps=[studies],
)
def series(context: dg.AssetExecutionContext, dicom: DicomAssetsResource) -> dg.MaterializeResult:
    """The series of every known study of the patient, with the PACS's expected instance counts."""
    stats = discover_series(dicom.pacs(), dicom.store(), dicom.patient_ids(context.partition_keys))
    context.log.info(f"{stats.found} series, {stats.inserted} new, {stats.reset_to_pending} to fetch again")
    return dg.MaterializeResult(metadata={**stats.metadata(), "patients": len(context.partition_keys)})
