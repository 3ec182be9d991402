"""The request report: one answer per row of the researcher's request file (``selection.request_file``)."""

import dagster as dg

from dicom_assets.defs.archive.assets import patient_archive
from dicom_assets.defs.reporting.assets import validation_report
from dicom_assets.defs.resources import DicomAssetsResource
from dicom_assets.request_report import REQUEST_REPORT_NAME, build_request_report, write_request_report


@dg.asset(group_name="reporting", kinds={"csv"}, deps=[patient_archive, validation_report])
def request_report(context: dg.AssetExecutionContext, dicom: DicomAssetsResource) -> dg.MaterializeResult:
    """``report_dir/request_report.csv``: every row of the request file in its order, with its own
    columns, the studies and series it matched, what was retrieved, a status and a reason.

    Reads the file and the state DB only (no PACS request), so it materializes alone at any time.
    """
    request = dicom.request_file()
    if request is None:
        context.log.info("selection.request_file is not set: there is no request to answer")
        return dg.MaterializeResult(metadata={"rows": 0})
    path = dicom.settings().paths.report_dir / REQUEST_REPORT_NAME
    report = build_request_report(dicom.store(), request, path)
    write_request_report(report, request)
    context.log.info(
        f"request report: {len(report.rows)} rows -> {path}; "
        + ", ".join(f"{n} {status}" for status, n in report.by_status.items() if n)
    )
    return dg.MaterializeResult(
        metadata={
            **report.metadata(),
            "path": dg.MetadataValue.path(str(path)),
            "summary": dg.MetadataValue.md(report.summary_markdown()),
        }
    )
