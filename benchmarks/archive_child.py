"""The archiving of ``benchmarks/large_instance.py``, alone in a process so its peak RSS is its own.

    python -m benchmarks.archive_child DATABASE_URL DOWNLOAD_DIR ARCHIVE_DIR PATIENT_ID OUT.json

Runs ``build_patient_archive`` (level 6) for the patient, whose series the caller recorded as
complete in the state DB, and writes its figures to OUT.json, among them ``VmHWM`` (the peak RSS
since exec, so not the parent's) and ``VmRSS`` just before archiving (imports: Dagster, SQLAlchemy).
Imports only what the archive step does in production.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from dicom_assets.archive import build_patient_archive
from dicom_assets.store import StateStore


def _status_bytes(field: str) -> int:
    """A ``/proc/self/status`` memory field (kB there) in bytes."""
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith(field + ":"))


def main(argv: list[str]) -> int:
    database_url, download_dir, archive_dir, patient_id, out = argv
    store = StateStore(database_url)
    try:
        rss_before = _status_bytes("VmRSS")
        result = build_patient_archive(store, Path(download_dir), Path(archive_dir), patient_id, compression_level=6)
        peak = _status_bytes("VmHWM")
    finally:
        store.dispose()
    Path(out).write_text(json.dumps({
        "path": str(result.path), "bytes": result.bytes, "seconds": result.seconds, "sha256": result.sha256,
        "instances": result.instance_count, "rss_before_bytes": rss_before, "vm_hwm_bytes": peak,
    }, indent=1))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
