"""The inventory: one CSV row per series with its patient, study, download state and archive.

Streamed from the state DB in chunks (StateStore.iter_inventory), so a million series never sit
in memory at once; written to a hidden temp file and renamed, so readers never see half a file.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from dicom_assets import layout
from dicom_assets.store.state import StateStore
from dicom_assets.store.tables import SERIES_STATUSES

INVENTORY_COLUMNS: tuple[str, ...] = (
    "patient_id",
    "partition_key",
    "patient_name",
    "patient_sex",
    "patient_birth_date",
    "study_instance_uid",
    "study_id",
    "study_date",
    "study_time",
    "accession_number",
    "study_description",
    "modalities_in_study",
    "series_instance_uid",
    "series_number",
    "modality",
    "series_description",
    "body_part_examined",
    "institution_name",
    "series_date",
    "series_time",
    "expected_instances",
    "downloaded_instances",
    "downloaded_bytes",
    "download_status",
    "attempts",
    "last_error",
    "downloaded_at",
    "archive_name",
)


@dataclass(frozen=True)
class InventoryStats:
    """What was written: ``rows`` series of ``patients`` patients in ``studies`` studies,
    ``bytes`` = sum of downloaded_bytes, ``by_status`` = series per download_status (every
    status, zeros included)."""

    path: Path
    rows: int
    patients: int
    studies: int
    bytes: int
    seconds: float
    by_status: dict[str, int]


def write_inventory(store: StateStore, path: Path, chunk_rows: int = 50_000) -> InventoryStats:
    """Stream store.iter_inventory chunks to CSV at a temp name next to ``path``, then rename.

    Creates parent directories. With no series the file holds just the header. Patients and
    studies are counted from the ordered stream (a study's rows are contiguous), in O(1) memory.
    """
    started = time.monotonic()
    path = Path(path)
    rows = patients = studies = total_bytes = 0
    by_status: dict[str, int] = dict.fromkeys(SERIES_STATUSES, 0)
    last_patient: object = object()
    last_study: object = object()
    with layout.atomic_file(path, newline="", encoding="utf-8") as f:
        f.write(",".join(INVENTORY_COLUMNS) + "\n")
        for frame in store.iter_inventory(chunk_rows=chunk_rows):
            if tuple(frame.columns) != INVENTORY_COLUMNS:
                raise RuntimeError(f"inventory query returned columns {list(frame.columns)}")
            frame.to_csv(f, header=False, index=False, lineterminator="\n")
            rows += len(frame)
            total_bytes += int(frame["downloaded_bytes"].sum())
            for status, n in frame["download_status"].value_counts().items():
                by_status[status] = by_status.get(status, 0) + int(n)
            for patient_id, study_uid in zip(frame["patient_id"], frame["study_instance_uid"]):
                if patient_id != last_patient:
                    patients += 1
                    last_patient = patient_id
                if study_uid != last_study:
                    studies += 1
                    last_study = study_uid
    return InventoryStats(
        path=path,
        rows=rows,
        patients=patients,
        studies=studies,
        bytes=total_bytes,
        seconds=time.monotonic() - started,
        by_status=by_status,
    )
