"""The inventory: one CSV row per series with its patient, study, download state and archive.

Streamed from the state DB in chunks of rows (StateStore.iter_inventory_rows, one query, one
snapshot) straight into Python's C csv writer, so a million series never sit in memory at once
and no DataFrame is built; written to a hidden temp file and renamed, so readers never see half a
file. The summaries (series by status and modality, bytes by study month) are tallied from the
same rows, so they describe exactly the file written.
"""

from __future__ import annotations

import csv
import time
from collections import Counter
from dataclasses import dataclass, field
from operator import itemgetter
from pathlib import Path
from typing import Any, Iterable, Sequence

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
    "network_faults",
    "transfer_syntaxes",
    "transcoded_instances",
    "lossy_transcoded_instances",
    "skip_reason",  # why a series is download_status 'skipped' (the series filter's rule); empty otherwise
    "deid_excluded_reason",  # why the series is left out of the de-identified copy (burned-in text); empty otherwise
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


_PATIENT, _STUDY, _STUDY_DATE, _MODALITY, _BYTES, _STATUS, _DOWNLOADED_AT = (
    INVENTORY_COLUMNS.index(name)
    for name in (
        "patient_id", "study_instance_uid", "study_date", "modality", "downloaded_bytes", "download_status",
        "downloaded_at",
    )
)  # fmt: skip


@dataclass
class _Tally:
    """Running counts over the ordered inventory rows, in memory that does not grow with them
    (a few dozen status/modality/month keys)."""

    rows: int = 0
    patients: int = 0
    studies: int = 0
    bytes: int = 0
    status_modality: Counter = field(default_factory=Counter)
    bytes_by_study_month: dict[str, int] = field(default_factory=dict)
    last_patient: object = None
    last_study: object = None

    def add(self, rows: Sequence[Sequence[Any]]) -> None:
        """Fold one chunk in. Patients and studies are counted as changes along the stream (the
        query orders by patient, and a study's rows are contiguous)."""
        self.rows += len(rows)
        self.bytes += sum(map(itemgetter(_BYTES), rows))
        self.status_modality.update(zip(map(itemgetter(_STATUS), rows), map(itemgetter(_MODALITY), rows)))
        months = self.bytes_by_study_month
        for date, size in zip(map(itemgetter(_STUDY_DATE), rows), map(itemgetter(_BYTES), rows)):
            month = date[:6] if date else ""
            months[month] = months.get(month, 0) + size
        for patient, study in zip(map(itemgetter(_PATIENT), rows), map(itemgetter(_STUDY), rows)):
            if study != self.last_study:
                self.studies += 1
                self.last_study = study
            if patient != self.last_patient:
                self.patients += 1
                self.last_patient = patient

    def stats(self, path: Path, seconds: float) -> InventoryStats:
        by_status: dict[str, int] = dict.fromkeys(SERIES_STATUSES, 0)
        by_status_modality: dict[tuple[str, str], int] = {}
        for (status, modality), n in self.status_modality.items():
            by_status[status] = by_status.get(status, 0) + n
            key = (status, modality if modality is not None else "?")
            by_status_modality[key] = by_status_modality.get(key, 0) + n
        bytes_by_month = {
            (f"{month[:4]}-{month[4:]}" if month else "unknown"): size
            for month, size in self.bytes_by_study_month.items()
        }
        return InventoryStats(
            path=path,
            rows=self.rows,
            patients=self.patients,
            studies=self.studies,
            bytes=self.bytes,
            seconds=seconds,
            by_status=by_status,
            by_status_modality=by_status_modality,
            bytes_by_month=bytes_by_month,
        )


def _csv_rows(rows: Iterable[Sequence[Any]]) -> Iterable[Sequence[Any]]:
    """Rows as the csv module writes them: NULL as an empty field, downloaded_at as ISO 8601 UTC
    (``2024-05-01 12:00:00.250000+00:00``, the fraction only when there is one)."""
    at = _DOWNLOADED_AT
    for row in rows:
        if row[at] is None:
            yield row
        else:
            yield (*row[:at], row[at].isoformat(sep=" "), *row[at + 1 :])


def write_inventory(store: StateStore, path: Path, chunk_rows: int = 10_000) -> InventoryStats:
    """Stream store.iter_inventory_rows to CSV at a temp name next to ``path``, then rename.

    Creates parent directories. With no series the file holds just the header. Memory is bounded
    by ``chunk_rows`` rows whatever the number of series.
    """
    started = time.monotonic()
    path = Path(path)
    columns = tuple(c.name for c in store.inventory_query().selected_columns)
    if columns != INVENTORY_COLUMNS:
        raise RuntimeError(f"inventory query returns columns {list(columns)}")
    tally = _Tally()
    with layout.atomic_file(path, newline="", encoding="utf-8") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(INVENTORY_COLUMNS)
        for rows in store.iter_inventory_rows(chunk_rows=chunk_rows):
            tally.add(rows)
            writer.writerows(_csv_rows(rows))
    return tally.stats(path, time.monotonic() - started)


def inventory_problems(store: StateStore, path: Path) -> tuple[int, list[str]]:
    """Rows in the inventory CSV, and what breaks "every series in the state DB appears once".

    Holds the CSV's UIDs (one column) as a set and streams the state DB's UIDs against it in
    chunks, crossing off each one found: what is left was listed but is not in the state DB.
    """
    import pandas as pd

    if not Path(path).exists():
        return 0, [f"{path} does not exist: materialize inventory"]
    uids = pd.read_csv(path, usecols=["series_instance_uid"], dtype=str)["series_instance_uid"]
    problems = []
    duplicated = uids[uids.duplicated()]
    if len(duplicated):
        problems.append(f"{len(duplicated)} series listed more than once (first: {duplicated.iloc[0]})")
    rows = len(uids)
    listed = set(uids)
    del uids, duplicated
    missing = 0
    first_missing: str | None = None
    for chunk in store.iter_series_uids():
        found = listed.intersection(chunk)
        if len(found) < len(chunk):
            absent = min(set(chunk) - found)
            missing += len(chunk) - len(found)
            first_missing = absent if first_missing is None else min(first_missing, absent)
        listed -= found
    if missing:
        problems.append(f"{missing} series of the state DB are not in the inventory (first: {first_missing})")
    if listed:
        problems.append(f"{len(listed)} series in the inventory are not in the state DB (first: {min(listed)})")
    return rows, problems
