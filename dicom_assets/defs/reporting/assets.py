"""Reporting assets: per-patient validation report and the all-patients inventory CSV."""


import dagster as dg

from dicom_assets.defs.archive.assets import patient_archive
from dicom_assets.defs.partitions import per_patient_asset
from dicom_assets.defs.resources import DicomAssetsResource
from dicom_assets.defs.retrieval.assets import downloaded_series
from dicom_assets.inventory import write_inventory
from dicom_assets.layout import patient_key
from dicom_assets.validation import OUTCOMES, validate_patient, write_validation_csv


@per_patient_asset(
    group_name="reporting",
    kinds={"csv"},
    deps=[downloaded_series],
)
def validation_report(context: dg.AssetExecutionContext, dicom: DicomAssetsResource) -> dg.MaterializeResult:
    """Expected vs downloaded instance counts per series, as ``report_dir/validation/<patient>.csv``."""
    settings = dicom.settings()
    counts = dict.fromkeys(OUTCOMES, 0)
    for pid in dicom.patient_ids(context.partition_keys):
        rows = validate_patient(dicom.store(), settings.paths.download_dir, pid)
        write_validation_csv(rows, settings.paths.report_dir / "validation" / f"{patient_key(pid)}.csv")
        for row in rows:
            counts[row.outcome] += 1
            if row.outcome not in ("ok", "skipped"):
                context.log.warning(
                    f"{pid!r} series {row.series_instance_uid}: {row.outcome}, expected "
                    f"{row.expected_instances}, on disk {row.downloaded_instances}"
                )
    return dg.MaterializeResult(
        metadata={f"series_{k}": v for k, v in counts.items()} | {"patients": len(context.partition_keys)}
    )


@dg.asset(group_name="reporting", kinds={"csv"}, deps=[patient_archive, validation_report])
def inventory(context: dg.AssetExecutionContext, dicom: DicomAssetsResource) -> dg.MaterializeResult:
    """One CSV row per series with its study, patient, download status, counts and archive name.

    Reads the state DB (upstreams are dependencies, not loaded inputs), so it materializes alone.
    """
    settings = dicom.settings()
    stats = write_inventory(dicom.store(), settings.paths.report_dir / "inventory.csv")
    context.log.info(f"inventory: {stats.rows} series of {stats.patients} patients -> {stats.path}")
    return dg.MaterializeResult(
        metadata={
            "path": dg.MetadataValue.path(str(stats.path)),
            "rows": stats.rows,
            "patients": stats.patients,
            "studies": stats.studies,
            "bytes": stats.bytes,
            "seconds": round(stats.seconds, 3),
            **{f"series_{k}": v for k, v in stats.by_status.items()},
            "summary": dg.MetadataValue.md(stats.summary_markdown()),
        }
    )
