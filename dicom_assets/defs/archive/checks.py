"""Asset check on the archives: each patient's latest zip is on disk, unchanged since verified."""

import dagster as dg

from dicom_assets.archive import archive_problems
from dicom_assets.defs.archive.assets import patient_archive
from dicom_assets.defs.partitions import patient_partitions
from dicom_assets.defs.reporting.checks import checked_keys
from dicom_assets.defs.resources import DicomAssetsResource


@dg.asset_check(asset=patient_archive, partitions_def=patient_partitions, blocking=False)
def archive_intact(context: dg.AssetCheckExecutionContext, dicom: DicomAssetsResource) -> dg.AssetCheckResult:
    """Fails when a patient's latest recorded zip is missing, resized or altered."""
    store, archive_dir = dicom.store(), dicom.settings().paths.archive_dir
    problems: list[str] = []
    checked = unarchived = 0
    for pid in dicom.patient_ids(checked_keys(context)):
        record = store.latest_archive(pid)
        if record is None:
            unarchived += 1
            continue
        checked += 1
        problems += archive_problems(archive_dir, record)
    return dg.AssetCheckResult(
        passed=not problems,
        metadata={"archives_checked": checked, "patients_without_archive": unarchived, "problems": len(problems),
                  "details": dg.MetadataValue.text("\n".join(problems[:100]) or "none")},
    )
