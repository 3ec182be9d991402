"""Request rows resolved to studies: the C-FIND keys of a row, the exact check of the PACS's
answer (not found, ambiguous, the patient rule), and the rows' state in the state DB."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydicom.dataset import Dataset

from dicom_assets.request_file import read_request_file
from dicom_assets.request_resolution import answer_row, apply_rule, request_series_skip, row_query_keys
from dicom_assets.store import PatientRecord, StudyRecord
from dicom_assets.store.requests import StoredRequestRow


def _row(**fields) -> StoredRequestRow:  # type: ignore[no-untyped-def]
    base = dict(
        row_key="k", row_number=2, patient_id=None, accession_number=None, study_instance_uid=None,
        study_date_from=None, study_date_until=None, modalities=None, study_description=None,
        active=True, resolution="unresolved", reason=None, resolved_at=None,
    )  # fmt: skip
    return StoredRequestRow(**{**base, **fields})


def _study(uid: str, pid: str, day: str = "20200101", accession: str = "", modalities: str = "CT", description: str = "") -> Dataset:
    ds = Dataset()
    ds.StudyInstanceUID, ds.PatientID, ds.StudyDate, ds.AccessionNumber = uid, pid, day, accession
    ds.ModalitiesInStudy, ds.StudyDescription = modalities.split("\\"), description
    return ds


def test_a_row_asks_by_its_most_specific_id_with_window_and_one_modality() -> None:
    assert row_query_keys(_row(study_instance_uid="1.2", accession_number="A", patient_id="007")) == {
        "StudyInstanceUID": "1.2", "PatientID": "007",
    }  # fmt: skip
    keys = row_query_keys(_row(patient_id="000123", study_date_from="20190101", modalities=("CT",)))
    assert keys == {"PatientID": "000123", "StudyDate": "20190101-", "ModalitiesInStudy": "CT"}
    keys = row_query_keys(_row(accession_number="ACC", study_date_until="20201231", modalities=("CT", "MR")))
    assert keys == {"AccessionNumber": "ACC", "StudyDate": "-20201231"}  # several modalities: checked locally


def test_the_answer_is_checked_exactly_whatever_the_pacs_matched() -> None:
    """A PACS may match 123 for 000123 (numeric), ACC-1 case-insensitively, or ignore a date key."""
    row = _row(patient_id="000123", study_date_from="20190101", study_date_until="20201231", modalities=("CT",))
    answer = answer_row(row, [
        _study("1.1", "000123", "20190301", modalities="CT\\SR"),  # multi-valued, as Orthanc answers
        _study("1.2", "123", "20190301"),
        _study("1.3", "000123", "20220110"),
        _study("1.4", "000123", "20200615", modalities="MR"),
        _study("1.5", "000123", ""),
    ])  # fmt: skip
    assert answer.resolution == "found"
    assert [ds.StudyInstanceUID for ds in answer.studies] == ["1.1"]
    nothing = answer_row(_row(patient_id="000123", study_description="brain"), [_study("1.1", "000123", description="CHEST")])
    assert nothing.resolution == "not_found"
    assert "StudyDescription /brain/" in nothing.reason and "1 with another StudyDescription" in nothing.reason
    regex = answer_row(_row(patient_id="000123", study_description="^ct thorax"), [_study("1.1", "000123", description="CT Thorax w/o")])
    assert regex.resolution == "found"  # case-insensitive search


def test_an_accession_matching_two_studies_is_ambiguous_unless_the_row_names_the_patient() -> None:
    found = [_study("2.1", "P-DUP1", accession="ACC-DUP"), _study("2.2", "P-DUP2", accession="ACC-DUP")]
    answer = answer_row(_row(accession_number="ACC-DUP"), found)
    assert answer.resolution == "ambiguous" and len(answer.studies) == 2
    assert "matches 2 studies" in answer.reason and "'P-DUP1', 'P-DUP2'" in answer.reason
    assert "add the PatientID or the StudyInstanceUID" in answer.reason
    specific = answer_row(_row(accession_number="ACC-DUP", patient_id="P-DUP2"), found)
    assert specific.resolution == "found" and [ds.StudyInstanceUID for ds in specific.studies] == ["2.2"]
    lower = answer_row(_row(accession_number="acc-dup"), found)  # a PACS matching case-insensitively
    assert lower.resolution == "not_found"


def test_the_patient_rule_and_the_rows_both_apply() -> None:
    answer = answer_row(_row(patient_id="000123"), [_study("1.1", "000123")])
    refused = apply_rule(answer, lambda ds: ds.PatientID.startswith("P"), "selection.patient_id_regex /^P/")
    assert refused.resolution == "rejected"
    assert refused.reason == "PatientID '000123' not accepted by selection.patient_id_regex /^P/"
    assert apply_rule(answer, lambda ds: True, "all").resolution == "found"
    boom = apply_rule(answer, lambda ds: 1 / 0, "selection.function x:y")  # a failing rule refuses, never raises
    assert boom.resolution == "rejected"


def _write_csv(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_stored_rows_follow_the_file_by_what_they_ask(store, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    first = read_request_file(_write_csv(tmp_path / "a.csv", ["PatientID,Modality,Subject", "000123,CT,S01", "0042,,S02", "0042,,S03"]))
    sync = store.sync_request_rows(first.rows)
    assert (sync.new, sync.deactivated, sync.active) == (2, 0, 2)  # the duplicate row shares a key
    rows = store.request_rows()
    assert [(r.row_number, r.patient_id, r.modalities) for r in rows] == [(2, "000123", ("CT",)), (3, "0042", None)]
    store.record_row_resolution(rows[0].row_key, "found", None, [("1.1", "000123"), ("1.2", "000123")])
    store.record_row_resolution(rows[0].row_key, "found", None, [("1.1", "000123")])  # a new answer replaces the old
    assert [(m.study_instance_uid, m.patient_id) for m in store.request_row_matches()] == [("1.1", "000123")]
    assert store.request_rows_to_resolve() == [rows[1]]

    # re-sorted, one row edited (new window), one removed, one added
    second = read_request_file(_write_csv(tmp_path / "b.csv", ["PatientID,StudyDateFrom", "0099,", "000123,", "0042,2020-01-01"]))
    sync = store.sync_request_rows(second.rows)
    assert (sync.new, sync.deactivated, sync.active) == (3, 2, 3)
    assert sorted(r.patient_id for r in store.request_rows_to_resolve()) == ["000123", "0042", "0099"]
    assert store.request_row_matches() == []  # the CT row left the file: its study is no longer asked for
    assert len(store.request_row_matches(active_only=False)) == 1
    back = store.sync_request_rows(first.rows)
    assert (back.new, back.reactivated, back.deactivated) == (0, 2, 3)
    assert [m.study_instance_uid for m in store.request_row_matches()] == ["1.1"]


def test_series_no_row_wants_are_named(store, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    request = read_request_file(_write_csv(tmp_path / "a.csv", ["PatientID,Modality", "000123,CT", "000123,PT"]))
    store.sync_request_rows(request.rows)
    store.upsert_patients([PatientRecord(patient_id="000123")])
    store.upsert_studies([StudyRecord(study_instance_uid="1.1", patient_id="000123"), StudyRecord(study_instance_uid="1.2", patient_id="000123")])
    ct, pt = store.request_rows()
    store.record_row_resolution(ct.row_key, "found", None, [("1.1", "000123")])
    store.record_row_resolution(pt.row_key, "not_found", "no study", [])
    skip = request_series_skip(store, ["000123"])

    class S:  # the two attributes the hook reads
        def __init__(self, study: str, modality: str | None) -> None:
            self.study_instance_uid, self.modality = study, modality

    assert skip(S("1.1", "CT")) is None
    assert skip(S("1.1", "SR")) == "Modality SR not asked for by request row 2 (Modality CT)"
    assert skip(S("1.2", "CT")) == "not asked for by any row of the request file"


@pytest.mark.parametrize("resolution", ["found", "not_found", "ambiguous", "rejected", "unresolved"])
def test_every_resolution_is_storable(store, tmp_path: Path, resolution: str) -> None:  # type: ignore[no-untyped-def]
    request = read_request_file(_write_csv(tmp_path / "a.csv", ["AccessionNumber", "ACC-1"]))
    store.sync_request_rows(request.rows)
    (row,) = store.request_rows()
    store.record_row_resolution(row.row_key, resolution, "why", [])
    (after,) = store.request_rows()
    assert (after.resolution, after.reason) == (resolution, "why") and after.resolved_at is not None
