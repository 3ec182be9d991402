"""De-identified copies: one verified ``<pseudonym><delimiter><N>.zip`` per patient (``deidentify:``)."""


import dagster as dg

from dicom_assets.defs.archive.assets import patient_archive
from dicom_assets.defs.partitions import per_patient_asset
from dicom_assets.defs.resources import DicomAssetsResource
from dicom_assets.deid.pipeline import DeidNotReady, build_deidentified_archive


@per_patient_asset(group_name="archive", kinds={"zip"}, deps=[patient_archive])
def deidentified_archive(context: dg.AssetExecutionContext, dicom: DicomAssetsResource) -> dg.MaterializeResult:
    """The patient's identifiable archive through the confidentiality profile (pseudonym, new
    UIDs, shifted dates, pixels as stored), zipped and verified; series that may carry burned-in
    text are left out (reason in the inventory). Nothing is done without a ``deidentify:`` section."""
    settings = dicom.settings()
    if settings.deidentify is None:
        context.log.info("no deidentify: section in the config: no de-identified copies")
        return dg.MaterializeResult(metadata={"enabled": 0, "patients": len(context.partition_keys)})
    built = up_to_date = not_ready = instances = bytes_in = size = excluded = 0
    seconds = 0.0
    for pid in dicom.patient_ids(context.partition_keys):
        try:
            result = build_deidentified_archive(dicom.store(), settings, pid)
        except DeidNotReady as exc:
            not_ready += 1
            context.log.warning(str(exc))
            continue
        if result.up_to_date:
            up_to_date += 1
            continue
        built += 1
        instances += result.instance_count
        bytes_in += result.bytes_in
        size += result.bytes
        seconds += result.seconds
        excluded += result.excluded_series
        for uid, reason in result.excluded.items():
            context.log.info(f"{result.pseudonym}: series left out of the de-identified copy ({reason})")
        context.log.info(f"{result.file_name or '(nothing shared)'}: {result.instance_count} instances in {result.seconds:.1f} s")
    return dg.MaterializeResult(
        metadata={
            "enabled": 1,
            "archives_built": built,
            "archives_up_to_date": up_to_date,
            "patients_not_ready": not_ready,
            "instances": instances,
            "series_excluded": excluded,
            "bytes_read": bytes_in,
            "bytes": size,
            "seconds": round(seconds, 3),
            "instances_per_s": round(instances / seconds, 1) if seconds > 0 else 0.0,
            "mb_per_s": round(bytes_in / 1e6 / seconds, 3) if seconds > 0 else 0.0,
        }
    )
