"""published_archive: each patient's verified zip copied to a second site (``publish:``)."""

import dagster as dg

from dicom_assets.defs.archive.assets import patient_archive
from dicom_assets.defs.deid.assets import deidentified_archive
from dicom_assets.defs.partitions import per_patient_asset
from dicom_assets.defs.resources import DicomAssetsResource
from dicom_assets.heartbeat import ping
from dicom_assets.publish import PublishError, destination_from_settings, publish_deidentified_archive, publish_patient_archive


@per_patient_asset(group_name="archive", kinds={"zip"}, deps=[patient_archive, deidentified_archive])
def published_archive(context: dg.AssetExecutionContext, dicom: DicomAssetsResource) -> dg.MaterializeResult:
    """Copy, verify (SHA-256) and rename each new zip at ``publish.directory`` or
    ``publish.rsync_target``; inactive unless one is set. ``publish.ship`` says which zips go:
    the identifiable ones (default), the de-identified ones only, or both."""
    settings = dicom.settings()
    destination = destination_from_settings(settings.publish)
    if destination is None:
        context.log.info("neither publish.directory nor publish.rsync_target is set: publishing is off")
        return dg.MaterializeResult(metadata={"configured": 0, "published": 0})
    heartbeat = settings.publish.heartbeat
    if heartbeat:
        ping(heartbeat, "start", body=context.run_id)
    copied = unchanged = size = removed = 0
    seconds = 0.0
    failures: list[str] = []
    ship = settings.publish.ship
    for pid in dicom.patient_ids(context.partition_keys):
        for kind in ("identifiable", "deidentified"):
            if ship not in (kind, "both"):
                continue
            try:
                if kind == "identifiable":
                    result = publish_patient_archive(dicom.store(), settings.paths.archive_dir, destination, pid, settings.archive.delimiter)
                else:
                    result = publish_deidentified_archive(
                        dicom.store(), settings.paths.deidentified_dir, destination, pid, settings.archive.delimiter
                    )
            except PublishError as exc:
                failures.append(str(exc))
                context.log.error(str(exc))
                continue
            if result is None:
                continue
            copied += result.copied
            unchanged += not result.copied
            size += result.bytes if result.copied else 0
            seconds += result.seconds
            removed += len(result.removed_superseded)
    if heartbeat:
        ping(heartbeat, "fail" if failures else "success", body=context.run_id)
    if failures:
        raise dg.Failure(f"{len(failures)} archive(s) not published; they are retried next run", metadata={
            "first_error": failures[0], "published": copied})
    return dg.MaterializeResult(metadata={
        "configured": 1, "destination": destination.name, "published": copied, "already_published": unchanged,
        "bytes": size,
        "seconds": round(seconds, 3), "mb_per_s": round(size / 1e6 / seconds, 3) if seconds > 0 else 0.0,
        "superseded_removed": removed,
    })
