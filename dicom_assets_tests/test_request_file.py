"""The cohort request file: real CSV exports and XLSX workbooks, read into rows or refused clearly."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import openpyxl
import pytest

from dicom_assets.request_file import RequestFile, RequestFileError, read_request_file


def _csv(tmp_path: Path, lines: list[str], *, name: str = "cohort.csv", newline: str = "\n", bom: bool = False) -> Path:
    """A CSV file as a spreadsheet program writes it: given line ends, optional UTF-8 BOM."""
    path = tmp_path / name
    data = (newline.join(lines) + newline).encode("utf-8")
    path.write_bytes(b"\xef\xbb\xbf" + data if bom else data)
    return path


def _xlsx(tmp_path: Path, sheets: dict[str, list[list[object]]], *, name: str = "cohort.xlsx") -> Path:
    """A real workbook written by openpyxl; str values become text cells, numbers number cells."""
    workbook = openpyxl.Workbook()
    workbook.remove(workbook.active)
    for title, rows in sheets.items():
        sheet = workbook.create_sheet(title)
        for row in rows:
            sheet.append(row)
    path = tmp_path / name
    workbook.save(path)
    return path


def _problems(path: Path, **kwargs: object) -> RequestFileError:
    with pytest.raises(RequestFileError) as failure:
        read_request_file(path, **kwargs)  # type: ignore[arg-type]
    assert str(path) in str(failure.value)
    return failure.value


# --- CSV -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("delimiter", "bom", "newline"),
    [(",", False, "\n"), (";", True, "\r\n"), ("\t", True, "\r\n"), (";", False, "\r\n"), (",", True, "\n")],
)
def test_csv_delimiters_bom_and_line_ends(tmp_path: Path, delimiter: str, bom: bool, newline: str) -> None:
    """European Excel writes ';' with CRLF and a BOM; the BOM must not stick to the first header."""
    lines = [
        delimiter.join(row)
        for row in (["PatientID", "Modality", "Note"], ["000123", "CT", "first"], ["0042", "MR", "second"])
    ]
    request = read_request_file(_csv(tmp_path, lines, newline=newline, bom=bom))
    assert [(r.row, r.patient_id, r.modalities, r.extra) for r in request.rows] == [
        (2, "000123", ("CT",), {"Note": "first"}),
        (3, "0042", ("MR",), {"Note": "second"}),
    ]
    assert request.extra_columns == ("Note",)


def test_ids_keep_leading_zeros_and_inner_spaces_and_only_the_ends_are_stripped(tmp_path: Path) -> None:
    path = _csv(tmp_path, ["PatientID,AccessionNumber", "  000123  ,", "AB 0 12, 0099 ", ",ACC-7"])
    rows = read_request_file(path).rows
    assert [(r.patient_id, r.accession_number) for r in rows] == [
        ("000123", None),
        ("AB 0 12", "0099"),
        (None, "ACC-7"),
    ]
    assert rows[0].study_date_from is None and rows[0].modalities is None and rows[0].study_description is None


@pytest.mark.parametrize(
    "header", ["PatientID", "Patient ID", "patient_id", " PATIENT_ID ", "patient id", "Patient_Id"]
)
def test_header_spellings_match_case_space_and_underscore_insensitively(tmp_path: Path, header: str) -> None:
    request = read_request_file(_csv(tmp_path, [f"{header},Study Date From,study_date_until", "007,20200101,20201231"]))
    row = request.rows[0]
    assert (row.patient_id, row.study_date_from, row.study_date_until) == ("007", "20200101", "20201231")
    assert request.extra_columns == ()


def test_free_columns_are_carried_through_in_file_order_unchanged(tmp_path: Path) -> None:
    path = _csv(tmp_path, ["Pseudonym,PatientID,Arm,Remark", 'P-01,000123,B,"CT, then MR "', "P-02,000124,,"])
    request = read_request_file(path)
    assert request.extra_columns == ("Pseudonym", "Arm", "Remark")
    assert list(request.rows[0].extra.items()) == [("Pseudonym", "P-01"), ("Arm", "B"), ("Remark", "CT, then MR ")]
    assert request.rows[1].extra == {"Pseudonym": "P-02", "Arm": "", "Remark": ""}


@pytest.mark.parametrize(
    ("cell", "expected"),
    [
        ("CT\\MR", ("CT", "MR")),
        ("ct, mr", ("CT", "MR")),
        ("CT;PT", ("CT", "PT")),
        ("MR/CT", ("MR", "CT")),
        ("CT MR  PT", ("CT", "MR", "PT")),
        ("CT,ct", ("CT",)),
        ("DX", ("DX",)),
    ],
)
def test_modality_lists(tmp_path: Path, cell: str, expected: tuple[str, ...]) -> None:
    path = _csv(tmp_path, ["PatientID;Modality", f'1;"{cell}"'])
    assert read_request_file(path).rows[0].modalities == expected


def test_empty_rows_are_skipped_and_row_numbers_stay_those_of_the_file(tmp_path: Path) -> None:
    path = _csv(tmp_path, ["PatientID,Note", "001,a", "", ",", "002,b", " , ", ",,", ""])
    assert [(r.row, r.patient_id) for r in read_request_file(path).rows] == [(2, "001"), (5, "002")]


def test_single_column_file_and_quoted_values(tmp_path: Path) -> None:
    path = _csv(tmp_path, ['"Patient ID"', '"000123"', "000456"])
    assert [r.patient_id for r in read_request_file(path).rows] == ["000123", "000456"]


@pytest.mark.parametrize(
    ("text", "expected"),
    [("20200131", "20200131"), ("2020-01-31", "20200131"), ("31.01.2020", "20200131"), ("1.2.2020", "20200201")],
)
def test_accepted_date_formats_are_normalised(tmp_path: Path, text: str, expected: str) -> None:
    path = _csv(tmp_path, ["PatientID,StudyDateFrom,StudyDateUntil", f"1,{text},{text}"])
    row = read_request_file(path).rows[0]
    assert (row.study_date_from, row.study_date_until) == (expected, expected)


def test_study_description_regex_is_compiled_case_insensitively(tmp_path: Path) -> None:
    path = _csv(tmp_path, ["PatientID,StudyDescription", r"1,^CT (thorax|chest)\b"])
    pattern = read_request_file(path).rows[0].study_description
    assert pattern is not None and pattern.search("ct THORAX w/o contrast") and not pattern.search("MR THORAX")


# --- problems ----------------------------------------------------------------------------------------


def test_every_problem_of_the_file_is_reported_with_row_and_column(tmp_path: Path) -> None:
    path = _csv(
        tmp_path,
        [
            "PatientID,StudyInstanceUID,StudyDateFrom,StudyDateUntil,Modality,StudyDescription,Note",
            "001,,2020-13-01,,,,",  # row 2: no such month
            "002,1.2.3..4,,,,,",  # row 3: bad UID
            "003,,20210101,20200101,,,",  # row 4: From after Until
            "004,,,,,CT([,",  # row 5: invalid regex
            ",,20200101,,CT,,only a window",  # row 6: names no ID
            "005,,yesterday,,,,",  # row 7: not a date
            "006,,,,C-T,,",  # row 8: not a modality code
            "00*,,,,,,",  # row 9: wildcard in an ID
            "010,1.2.840.10008,20200101,20201231,CT,thorax,fine",  # row 10: fine
        ],
    )
    error = _problems(path)
    assert len(error.problems) == 8
    message = str(error)
    assert "8 problems" in message
    assert "row 2, column 'StudyDateFrom': '2020-13-01' is not a real calendar date" in message
    assert "row 3, column 'StudyInstanceUID': '1.2.3..4' is not a DICOM UID" in message
    assert "row 4, column 'StudyDateFrom': StudyDateFrom 20210101 is after StudyDateUntil 20200101" in message
    assert "row 5, column 'StudyDescription': 'CT([' is not a valid regular expression" in message
    assert "row 6: names none of PatientID, AccessionNumber, StudyInstanceUID" in message
    assert (
        "row 7, column 'StudyDateFrom': 'yesterday' is not a date; write YYYYMMDD, YYYY-MM-DD or DD.MM.YYYY" in message
    )
    assert "row 8, column 'Modality': 'C-T' is not a DICOM modality code" in message
    assert "row 9, column 'PatientID': '00*' contains *" in message
    assert "row 10" not in message


def test_many_problems_are_all_kept_but_the_message_stops_at_twenty(tmp_path: Path) -> None:
    path = _csv(tmp_path, ["PatientID,StudyDateFrom"] + [f"{i},not-a-date" for i in range(25)])
    error = _problems(path)
    assert len(error.problems) == 25
    assert "row 21, column 'StudyDateFrom'" in str(error) and "row 22," not in str(error)
    assert str(error).endswith("and 5 more")


def test_uid_longer_than_64_characters_is_refused(tmp_path: Path) -> None:
    uid = "1." + "2" * 63
    error = _problems(_csv(tmp_path, ["StudyInstanceUID", uid]))
    assert "row 2, column 'StudyInstanceUID': the UID is 65 characters long" in str(error)


def test_a_header_without_any_id_column_says_which_columns_it_found(tmp_path: Path) -> None:
    error = _problems(_csv(tmp_path, ["MRN,Date", "000123,20200101"]))
    assert error.problems == [
        (
            "row 1: the header names none of PatientID, AccessionNumber, StudyInstanceUID (found: 'MRN', 'Date'); "
            "row 1 must be the header, with at least one of these columns"
        )
    ]


def test_a_column_named_twice_and_a_value_without_a_header_are_problems(tmp_path: Path) -> None:
    path = _csv(tmp_path, ["PatientID,Patient ID,,Note", "1,2,,a", "3,4,lost,b,also lost"])
    problems = _problems(path).problems
    assert any("the column 'PatientID' appears twice (A and B)" in p for p in problems)
    assert any(p.startswith("row 3, column 3: 'lost' is in a column without a header") for p in problems)
    assert any(p.startswith("row 3, column 5: 'also lost'") for p in problems)


@pytest.mark.parametrize("name", ["cohort.xls", "cohort.txt", "cohort"])
def test_other_file_types_are_refused_with_the_fix(tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    path.write_text("PatientID\n1\n")
    assert "save the spreadsheet as .xlsx (Excel Workbook) or .csv (CSV UTF-8)" in str(_problems(path))


def test_a_csv_that_is_not_utf8_says_how_to_export_it(tmp_path: Path) -> None:
    path = tmp_path / "cohort.csv"
    path.write_bytes("PatientID;Name\n001;Müller\n".encode("cp1252"))
    assert "row 2: byte 0xfc is not UTF-8; in Excel use Save As > 'CSV UTF-8 (Comma delimited)'" in str(_problems(path))


def test_empty_and_header_only_files_are_refused(tmp_path: Path) -> None:
    assert "the file has no header" in str(_problems(_csv(tmp_path, [""], name="empty.csv")))
    assert "has a header but no data rows" in str(_problems(_csv(tmp_path, ["PatientID", ",", ""], name="h.csv")))


def test_sheet_argument_is_refused_for_csv(tmp_path: Path) -> None:
    assert "is a CSV file, which has no sheets" in str(_problems(_csv(tmp_path, ["PatientID", "1"]), sheet="Sheet1"))


# --- keys, duplicates, content hash ---------------------------------------------------------------------


def _keys(request: RequestFile) -> dict[str | None, str]:
    return {r.patient_id: r.key for r in request.rows}


def test_key_is_stable_when_rows_move_and_changes_with_the_window(tmp_path: Path) -> None:
    header = "PatientID,StudyDateFrom,StudyDateUntil,Modality,Note"
    first = read_request_file(_csv(tmp_path, [header, "001,20200101,20201231,CT\\MR,a", "002,,,,b"], name="a.csv"))
    moved = read_request_file(
        _csv(tmp_path, [header, "", "002,,,,other note", '001,2020-01-01,31.12.2020,"mr, ct",c'], name="b.csv")
    )
    assert [r.row for r in moved.rows] == [3, 4]
    assert _keys(first) == _keys(moved)  # other rows, other free columns, other date spelling: same request
    widened = read_request_file(_csv(tmp_path, [header, "001,20190101,20201231,CT\\MR,a"], name="c.csv"))
    assert _keys(widened)["001"] != _keys(first)["001"]
    assert len({first.rows[0].key, first.rows[1].key}) == 2


def test_duplicate_rows_are_kept_and_flagged(tmp_path: Path) -> None:
    path = _csv(tmp_path, ["PatientID,Modality,Note", "001,CT,a", "002,CT,b", "001,ct,c", "001,MR,d"])
    request = read_request_file(path)
    assert [r.row for r in request.rows] == [2, 3, 4, 5]
    assert request.duplicates == {request.rows[0].key: (2, 4)}


def test_content_hash_follows_the_bytes(tmp_path: Path) -> None:
    path = _csv(tmp_path, ["PatientID", "001"])
    before = read_request_file(path).content_sha256
    assert read_request_file(_csv(tmp_path, ["PatientID", "001"], name="copy.csv")).content_sha256 == before
    path.write_text("PatientID\n001\n002\n")
    assert read_request_file(path).content_sha256 != before
    assert len(before) == 64


# --- XLSX --------------------------------------------------------------------------------------------------


def test_xlsx_text_ids_dates_and_free_columns(tmp_path: Path) -> None:
    path = _xlsx(
        tmp_path,
        {
            "Cohort": [
                ["Patient ID", "StudyDateFrom", "Study_Date_Until", "Modality", "Age", "Pseudonym"],
                ["000123", dt.datetime(2020, 1, 31), "2020-12-31", "CT, MR", 42, "P-01"],
                [None, None, None, None, None, None],
                ["0042", dt.date(2019, 2, 1), None, None, 61.5, "P-02"],
                [None, None, None, None, None, None],
            ]
        },
    )
    request = read_request_file(path)
    assert [(r.row, r.patient_id, r.study_date_from, r.study_date_until) for r in request.rows] == [
        (2, "000123", "20200131", "20201231"),
        (4, "0042", "20190201", None),
    ]
    assert request.rows[0].modalities == ("CT", "MR")
    assert request.extra_columns == ("Age", "Pseudonym")
    assert [r.extra for r in request.rows] == [{"Age": "42", "Pseudonym": "P-01"}, {"Age": "61.5", "Pseudonym": "P-02"}]


def test_xlsx_number_cells_in_id_columns_name_the_cell_and_say_format_as_text(tmp_path: Path) -> None:
    path = _xlsx(
        tmp_path,
        {
            "Sheet1": [
                ["Note", "PatientID", "AccessionNumber"],
                ["a", "000123", None],
                ["b", "000124", None],
                ["c", "000125", None],
                ["d", "000126", None],
                ["e", "000127", None],
                ["f", 123, None],
                ["g", None, dt.datetime(2020, 1, 2)],
            ]
        },
    )
    error = _problems(path)
    assert len(error.problems) == 2
    assert error.problems[0].startswith(
        "sheet 'Sheet1' cell B7 (column 'PatientID'): '123' is stored as a number, so leading zeros Excel dropped"
    )
    assert "format the PatientID column as Text in Excel" in error.problems[0]
    assert error.problems[1].startswith(
        "sheet 'Sheet1' cell C8 (column 'AccessionNumber'): '2020-01-02' is stored as a date"
    )


def test_xlsx_problems_name_the_cell(tmp_path: Path) -> None:
    path = _xlsx(
        tmp_path,
        {
            "Data": [
                ["PatientID", "StudyDateFrom", "StudyDateUntil", "StudyDescription"],
                ["1", "2021-01-01", dt.datetime(2020, 1, 1), None],
                ["2", None, None, "(unclosed"],
            ]
        },
    )
    problems = _problems(path).problems
    assert problems[0].startswith(
        "sheet 'Data' cell B2 (column 'StudyDateFrom'): StudyDateFrom 20210101 is after StudyDateUntil 20200101 "
        "(sheet 'Data' cell C2 (column 'StudyDateUntil')); swap them"
    )
    assert problems[1].startswith(
        "sheet 'Data' cell D3 (column 'StudyDescription'): '(unclosed' is not a valid regular expression"
    )


def test_xlsx_reads_the_first_sheet_or_the_named_one(tmp_path: Path) -> None:
    path = _xlsx(tmp_path, {"Readme": [["PatientID"], ["first"]], "Cohort": [["AccessionNumber"], ["A-1"]]})
    assert read_request_file(path).rows[0].patient_id == "first"
    assert read_request_file(path, sheet="Cohort").rows[0].accession_number == "A-1"
    assert "has no sheet 'Nope' (its sheets: 'Readme', 'Cohort')" in str(_problems(path, sheet="Nope"))


def test_a_file_named_xlsx_that_is_not_a_workbook(tmp_path: Path) -> None:
    path = tmp_path / "cohort.xlsx"
    path.write_text("PatientID\n1\n")
    assert "cannot be opened as an Excel workbook" in str(_problems(path))


def test_xlsx_with_a_stale_dimension_tag_is_read_in_full(tmp_path: Path) -> None:
    """Some exporters write <dimension ref="A1" /> whatever the size; openpyxl's read-only mode
    would then stop after cell A1 and silently drop the cohort."""
    import zipfile

    written = _xlsx(tmp_path, {"Sheet1": [["PatientID", "Note"], ["001", "a"], ["002", "b"]]}, name="written.xlsx")
    path = tmp_path / "stale.xlsx"
    with zipfile.ZipFile(written) as source, zipfile.ZipFile(path, "w") as target:
        for item in source.infolist():
            data = source.read(item.filename)
            if item.filename == "xl/worksheets/sheet1.xml":
                assert b'<dimension ref="A1:B3" />' in data
                data = data.replace(b'<dimension ref="A1:B3" />', b'<dimension ref="A1" />')
            target.writestr(item, data)
    request = read_request_file(path)
    assert [(r.patient_id, r.extra) for r in request.rows] == [("001", {"Note": "a"}), ("002", {"Note": "b"})]
