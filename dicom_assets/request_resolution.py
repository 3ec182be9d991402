"""Request-file discovery: each row of the researcher's file resolved to studies by C-FIND.

With ``selection.request_file`` set, the cohort is what the rows name, not every patient of the
PACS. A discovery pass (:func:`discover_requested`) then:

* writes the file's rows to the state DB (:meth:`StateStore.sync_request_rows`): rows are keyed by
  what they ask for, so an unchanged file is recognised row by row, an edited row is a new
  request, and a row that left the file is deactivated (its studies are no longer fetched; nothing
  downloaded is deleted);
* resolves the rows that need it with one STUDY-level C-FIND each (Study Root): new or changed
  rows on an incremental pass, every row on a full pass (``discovery.full_every_days``, or
  ``dicom-assets sync --full-discovery``).
* on an incremental pass, sends one more STUDY-level C-FIND, the date window of rule passes
  (StudyDate from the watermark minus ``discovery.recheck_days``): requested studies in it get
  their related counts refreshed (changed ones have their series asked for again), and PatientID
  rows get the new studies that match them. Changes below older studies, and studies that
  reach the PACS with an old date, are found by the next full pass, which asks about every row. A row asks by StudyInstanceUID, else by AccessionNumber, else by
  PatientID, with the StudyDate window and a single Modality (ModalitiesInStudy) as keys where
  given; everything is then checked locally and exactly (a PACS may match case-insensitively,
  treat ``*`` as a wildcard, or ignore a key), with the StudyDescription regex and several
  modalities applied here;
* keeps only patients the patient rule (regex or function) also accepts: the rule AND the rows;
* records the patients and studies of the rows that resolved to studies (an accession that
  matches two studies is *ambiguous*: its studies are recorded for the report, never fetched,
  until a more specific row names one). The per-patient ``series`` step then asks for their
  series; :func:`series_wanted_by_rows` tells it which series no row wants (another modality).

The result of each row is in the state DB for every worker, and in the ``request_report``.
"""

from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass, field
from datetime import date
from typing import Any, Callable, Sequence

from pydicom.dataset import Dataset

from dicom_assets.config import DiscoverySettings
from dicom_assets.discovery import DiscoveryStats, dicom_date, plan_pass, record_studies, rule_accepts
from dicom_assets.layout import patient_key
from dicom_assets.pacs.budget import server_key
from dicom_assets.pacs.client import PacsClient, PacsSession, text
from dicom_assets.request_file import RequestFile
from dicom_assets.store import PatientRecord, StateStore
from dicom_assets.store.requests import StoredRequestRow

log = logging.getLogger("dicom_assets.request_resolution")

#: Suffix of the discovery watermark key of request-file passes, kept apart from rule passes so
#: switching the selection never makes one kind of pass skip what the other did not look at.
REQUEST_WATERMARK_SUFFIX = "#request-file"


@dataclass
class RequestPassStats:
    """A request-file discovery pass, for the ``patients`` asset's metadata."""

    full_pass: bool = False
    rows: int = 0  # data rows in the file
    rows_new: int = 0
    rows_removed: int = 0
    rows_resolved: int = 0  # rows asked about in this pass
    found: int = 0  # rows resolved to studies to fetch
    not_found: int = 0
    ambiguous: int = 0
    rejected: int = 0  # every match refused by the patient rule
    studies_found: int = 0  # studies to fetch, this pass
    window_studies: int = 0  # requested studies seen in the incremental pass's date window
    rows_extended: int = 0  # PatientID rows given a new study from the date window
    kept: int = 0  # patients with studies to fetch (all rows)
    inserted: int = 0  # patients new to the state DB
    requests: int = 0
    seconds: float = 0.0
    skipped: list[str] = field(default_factory=list)

    def metadata(self) -> dict[str, float | int]:
        return {
            "full_pass": int(self.full_pass),
            "request_rows": self.rows,
            "rows_new": self.rows_new,
            "rows_removed": self.rows_removed,
            "rows_queried": self.rows_resolved,
            "rows_found": self.found,
            "rows_not_found": self.not_found,
            "rows_ambiguous": self.ambiguous,
            "rows_rejected": self.rejected,
            "studies_found": self.studies_found,
            "window_studies": self.window_studies,
            "rows_extended": self.rows_extended,
            "kept": self.kept,
            "inserted": self.inserted,
            "pacs_requests": self.requests,
            "seconds": round(self.seconds, 3),
        }


@dataclass(frozen=True)
class RowAnswer:
    """What one row resolved to: ``resolution``, why (for the report), the matched studies."""

    resolution: str  # found | not_found | ambiguous | rejected
    reason: str | None
    studies: list[Dataset]


def _window(row: StoredRequestRow) -> str:
    """The StudyDate matching key of the row's window ('' for none)."""
    if row.study_date_from is None and row.study_date_until is None:
        return ""
    return f"{row.study_date_from or ''}-{row.study_date_until or ''}"


def row_query_keys(row: StoredRequestRow) -> dict[str, str]:
    """The STUDY-level C-FIND keys for a row: its most specific ID, its window, one modality."""
    keys: dict[str, str] = {}
    if row.study_instance_uid:
        keys["StudyInstanceUID"] = row.study_instance_uid
    elif row.accession_number:
        keys["AccessionNumber"] = row.accession_number
    if row.patient_id:
        keys["PatientID"] = row.patient_id
    if window := _window(row):
        keys["StudyDate"] = window
    if row.modalities and len(row.modalities) == 1:
        keys["ModalitiesInStudy"] = row.modalities[0]
    return keys


def _what(row: StoredRequestRow) -> str:
    """The row's request in words, for reasons: ``AccessionNumber 'A1' of PatientID '7'``."""
    parts = []
    if row.study_instance_uid:
        parts.append(f"StudyInstanceUID {row.study_instance_uid}")
    if row.accession_number:
        parts.append(f"AccessionNumber {row.accession_number!r}")
    if row.patient_id:
        parts.append(f"PatientID {row.patient_id!r}")
    return " with ".join(parts) or "(no ID)"


def _conditions(row: StoredRequestRow) -> str:
    parts = []
    if row.study_date_from or row.study_date_until:
        parts.append(f"StudyDate {row.study_date_from or '...'}-{row.study_date_until or '...'}")
    if row.modalities:
        parts.append(f"Modality {'/'.join(row.modalities)}")
    if row.study_description:
        parts.append(f"StudyDescription /{row.study_description}/")
    return ", ".join(parts)


def _misses(row: StoredRequestRow, ds: Dataset) -> str | None:
    """Why this answer is not a study the row asks for (None: it is), checked exactly."""
    for keyword, wanted in (
        ("StudyInstanceUID", row.study_instance_uid),
        ("AccessionNumber", row.accession_number),
        ("PatientID", row.patient_id),
    ):
        if wanted is not None and (text(ds, keyword) or "") != wanted:
            return keyword
    day = text(ds, "StudyDate") or ""
    if (row.study_date_from and not day >= row.study_date_from) or (row.study_date_until and not (day and day <= row.study_date_until)):
        return "StudyDate"
    present = _modalities(ds)
    if row.modalities and present and not present.intersection(row.modalities):
        return "Modality"
    if row.study_description and not re.search(row.study_description, text(ds, "StudyDescription") or "", re.IGNORECASE):
        return "StudyDescription"
    return None


def _modalities(ds: Dataset) -> set[str]:
    """ModalitiesInStudy as answered (a PACS may send it multi-valued or as one backslash-joined
    text); empty when the PACS did not say, and then the series step decides by each Modality."""
    raw = ds.get("ModalitiesInStudy")
    values = [raw] if isinstance(raw, str) else list(raw or [])
    return {part.strip().upper() for value in values for part in str(value).split("\\") if part.strip()}


def answer_row(row: StoredRequestRow, found: Sequence[Dataset]) -> RowAnswer:
    """Judge the PACS's answer to a row's C-FIND: the studies that really match, or why none
    does, or that an accession is ambiguous. No patient rule here (see :func:`apply_rule`)."""
    studies: dict[str, Dataset] = {}
    misses: dict[str, int] = {}
    for ds in found:
        miss = _misses(row, ds)
        if miss is None:
            studies.setdefault(text(ds, "StudyInstanceUID") or "", ds)
        else:
            misses[miss] = misses.get(miss, 0) + 1
    studies.pop("", None)
    if not studies:
        conditions = _conditions(row)
        reason = f"no study with {_what(row)}" + (f" and {conditions}" if conditions else "") + " on the PACS"
        if misses:
            reason += "; the PACS answered " + ", ".join(f"{n} with another {k}" for k, n in sorted(misses.items()))
        return RowAnswer("not_found", reason, [])
    chosen = list(studies.values())
    if row.accession_number and not row.study_instance_uid and len(chosen) > 1:
        patients = sorted({text(ds, "PatientID") or "" for ds in chosen})
        return RowAnswer(
            "ambiguous",
            f"AccessionNumber {row.accession_number!r} matches {len(chosen)} studies (PatientID "
            f"{', '.join(repr(p) for p in patients)}); nothing fetched for this row: add the PatientID or the "
            f"StudyInstanceUID to the row to choose one",
            chosen,
        )
    return RowAnswer("found", None, chosen)


def apply_rule(answer: RowAnswer, rule: Callable[[Dataset], Any], rule_name: str) -> RowAnswer:
    """Drop the studies of patients the patient rule refuses (the rule AND the rows); a row left
    with none is ``rejected``, naming the rule."""
    if answer.resolution != "found":
        return answer
    kept, refused = [], set()
    for ds in answer.studies:
        pid = text(ds, "PatientID") or ""
        if rule_accepts(rule, ds):
            kept.append(ds)
        else:
            refused.add(pid)
    if kept:
        return RowAnswer("found", None, kept)
    names = ", ".join(repr(p) for p in sorted(refused))
    return RowAnswer("rejected", f"PatientID {names} not accepted by {rule_name}", answer.studies)


def resolve_row(session: PacsSession, row: StoredRequestRow, rule: Callable[[Dataset], Any], rule_name: str) -> RowAnswer:
    """One STUDY-level C-FIND for the row, judged exactly, then the patient rule."""
    return apply_rule(answer_row(row, session.find_studies_matching(**row_query_keys(row))), rule, rule_name)


def _record_answers(store: StateStore, answers: dict[str, RowAnswer], stats: RequestPassStats) -> None:
    """Store each row's answer, and the patients and studies of the found rows."""
    patients: dict[str, PatientRecord] = {}
    studies: list[tuple[str, Dataset]] = []
    for key, answer in answers.items():
        pairs = [(text(ds, "StudyInstanceUID") or "", text(ds, "PatientID") or "") for ds in answer.studies]
        if answer.resolution == "found":
            for ds in answer.studies:
                pid = text(ds, "PatientID") or ""
                patients.setdefault(pid, _patient_record(ds, pid))
                studies.append((pid, ds))
        store.record_row_resolution(key, answer.resolution, answer.reason, pairs)
        setattr(stats, answer.resolution, getattr(stats, answer.resolution) + 1)
    stats.inserted = store.upsert_patients(patients.values()).inserted
    scratch = DiscoveryStats()
    stats.studies_found, _ = record_studies(store, studies, scratch, "request row")
    stats.skipped += scratch.skipped


def _patient_record(ds: Dataset, pid: str) -> PatientRecord:
    return PatientRecord(
        patient_id=pid,
        patient_name=text(ds, "PatientName"),
        patient_sex=text(ds, "PatientSex"),
        patient_birth_date=text(ds, "PatientBirthDate"),
    )


def discover_requested(
    client: PacsClient,
    store: StateStore,
    request: RequestFile,
    rule: Callable[[Dataset], Any],
    rule_name: str,
    policy: DiscoverySettings,
    force_full: bool = False,
    today: date | None = None,
) -> tuple[list[str], RequestPassStats]:
    """One request-file discovery pass (see the module doc). Returns the partition keys of every
    patient a found row of the file names (new or not), and the pass's figures."""
    started = time.monotonic()
    today = today or date.today()
    mark = server_key(client) + REQUEST_WATERMARK_SUFFIX
    plan = plan_pass(store, mark, policy, force_full, today)
    stats = RequestPassStats(full_pass=plan.full, rows=len(request.rows))
    synced = store.sync_request_rows(request.rows)
    stats.rows_new, stats.rows_removed = synced.new + synced.reactivated, synced.deactivated
    todo = store.request_rows_to_resolve(every_row=plan.full)
    log.info(
        "request file %s: %d rows, %d new, %d removed; %s pass (%s): %d row(s) to ask the PACS about",
        request.path, stats.rows, stats.rows_new, stats.rows_removed, "full" if plan.full else "incremental",
        plan.reason, len(todo),
    )  # fmt: skip
    answers: dict[str, RowAnswer] = {}
    with client.session() as session:
        for done, row in enumerate(todo, 1):
            answers[row.row_key] = resolve_row(session, row, rule, rule_name)
            if done % 100 == 0:
                log.info("resolved %d of %d request rows", done, len(todo))
        window = [] if plan.full else session.find_studies_by_date(plan.since)
        stats.requests = session.requests
    stats.rows_resolved = len(answers)
    _record_answers(store, answers, stats)
    if window:
        _apply_window(store, window, rule, rule_name, stats)
    store.record_discovery_pass(mark, dicom_date(today), plan.full)
    wanted = requested_patients(store)
    stats.kept = len(wanted)
    stats.seconds = time.monotonic() - started
    return sorted(patient_key(pid) for pid in wanted), stats


def _patient_rows(store: StateStore) -> dict[str, list[StoredRequestRow]]:
    """PatientID -> the active rows that ask by PatientID only (no accession, no UID), found or
    not: the rows a new study of that patient can belong to."""
    rows: dict[str, list[StoredRequestRow]] = {}
    for row in store.request_rows():
        if row.patient_id and not row.accession_number and not row.study_instance_uid and row.resolution in ("found", "not_found"):
            rows.setdefault(row.patient_id, []).append(row)
    return rows


def _apply_window(store: StateStore, window: Sequence[Dataset], rule: Callable[[Dataset], Any], rule_name: str, stats: RequestPassStats) -> None:
    """Use an incremental pass's date-window answer (every study dated from the watermark minus
    ``discovery.recheck_days``, one C-FIND): refresh the related counts of requested studies in it
    (a changed study gets its series asked for again), and give PatientID rows the new studies
    that match them (an open window, an exam that arrived after the row was answered). Changes
    below older studies wait for the next full pass, which asks about every row again."""
    requested = store.requested_study_rows()
    by_patient = _patient_rows(store)
    matched: dict[str, list[tuple[str, str]]] = {}
    for m in store.request_row_matches():
        matched.setdefault(m.row_key, []).append((m.study_instance_uid, m.patient_id))
    refreshed: list[tuple[str, Dataset]] = []
    extended: dict[str, list[Dataset]] = {}
    for ds in window:
        uid, pid = text(ds, "StudyInstanceUID") or "", text(ds, "PatientID") or ""
        if uid in requested:
            refreshed.append((pid, ds))
        for row in by_patient.get(pid, ()):
            known = {study for study, _ in matched.get(row.row_key, [])}
            if uid not in known and _misses(row, ds) is None and rule_accepts(rule, ds):
                extended.setdefault(row.row_key, []).append(ds)
    for key, studies in extended.items():
        pairs = matched.get(key, []) + [(text(ds, "StudyInstanceUID") or "", text(ds, "PatientID") or "") for ds in studies]
        store.record_row_resolution(key, "found", None, pairs)
        store.upsert_patients([_patient_record(studies[0], text(studies[0], "PatientID") or "")])
        refreshed += [(text(ds, "PatientID") or "", ds) for ds in studies]
    scratch = DiscoveryStats()
    stats.window_studies, _ = record_studies(store, refreshed, scratch, "date window")
    stats.rows_extended = len(extended)
    stats.skipped += scratch.skipped


def requested_patients(store: StateStore) -> list[str]:
    """PatientIDs with a study that an active, found row asks for: the cohort of the file."""
    found = {row.row_key for row in store.request_rows() if row.resolution == "found"}
    return sorted({m.patient_id for m in store.request_row_matches() if m.row_key in found})


def request_series_skip(store: StateStore, patient_ids: Sequence[str]) -> Callable[[Any], str | None]:
    """For the series step: a function giving why no row wants a series (None: a row wants it).

    A series is wanted when an active, found row asks for its study and either names no
    modality or names the series' Modality. Series of studies no active row asks for (a removed
    or edited row, or a study known from an earlier selection) are not fetched either.
    """
    wanted = store.requested_study_rows(patient_ids)

    def skip_reason(series: Any) -> str | None:
        rows = wanted.get(series.study_instance_uid)
        if not rows:
            return "not asked for by any row of the request file"
        modality = (series.modality or "").upper()
        if any(row.modalities is None or modality in row.modalities for row in rows):
            return None
        asked = sorted({m for row in rows for m in row.modalities or ()})
        numbers = ", ".join(str(row.row_number) for row in rows)
        return f"Modality {modality or '(none)'} not asked for by request row {numbers} (Modality {'/'.join(asked)})"

    return skip_reason
