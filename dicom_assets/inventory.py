"""The inventory: one CSV row per series with its patient, study, download state and archive.

Streamed from the state DB in chunks (StateStore.iter_inventory), so a million series never sit
in memory at once; written to a hidden temp file and renamed, so readers never see half a file.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
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
    by_status_modality: dict[tuple[str, str], int] = field(default_factory=dict)
    bytes_by_month: dict[str, int] = field(default_factory=dict)

    def summary_markdown(self) -> str:
        """Series by status and modality, and bytes by study month, as Markdown tables (for the UI)."""
        modalities = sorted({m for _, m in self.by_status_modality})
        statuses = [s for s in self.by_status if any(self.by_status_modality.get((s, m)) for m in modalities)]
        lines = ["**Series by status and modality**", "", "| status | " + " | ".join(modalities) + " |",
                 "|---|" + "---|" * len(modalities)]
        for status in statuses:
            cells = [str(self.by_status_modality.get((status, m), 0)) for m in modalities]
            lines.append(f"| {status} | " + " | ".join(cells) + " |")
        lines += ["", "**Downloaded MB by study month**", "", "| month | MB |", "|---|---|"]
        for month, size in sorted(self.bytes_by_month.items()):
            lines.append(f"| {month} | {size / 1e6:.1f} |")
        return "\n".join(lines)


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
    by_status_modality: dict[tuple[str, str], int] = {}
    bytes_by_month: dict[str, int] = {}
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
            _add_summaries(frame, by_status_modality, bytes_by_month)
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
        by_status_modality=by_status_modality,
        bytes_by_month=bytes_by_month,
    )


def _add_summaries(frame, by_status_modality: dict[tuple[str, str], int], bytes_by_month: dict[str, int]) -> None:  # type: ignore[no-untyped-def]
    """Fold one chunk into the running summaries (a few dozen keys, whatever the row count)."""
    modality = frame["modality"].fillna("?").astype(str)
    for (status, mod), n in frame.groupby([frame["download_status"], modality]).size().items():
        by_status_modality[(status, mod)] = by_status_modality.get((status, mod), 0) + int(n)
    month = frame["study_date"].fillna("").astype(str).str.slice(0, 6).replace("", "unknown")
    for key, size in frame["downloaded_bytes"].groupby(month).sum().items():
        label = f"{key[:4]}-{key[4:]}" if key != "unknown" else key
        bytes_by_month[label] = bytes_by_month.get(label, 0) + int(size)


def inventory_problems(store: StateStore, path: Path) -> tuple[int, list[str]]:
    """Rows in the inventory CSV, and what breaks "every series in the state DB appears once"."""
    import pandas as pd

    if not Path(path).exists():
        return 0, [f"{path} does not exist: materialize inventory"]
    uids = pd.read_csv(path, usecols=["series_instance_uid"], dtype=str)["series_instance_uid"]
    problems = []
    duplicated = uids[uids.duplicated()]
    if len(duplicated):
        problems.append(f"{len(duplicated)} series listed more than once (first: {duplicated.iloc[0]})")
    in_db = set(store.all_series_uids())
    listed = set(uids)
    if missing := in_db - listed:
        problems.append(f"{len(missing)} series of the state DB are not in the inventory (first: {min(missing)})")
    if extra := listed - in_db:
        problems.append(f"{len(extra)} series in the inventory are not in the state DB (first: {min(extra)})")
    return len(uids), problems
