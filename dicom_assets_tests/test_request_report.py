"""The request report: a status and a reason for every row, in the file's order, as a CSV the
investigators can read (their own columns first), with a Markdown summary."""

from __future__ import annotations

import csv
from pathlib import Path

from dicom_assets.request_file import read_request_file
from dicom_assets.request_report import answer_row, build_request_report, write_request_report
from dicom_assets.store import PatientRecord, SeriesRecord, StudyRecord
from dicom_assets.store.requests import StoredRequestRow, StudySeries


def _stored(resolution: str = "found", reason: str | None = None, modalities: tuple[str, ...] | None = None) -> StoredRequestRow:
    return StoredRequestRow(
        row_key="k", row_number=2, patient_id="000123", accession_number=None, study_instance_uid=None,
        study_date_from=None, study_date_until=None, modalities=modalities, study_description=None,
        active=True, resolution=resolution, reason=reason, resolved_at=None,
    )  # fmt: skip


def _series(uid: str, status: str, modality: str = "CT", skip: str | None = None, got: int = 0, error: str | None = None) -> StudySeries:
    return StudySeries("1.1", uid, "000123", modality, status, skip, 4, got, got * 1000, error)


def _row(tmp_path: Path):  # type: ignore[no-untyped-def]
    (tmp_path / "r.csv").write_text("PatientID,Subject\n000123,S01\n", encoding="utf-8")
    return read_request_file(tmp_path / "r.csv").rows[0]


def test_every_status_from_the_rows_series(tmp_path: Path) -> None:
    row, pair = _row(tmp_path), [("1.1", "000123")]

    def status(stored: StoredRequestRow | None, *series: StudySeries) -> tuple[str, str]:
        answer = answer_row(row, stored, list(series), pair)
        return answer.status, answer.reason

    assert status(None)[0] == "pending"  # a row added since the last discovery
    assert status(_stored("not_found", "no study with PatientID '000123' on the PACS")) == ("not found", "no study with PatientID '000123' on the PACS")
    assert status(_stored("ambiguous", "matches 2 studies"))[0] == "ambiguous"
    assert status(_stored("rejected", "not accepted by selection.patient_id_regex /^P/"))[0] == "skipped by filter"
    assert status(_stored(), _series("a", "complete", got=4), _series("b", "complete", got=4)) == ("complete", "")
    partial = status(_stored(), _series("a", "complete", got=4), _series("b", "incomplete", got=2))
    assert partial[0] == "partial" and "1 of 2 series retrieved" in partial[1] and "1 incomplete" in partial[1]
    assert status(_stored(), _series("a", "pending"))[0] == "pending"
    failed = status(_stored(), _series("a", "complete", got=4), _series("b", "failed", error="gave up after 5 attempts"))
    assert failed == ("failed", "1 of 2 series failed: gave up after 5 attempts")
    only_skipped = status(_stored(), _series("a", "skipped", skip="exclude modality SR"), _series("b", "skipped", skip="exclude modality SR"))
    assert only_skipped == ("skipped by filter", "2 series skipped: exclude modality SR (2)")
    noted = status(_stored(), _series("a", "complete", got=4), _series("b", "skipped", skip="Localizer"))
    assert noted == ("complete", "1 series skipped: Localizer")
    # a row naming a modality answers for the series of that modality only
    mr_row = answer_row(row, _stored(modalities=("MR",)), [_series("a", "complete", got=4), _series("b", "pending", "MR")], pair)
    assert (mr_row.status, mr_row.series_matched, mr_row.series_retrieved) == ("pending", 1, 0)
    counted = answer_row(row, _stored(), [_series("a", "complete", got=4), _series("b", "skipped", skip="x", got=0)], pair)
    assert (counted.series_matched, counted.series_retrieved, counted.series_skipped, counted.instances_retrieved, counted.bytes_retrieved) == (2, 1, 1, 4, 4000)


def test_the_report_follows_the_file_and_keeps_its_columns(store, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "cohort.csv"
    path.write_text("Subject,PatientID,AccessionNumber,Note\nS01,000123,,first\nS02,,ACC-X,ü\nS03,0042,,\n", encoding="utf-8")
    request = read_request_file(path)
    store.sync_request_rows(request.rows)
    by_patient = {r.patient_id or r.accession_number: r for r in store.request_rows()}
    store.upsert_patients([PatientRecord(patient_id="000123")])
    store.upsert_studies([StudyRecord(study_instance_uid="1.1", patient_id="000123")])
    store.upsert_series([SeriesRecord("1.1.1", "1.1", "000123", modality="CT", expected_instances=4)])
    store.record_row_resolution(by_patient["000123"].row_key, "found", None, [("1.1", "000123")])
    store.record_row_resolution(by_patient["ACC-X"].row_key, "not_found", "no study with AccessionNumber 'ACC-X' on the PACS", [])

    report = build_request_report(store, request, tmp_path / "reports" / "request_report.csv")
    write_request_report(report, request)
    with open(report.path, newline="", encoding="utf-8-sig") as f:
        lines = list(csv.DictReader(f))
    assert [line["Subject"] for line in lines] == ["S01", "S02", "S03"]
    assert list(lines[0])[:5] == ["row", "PatientID", "AccessionNumber", "Subject", "Note"]
    assert [(line["row"], line["status"]) for line in lines] == [("2", "pending"), ("3", "not found"), ("4", "pending")]
    assert lines[0]["PatientID"] == "000123" and lines[1]["Note"] == "ü"
    assert lines[0]["study_instance_uids"] == "1.1" and lines[0]["series_matched"] == "1"
    assert "not asked about yet" in lines[2]["reason"]
    assert report.by_status["pending"] == 2 and report.metadata()["rows_not_found"] == 1
    summary = report.summary_markdown()
    assert "| not found | 1 |" in summary and "| 3 | ACC-X | not found | no study with AccessionNumber 'ACC-X' on the PACS |" in summary
