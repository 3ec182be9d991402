"""Notice an edited request file and run discovery for it.

The researcher's file changes by hand (rows added, a window widened). This sensor hashes the
file's bytes each minute and, when the hash differs from the one it last acted on (its cursor),
launches the discovery job once for that content (run key = the hash). Discovery then asks the
PACS only about rows that are new or changed (dicom_assets.request_resolution); rows removed
from the file stop being fetched, and nothing downloaded is deleted.
"""

import hashlib

import dagster as dg

from dicom_assets.defs.jobs import discover_patients_job
from dicom_assets.defs.resources import DicomAssetsResource


def file_sha256(path) -> str:  # type: ignore[no-untyped-def]
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@dg.sensor(job=discover_patients_job, minimum_interval_seconds=60, default_status=dg.DefaultSensorStatus.RUNNING)
def request_file_changed(context: dg.SensorEvaluationContext, dicom: DicomAssetsResource) -> dg.SensorResult:
    path = dicom.settings().selection.request_file
    if path is None:
        return dg.SensorResult(skip_reason="selection.request_file is not set")
    try:
        digest = file_sha256(path)
    except OSError as exc:
        return dg.SensorResult(skip_reason=f"cannot read the request file {path}: {exc}")
    if digest == context.cursor:
        return dg.SensorResult(skip_reason=f"{path.name} unchanged")
    context.log.info(f"{path.name} changed (sha256 {digest[:12]}): launching discovery")
    return dg.SensorResult(
        run_requests=[dg.RunRequest(run_key=f"request-file-{digest}", tags={"dicom_assets/request_file_sha256": digest})],
        cursor=digest,
    )
