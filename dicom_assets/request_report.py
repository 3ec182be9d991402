"""The request report: one answer per row of the researcher's request file, in the file's order.

The investigators read it without us, so every row gets a ``status`` and, unless it is plainly
complete, a ``reason`` in words. Statuses:

* ``complete``: every series the row asks for (its studies; its modalities, if it names any)
  that the series filters keep is on disk with every expected instance;
* ``partial``: some of them are, others are not yet (still being fetched, or the PACS sent fewer
  instances than it announced: ``incomplete``);
* ``pending``: the row is resolved but nothing of it is on disk yet (or not even asked about:
  a row added since the last discovery);
* ``not found``: no study on the PACS matches the row;
* ``ambiguous``: an AccessionNumber that matches several studies; nothing is fetched for the
  row (it may point at a patient outside the protocol) until a row names the study;
* ``failed``: a series of the row was given up (``dicom-assets retry --failed`` tries again);
* ``skipped by filter``: the row matched, but the patient rule or the series filters leave
  nothing of it to fetch.

The report is built from the file as it is now and the state DB (the rows' answers and the
series), so any worker can write it. The row's own columns come first, unchanged.
"""

from __future__ import annotations

import csv
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from dicom_assets.request_file import KNOWN_COLUMNS, RequestFile, RequestRow
from dicom_assets.store import StateStore
from dicom_assets.store.requests import StoredRequestRow, StudySeries

REPORT_STATUSES: tuple[str, ...] = (
    "complete", "partial", "pending", "not found", "ambiguous", "failed", "skipped by filter",
)  # fmt: skip
#: Columns the report adds after the row's own ones.
ANSWER_COLUMNS: tuple[str, ...] = (
    "status",
    "reason",
    "patient_ids",
    "studies",
    "study_instance_uids",
    "series_matched",
    "series_retrieved",
    "series_skipped",
    "instances_retrieved",
    "bytes_retrieved",
)
_SHOWN_IN_SUMMARY = 50
#: The report's file name under paths.report_dir.
REQUEST_REPORT_NAME = "request_report.csv"


@dataclass(frozen=True)
class RowReport:
    """The answer to one file row."""

    row: RequestRow
    status: str
    reason: str
    patient_ids: tuple[str, ...] = ()
    study_uids: tuple[str, ...] = ()
    series_matched: int = 0
    series_retrieved: int = 0
    series_skipped: int = 0
    instances_retrieved: int = 0
    bytes_retrieved: int = 0


@dataclass
class RequestReport:
    """Every row's answer and the figures of the whole file."""

    path: Path
    source: Path
    rows: list[RowReport]
    seconds: float = 0.0
    by_status: dict[str, int] = field(default_factory=dict)

    def metadata(self) -> dict[str, int | float]:
        figures: dict[str, int | float] = {"rows": len(self.rows), "seconds": round(self.seconds, 3)}
        figures |= {f"rows_{status.replace(' ', '_')}": n for status, n in self.by_status.items()}
        figures["series_retrieved"] = sum(r.series_retrieved for r in self.rows)
        figures["instances_retrieved"] = sum(r.instances_retrieved for r in self.rows)
        figures["bytes_retrieved"] = sum(r.bytes_retrieved for r in self.rows)
        return figures

    def summary_markdown(self) -> str:
        """Counts by status, then every row that is not complete (the first 50) with its reason."""
        lines = [f"**{self.source.name}**: {len(self.rows)} rows", "", "| status | rows |", "|---|---|"]
        lines += [f"| {status} | {n} |" for status, n in self.by_status.items() if n]
        open_rows = [r for r in self.rows if r.status != "complete"]
        if open_rows:
            lines += ["", "| row | asks for | status | reason |", "|---|---|---|---|"]
            for r in open_rows[:_SHOWN_IN_SUMMARY]:
                lines.append(f"| {r.row.row} | {_asks_for(r.row)} | {r.status} | {_md(r.reason)} |")
            if len(open_rows) > _SHOWN_IN_SUMMARY:
                lines.append(f"\n... and {len(open_rows) - _SHOWN_IN_SUMMARY} more rows in {self.path.name}")
        return "\n".join(lines)


def _md(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _asks_for(row: RequestRow) -> str:
    return _md(row.study_instance_uid or row.accession_number or row.patient_id or "")


def _held(series: StudySeries) -> bool:
    return series.download_status != "skipped"


def _row_series(row: StoredRequestRow, series: Sequence[StudySeries]) -> list[StudySeries]:
    """The series a row asks for: those of its studies, of its modalities if it names any."""
    if not row.modalities:
        return list(series)
    return [s for s in series if (s.modality or "").upper() in row.modalities]


def _skip_summary(skipped: Sequence[StudySeries]) -> str:
    reasons = Counter(s.skip_reason or "skipped" for s in skipped)
    return f"{len(skipped)} series skipped: " + "; ".join(f"{r} ({n})" if n > 1 else r for r, n in reasons.most_common())


def _found_status(series: Sequence[StudySeries]) -> tuple[str, str]:
    """Status and reason of a row that resolved to studies, from its series."""
    if not series:
        return "pending", "studies found; their series are not discovered yet"
    held = [s for s in series if _held(s)]
    skipped = [s for s in series if not _held(s)]
    if not held:
        return "skipped by filter", _skip_summary(skipped)
    done = [s for s in held if s.download_status == "complete"]
    failed = [s for s in held if s.download_status == "failed"]
    note = f"; {_skip_summary(skipped)}" if skipped else ""
    if failed:
        return "failed", f"{len(failed)} of {len(held)} series failed: {failed[0].last_error or 'no error recorded'}{note}"
    if len(done) == len(held):
        return "complete", note.lstrip("; ")
    incomplete = [s for s in held if s.download_status == "incomplete"]
    why = f" ({len(incomplete)} incomplete: the PACS sent fewer instances than it announced)" if incomplete else ""
    if not done:
        return "pending", f"0 of {len(held)} series retrieved yet{why}{note}"
    return "partial", f"{len(done)} of {len(held)} series retrieved{why}{note}"


def answer_row(row: RequestRow, stored: StoredRequestRow | None, series: Sequence[StudySeries], studies: Sequence[tuple[str, str]]) -> RowReport:
    """The report line of one file row from its stored answer, its studies and their series."""
    uids = tuple(uid for uid, _ in studies)
    pids = tuple(sorted({pid for _, pid in studies}))
    if stored is None or stored.resolution == "unresolved":
        return RowReport(row, "pending", "not asked about yet: run discovery (materialize patients, or dicom-assets sync)")
    if stored.resolution == "not_found":
        return RowReport(row, "not found", stored.reason or "")
    if stored.resolution == "ambiguous":
        return RowReport(row, "ambiguous", stored.reason or "", pids, uids)
    if stored.resolution == "rejected":
        return RowReport(row, "skipped by filter", stored.reason or "", pids, uids)
    mine = _row_series(stored, series)
    status, reason = _found_status(mine)
    done = [s for s in mine if s.download_status == "complete"]
    return RowReport(
        row, status, reason, pids, uids,
        series_matched=len(mine),
        series_retrieved=len(done),
        series_skipped=sum(1 for s in mine if not _held(s)),
        instances_retrieved=sum(s.downloaded_instances for s in mine if _held(s)),
        bytes_retrieved=sum(s.downloaded_bytes for s in mine if _held(s)),
    )  # fmt: skip


def build_request_report(store: StateStore, request: RequestFile, out_path: Path) -> RequestReport:
    """Answer every row of the file from the state DB (no PACS request); does not write."""
    started = time.monotonic()
    stored = {row.row_key: row for row in store.request_rows(active_only=False)}
    matches: dict[str, list[tuple[str, str]]] = {}
    for m in store.request_row_matches(active_only=False):
        matches.setdefault(m.row_key, []).append((m.study_instance_uid, m.patient_id))
    wanted_keys = {row.key for row in request.rows}
    study_uids = {uid for key, pairs in matches.items() if key in wanted_keys for uid, _ in pairs}
    by_study: dict[str, list[StudySeries]] = {}
    for series in store.series_of_studies(sorted(study_uids)):
        by_study.setdefault(series.study_instance_uid, []).append(series)
    rows = []
    for row in request.rows:
        studies = matches.get(row.key, [])
        series = [s for uid, _ in studies for s in by_study.get(uid, [])]
        rows.append(answer_row(row, stored.get(row.key), series, studies))
    counts = Counter(r.status for r in rows)
    return RequestReport(
        path=out_path,
        source=request.path,
        rows=rows,
        seconds=time.monotonic() - started,
        by_status={status: counts.get(status, 0) for status in REPORT_STATUSES},
    )


def _known_cells(row: RequestRow) -> dict[str, str]:
    return {
        "PatientID": row.patient_id or "",
        "AccessionNumber": row.accession_number or "",
        "StudyInstanceUID": row.study_instance_uid or "",
        "StudyDateFrom": row.study_date_from or "",
        "StudyDateUntil": row.study_date_until or "",
        "Modality": "\\".join(row.modalities) if row.modalities else "",
        "StudyDescription": row.study_description.pattern if row.study_description else "",
    }


def write_request_report(report: RequestReport, request: RequestFile) -> Path:
    """Write the CSV atomically (UTF-8 with BOM, so Excel shows non-ASCII names): the row number,
    the request columns the file uses, its free columns, then the answer."""
    used = [c for c in KNOWN_COLUMNS if any(_known_cells(r.row)[c] for r in report.rows)]
    header = ["row", *used, *request.extra_columns, *ANSWER_COLUMNS]
    report.path.parent.mkdir(parents=True, exist_ok=True)
    tmp = report.path.with_name(f".{report.path.name}.tmp")
    with tmp.open("w", encoding="utf-8-sig", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        for r in report.rows:
            known = _known_cells(r.row)
            writer.writerow([
                r.row.row, *(known[c] for c in used), *(r.row.extra.get(c, "") for c in request.extra_columns),
                r.status, r.reason, ";".join(r.patient_ids), len(r.study_uids), ";".join(r.study_uids),
                r.series_matched, r.series_retrieved, r.series_skipped, r.instances_retrieved, r.bytes_retrieved,
            ])  # fmt: skip
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, report.path)
    return report.path
