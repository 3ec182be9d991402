"""Archive asset: one verified ``<patient><delimiter><N>.zip`` per patient."""


import dagster as dg

from dicom_assets.archive import ArchiveNotReady, build_patient_archive
from dicom_assets.defs.partitions import per_patient_asset
from dicom_assets.defs.resources import DicomAssetsResource
from dicom_assets.defs.retrieval.assets import downloaded_series


@per_patient_asset(
    group_name="archive",
    kinds={"zip"},
    deps=[downloaded_series],
)
def patient_archive(context: dg.AssetExecutionContext, dicom: DicomAssetsResource) -> dg.MaterializeResult:
    """Zip each patient whose series are all complete; superseded zips go once the new one verifies."""
    settings = dicom.settings()
    built = up_to_date = not_ready = instances = size = removed = 0
    seconds = 0.0
    names: list[str] = []
    for pid in dicom.patient_ids(context.partition_keys):
        try:
            result = build_patient_archive(
                dicom.store(),
                settings.paths.download_dir,
                settings.paths.archive_dir,
                pid,
                delimiter=settings.archive.delimiter,
                keep_superseded=settings.archive.keep_superseded,
                compression_level=settings.archive.compression_level,
            )
        except ArchiveNotReady as exc:
            not_ready += 1
            context.log.warning(str(exc))
            continue
        names.append(result.file_name)
        if result.up_to_date:
            up_to_date += 1
            continue
        built += 1
        instances += result.instance_count
        size += result.bytes
        seconds += result.seconds
        removed += len(result.removed_superseded)
        context.log.info(f"{result.file_name}: {result.instance_count} instances, {result.bytes} bytes, {result.seconds:.1f}s")
    return dg.MaterializeResult(
        metadata={
            "archives_built": built,
            "archives_up_to_date": up_to_date,
            "patients_not_ready": not_ready,
            "instances": instances,
            "bytes": size,
            "seconds": round(seconds, 3),
            "mb_per_s": round(size / 1e6 / seconds, 3) if seconds > 0 else 0.0,
            "superseded_removed": removed,
            "archive_names": dg.MetadataValue.text(", ".join(names[:50]) + (" ..." if len(names) > 50 else "")),
        }
    )
