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
from dicom_assets.request_resolution import discover_requested, request_series_skip

#: Run tag forcing a full discovery pass (every StudyDate): ``dicom-assets sync --full-discovery``.
FULL_DISCOVERY_TAG = "dicom_assets/full_discovery"


@dg.asset(group_name="discovery", kinds={"dicom"}, pool=PACS_POOL)
def patients(context: dg.AssetExecutionContext, dicom: DicomAssetsResource) -> dg.MaterializeResult:
    """Every PACS patient accepted by the selection rule (one partition registered each), and
    the studies of the discovery pass's date windows; with a request file, the patients and
    studies its rows name (each row resolved by C-FIND, see dicom_assets.request_resolution)."""
    force_full = context.run.tags.get(FULL_DISCOVERY_TAG, "").strip().lower() == "true"
    request = dicom.request_file()
    if request is not None:
        keys, stats = discover_requested(
            dicom.pacs(), dicom.store(), request, dicom.selection_rule(), dicom.selection_rule_name(),
            dicom.settings().discovery, force_full,
        )  # fmt: skip
        context.log.info(
            f"{'full' if stats.full_pass else 'incremental'} pass over request file {request.path.name}: {stats.rows} rows "
            f"({stats.rows_new} new, {stats.rows_removed} removed), {stats.rows_resolved} asked about: {stats.found} found, "
            f"{stats.not_found} not found, {stats.ambiguous} ambiguous, {stats.rejected} refused by the patient rule; "
            f"{stats.kept} patient(s), {stats.requests} PACS requests"
        )
    else:
        keys, stats = discover_pass(dicom.pacs(), dicom.store(), dicom.selection_rule(), dicom.settings().discovery, force_full)
        context.log.info(
            f"{'full' if stats.full_pass else 'incremental'} pass: {stats.found} patients on the PACS, {stats.kept} selected, "
            f"{stats.studies_found} studies in {stats.windows} date window(s), {stats.series_to_check} to check for series, "
            f"{stats.patients_to_check} patient(s) to ask for studies, {stats.requests} PACS requests"
        )
    known = set(context.instance.get_dynamic_partitions(PATIENTS_PARTITION_SET))
    new = [k for k in keys if k not in known]
    if new:
        context.log.info(f"registering {len(new)} new patient partition(s)")
        context.instance.add_dynamic_partitions(PATIENTS_PARTITION_SET, new)
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
    pass could not account for (new, or changed below an old study), none for the others. With a
    request file the rows name the studies: none is asked for here (that would add studies of
    the patient that nobody requested)."""
    patient_ids = dicom.patient_ids(context.partition_keys)
    dicom.store().mark_pipeline_started(patient_ids)  # the work marked so far is this run's (sensor new_patient_work)
    if dicom.settings().selection.request_file is not None:
        context.log.info("studies come from the request file's rows (the patients asset); nothing to ask here")
        return dg.MaterializeResult(metadata={"pacs_requests": 0, "patients": len(context.partition_keys), "patients_queried": 0})
    stats = discover_studies(dicom.pacs(), dicom.store(), patient_ids, _manual_refresh(context))
    context.log.info(f"{stats.studies_known} studies of {len(context.partition_keys)} patient(s); {stats.patients_queried} asked for")
    return dg.MaterializeResult(metadata={**stats.metadata(), "patients": len(context.partition_keys)})


@per_patient_asset(
    pool=PACS_POOL,
    group_name="discovery",
    kinds={"dicom"},
    deps=[studies],
)
def series(context: dg.AssetExecutionContext, dicom: DicomAssetsResource) -> dg.MaterializeResult:
    """The series of the patients' new or changed studies, with the PACS's expected instance counts;
    then the series selection (``selection.series``) over every series of these patients: the
    unwanted ones are ``skipped`` with the rule that skipped them, the wanted ones fetched."""
    from dicom_assets.series_filter import SeriesFilter
    from dicom_assets.series_selection import apply_series_selection

    patient_ids = dicom.patient_ids(context.partition_keys)
    pacs = dicom.pacs()
    stats = discover_series(pacs, dicom.store(), patient_ids, _manual_refresh(context))
    context.log.info(
        f"{stats.studies_queried} studies asked for series: {stats.found} series, {stats.inserted} new, "
        f"{stats.reset_to_pending} to fetch again"
    )
    request_skip = request_series_skip(dicom.store(), patient_ids) if dicom.settings().selection.request_file else None
    selection = apply_series_selection(
        dicom.store(), pacs, patient_ids, SeriesFilter(dicom.settings().selection.series), request_skip=request_skip
    )
    for reason, n in selection.reasons.most_common(20):
        context.log.info(f"{n} series skipped: {reason}")
    if selection.series_unskipped:
        context.log.info(f"{selection.series_unskipped} series no longer skipped: fetched by this run")
    return dg.MaterializeResult(
        metadata={**stats.metadata(), **selection.metadata(), "patients": len(context.partition_keys)}
    )
