"""Asset checks on the reports: every series of the patient has its expected instances on disk."""


import dagster as dg

from dicom_assets.defs.partitions import patient_partitions
from dicom_assets.defs.reporting.assets import inventory, validation_report
from dicom_assets.defs.resources import DicomAssetsResource
from dicom_assets.inventory import inventory_problems
from dicom_assets.validation import validate_patient


def checked_keys(context: dg.AssetCheckExecutionContext) -> list[str]:
    op_context = context.op_execution_context
    return [op_context.partition_key] if op_context.has_partition_key else list(op_context.partition_keys)


@dg.asset_check(asset=validation_report, partitions_def=patient_partitions, blocking=False)
def instance_counts_match(context: dg.AssetCheckExecutionContext, dicom: DicomAssetsResource) -> dg.AssetCheckResult:
    """Fails on any series whose files on disk differ from the PACS's count (unknown counts warn)."""
    settings = dicom.settings()
    keys = checked_keys(context)
    mismatched: list[str] = []
    unknown = checked = 0
    for pid in dicom.patient_ids(keys):
        for row in validate_patient(dicom.store(), settings.paths.download_dir, pid):
            checked += 1
            if row.outcome == "mismatch":
                mismatched.append(f"{pid}/{row.series_instance_uid}: {row.downloaded_instances} of {row.expected_instances}")
            elif row.outcome == "lossy_transcode":
                mismatched.append(f"{pid}/{row.series_instance_uid}: {row.lossy_transcoded_instances} instance(s) "
                                  f"lossy-compressed by the PACS from a lossless original")
            elif row.outcome == "unknown_expected":
                unknown += 1
    return dg.AssetCheckResult(
        passed=not mismatched,
        metadata={
            "series_checked": checked,
            "series_mismatched": len(mismatched),
            "series_unknown_expected": unknown,
            "mismatches": dg.MetadataValue.text("\n".join(mismatched[:100]) or "none"),
        },
        description=None if not mismatched else f"{len(mismatched)} series do not have their expected instances",
    )


@dg.asset_check(asset=inventory, blocking=False)
def inventory_complete(dicom: DicomAssetsResource) -> dg.AssetCheckResult:
    """Every series of the state DB appears exactly once in inventory.csv."""
    rows, problems = inventory_problems(dicom.store(), dicom.settings().paths.report_dir / "inventory.csv")
    return dg.AssetCheckResult(
        passed=not problems,
        metadata={"rows": rows, "problems": dg.MetadataValue.text("\n".join(problems) or "none")},
    )
