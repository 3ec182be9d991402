"""Per-series validation of a patient's downloads: instance files on disk vs what the PACS expects.

Counts always come from the files on disk (layout.instances_on_disk), never from the state DB's
downloaded_instances, so a deleted or half-written file is noticed.
"""

from __future__ import annotations

import csv
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Collection, Literal, Mapping, Sequence

from dicom_assets import layout
from dicom_assets.store.state import StateStore

#: ``lossy_transcode``: the PACS sent instances lossy-compressed that it stores lossless (a defect);
#: ``transcoded``: in another syntax than stored, losslessly (the pixels are the archive's, the
#: bytes are not). Both come from the state DB's record of each instance as received.
#: ``skipped``: the series filters did not want the series (download_status 'skipped'): not
#: fetched on purpose, never counted as missing.
Outcome = Literal["ok", "mismatch", "lossy_transcode", "transcoded", "unknown_expected", "skipped"]
OUTCOMES: tuple[str, ...] = ("ok", "mismatch", "lossy_transcode", "transcoded", "unknown_expected", "skipped")


@dataclass(frozen=True)
class SeriesValidation:
    patient_id: str
    study_instance_uid: str
    series_instance_uid: str
    series_number: int | None
    modality: str | None
    download_status: str
    expected_instances: int | None
    downloaded_instances: int
    outcome: Outcome
    missing_sop_uids: tuple[str, ...] | None
    extra_sop_uids: tuple[str, ...] | None
    transfer_syntaxes: str | None = None
    transcoded_instances: int = 0
    lossy_transcoded_instances: int = 0
    skip_reason: str | None = None  # outcome 'skipped': the series filter's rule


VALIDATION_COLUMNS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(SeriesValidation))


def validate_patient(
    store: StateStore,
    download_dir: Path,
    patient_id: str,
    expected_sop_uids: Mapping[str, Collection[str]] | None = None,
) -> list[SeriesValidation]:
    """One row per series of the patient (in store.series_of order).

    downloaded_instances = instance files on disk. Outcome: ``skipped`` for a skipped series
    (whatever is on disk: the filters did not want it), ``unknown_expected`` when the
    PACS count is unknown (NULL), ``ok`` when the count on disk equals it, else ``mismatch``.
    ``expected_sop_uids`` (SeriesInstanceUID -> SOPInstanceUIDs, e.g. from an IMAGE-level
    query) fills missing/extra (sorted) for the series it contains, None for the others; any
    missing or extra UID makes the outcome ``mismatch`` even when the counts agree or are unknown.
    """
    rows: list[SeriesValidation] = []
    for s in store.series_of(patient_id):
        directory = layout.series_dir(Path(download_dir), patient_id, s.study_instance_uid, s.series_instance_uid)
        on_disk = layout.instances_on_disk(directory)
        missing: tuple[str, ...] | None = None
        extra: tuple[str, ...] | None = None
        if expected_sop_uids is not None and s.series_instance_uid in expected_sop_uids:
            expected_set = set(expected_sop_uids[s.series_instance_uid])
            missing = tuple(sorted(expected_set - on_disk.keys()))
            extra = tuple(sorted(on_disk.keys() - expected_set))
        outcome: Outcome
        if s.download_status == "skipped":
            outcome = "skipped"
        elif missing or extra:
            outcome = "mismatch"
        elif s.lossy_transcoded_instances:
            outcome = "lossy_transcode"
        elif s.expected_instances is not None and len(on_disk) != s.expected_instances:
            outcome = "mismatch"
        elif s.transcoded_instances:
            outcome = "transcoded"
        elif s.expected_instances is None:
            outcome = "unknown_expected"
        elif len(on_disk) == s.expected_instances:
            outcome = "ok"
        else:
            outcome = "mismatch"
        rows.append(
            SeriesValidation(
                patient_id=s.patient_id,
                study_instance_uid=s.study_instance_uid,
                series_instance_uid=s.series_instance_uid,
                series_number=s.series_number,
                modality=s.modality,
                download_status=s.download_status,
                expected_instances=s.expected_instances,
                downloaded_instances=len(on_disk),
                outcome=outcome,
                missing_sop_uids=missing,
                extra_sop_uids=extra,
                transfer_syntaxes=s.transfer_syntaxes,
                transcoded_instances=s.transcoded_instances,
                lossy_transcoded_instances=s.lossy_transcoded_instances,
                skip_reason=s.skip_reason,
            )
        )
    return rows


def _cell(value: object) -> object:
    if value is None:
        return ""
    if isinstance(value, tuple):
        return "\\".join(value)
    return value


def write_validation_csv(rows: Sequence[SeriesValidation], path: Path) -> None:
    """Write the rows as CSV (header = field names; None -> empty; UID tuples joined with ``\\``).

    Atomic: written to a hidden temp file next to ``path``, fsynced, then renamed over it.
    Parent directories are created.
    """
    with layout.atomic_file(Path(path), newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(VALIDATION_COLUMNS)
        for row in rows:
            writer.writerow([_cell(getattr(row, c)) for c in VALIDATION_COLUMNS])
