"""Discovery assets: patients (unpartitioned: the discovery pass), then studies and series per patient.

``patients`` runs one pass of :func:`dicom_assets.discovery.discover_pass`: the patient C-FIND
and the date-window study C-FINDs, incremental unless a full pass is due or the run carries the
tag ``dicom_assets/full_discovery=true``. ``studies`` and ``series`` then ask the PACS only about
what the pass marked outdated. A run of one single patient partition (materializing one patient
from the UI or the CLI) is a manual refresh: it asks about every study and series of that
patient. Runs over partition ranges (sync, the retrieval schedule, the new-patients sensor,
backfills) rely on the pass.
"""


import dagster as dg

from dicom_assets.defs.partitions import PACS_POOL, PATIENTS_PARTITION_SET, per_patient_asset
from dicom_assets.defs.resources import DicomAssetsResource
from dicom_assets.discovery import discover_pass, discover_series, discover_studies

#: Run tag forcing a full discovery pass (every StudyDate): ``dicom-assets sync --full-discovery``.
FULL_DISCOVERY_TAG = "dicom_assets/full_discovery"


@dg.asset(group_name="discovery", kinds={"dicom"}, pool=PACS_POOL)
def patients(context: dg.AssetExecutionContext, dicom: DicomAssetsResource) -> dg.MaterializeResult:
    """Every PACS patient accepted by the selection rule (one partition registered each), and
    the studies of the discovery pass's date windows."""
    force_full = context.run.tags.get(FULL_DISCOVERY_TAG, "").strip().lower() == "true"
    keys, stats = discover_pass(dicom.pacs(), dicom.store(), dicom.selection_rule(), dicom.settings().discovery, force_full)
    known = set(context.instance.get_dynamic_partitions(PATIENTS_PARTITION_SET))
    new = [k for k in keys if k not in known]
    if new:
        context.log.info(f"registering {len(new)} new patient partition(s)")
        context.instance.add_dynamic_partitions(PATIENTS_PARTITION_SET, new)
    context.log.info(
        f"{'full' if stats.full_pass else 'incremental'} pass: {stats.found} patients on the PACS, {stats.kept} selected, "
        f"{stats.studies_found} studies in {stats.windows} date window(s), {stats.series_to_check} to check for series, "
        f"{stats.patients_to_check} patient(s) to ask for studies, {stats.requests} PACS requests"
    )
    for pid in stats.skipped:
        context.log.warning(f"skipped {pid!r} (see the log above for why)")
    return dg.MaterializeResult(metadata={**stats.metadata(), "partitions_added": len(new), "partitions_total": len(known) + len(new)})


def _manual_refresh(context: dg.AssetExecutionContext) -> bool:
    """A run of one single partition (no partition range): someone asked about this patient."""
    return not context.has_partition_key_range


@per_patient_asset(
    pool=PACS_POOL,
    group_name="discovery",
    kinds={"dicom"},
    deps=[patients],
)
def studies(context: dg.AssetExecutionContext, dicom: DicomAssetsResource) -> dg.MaterializeResult:
    """The patients' studies (keyed by StudyInstanceUID): one C-FIND per patient the discovery
    pass could not account for (new, or changed below an old study), none for the others."""
    stats = discover_studies(dicom.pacs(), dicom.store(), dicom.patient_ids(context.partition_keys), _manual_refresh(context))
    context.log.info(f"{stats.studies_known} studies of {len(context.partition_keys)} patient(s); {stats.patients_queried} asked for")
    return dg.MaterializeResult(metadata={**stats.metadata(), "patients": len(context.partition_keys)})


@per_patient_asset(
    pool=PACS_POOL,
    group_name="discovery",
    kinds={"dicom"},
    deps=[studies],
)
def series(context: dg.AssetExecutionContext, dicom: DicomAssetsResource) -> dg.MaterializeResult:
    """The series of the patients' new or changed studies, with the PACS's expected instance counts."""
    stats = discover_series(dicom.pacs(), dicom.store(), dicom.patient_ids(context.partition_keys), _manual_refresh(context))
    context.log.info(
        f"{stats.studies_queried} studies asked for series: {stats.found} series, {stats.inserted} new, "
        f"{stats.reset_to_pending} to fetch again"
    )
    return dg.MaterializeResult(metadata={**stats.metadata(), "patients": len(context.partition_keys)})
