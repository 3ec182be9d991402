"""The cohort request file: the spreadsheet an IRB protocol hands the imaging team, read row by row.

A researcher's spreadsheet (CSV or XLSX) names patients (PatientID), examinations
(AccessionNumber) or studies (StudyInstanceUID), optionally with a StudyDate window, the
modalities wanted and a StudyDescription regex per row. Every row must later get an answer, so
each row keeps its row number as the researcher sees it (header = row 1, first data row = 2) and
every column we do not know is carried through unchanged for the report.

Reading is strict because a silently wrong cohort is worse than a refused file: an ID that Excel
turned into a number (``000123`` -> ``123``) cannot be repaired, so it is an error that names the
cell and says how to fix the column. All problems of a file are collected and raised together
(:class:`RequestFileError`) so the researcher fixes the file in one go instead of one error per
round trip.

Accepted, per column (headers match case-, space- and underscore-insensitively, so ``PatientID``,
``Patient ID`` and ``patient_id`` are the same column):

* ``PatientID``, ``AccessionNumber``: text, kept exactly (leading zeros, inner spaces); only the
  ends are stripped. No ``*``, ``?`` or ``\\`` (a PACS query would treat them as wildcards or as
  several values, silently widening the cohort).
* ``StudyInstanceUID``: a DICOM UID: digits separated by single dots, at most 64 characters.
* ``StudyDateFrom``, ``StudyDateUntil``: ``YYYYMMDD``, ``YYYY-MM-DD`` or ``DD.MM.YYYY`` (day and
  month may have one digit), or an Excel date cell; normalised to ``YYYYMMDD``. From <= Until.
* ``Modality``: one or several DICOM modality codes separated by ``\\``, ``,``, ``;``, ``/`` or
  spaces (``CT, MR``); upper-cased, duplicates dropped.
* ``StudyDescription``: a Python regular expression, compiled case-insensitively at read time
  (to be searched in the PACS's StudyDescription).
* every other column: a free column, carried through in file order.
"""

from __future__ import annotations

import csv
import datetime as dt
import hashlib
import io
import json
import re
import warnings
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import openpyxl
from openpyxl.utils.exceptions import InvalidFileException

#: File types a request file may have (by extension, lower case).
REQUEST_FILE_SUFFIXES: tuple[str, ...] = (".csv", ".xlsx")
#: How many problems the error message lists before "and N more".
MAX_PROBLEMS_SHOWN = 20

ID_FIELDS: tuple[str, ...] = ("patient_id", "accession_number", "study_instance_uid")
#: Canonical column name -> RequestRow field.
KNOWN_COLUMNS: dict[str, str] = {
    "PatientID": "patient_id",
    "AccessionNumber": "accession_number",
    "StudyInstanceUID": "study_instance_uid",
    "StudyDateFrom": "study_date_from",
    "StudyDateUntil": "study_date_until",
    "Modality": "modalities",
    "StudyDescription": "study_description",
}
_CSV_DELIMITERS = (",", ";", "\t")
_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")
_MODALITY = re.compile(r"^[A-Z0-9_]{1,16}$")
_MODALITY_SEPARATORS = re.compile(r"[\\,;/\s]+")
_QUERY_SPECIAL = ("*", "?", "\\")
_DATE_PATTERNS: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r"^\d{8}$"), "%Y%m%d"),
    (re.compile(r"^\d{4}-\d{2}-\d{2}$"), "%Y-%m-%d"),
    (re.compile(r"^\d{1,2}\.\d{1,2}\.\d{4}$"), "%d.%m.%Y"),
)
_DATE_HINT = "write YYYYMMDD, YYYY-MM-DD or DD.MM.YYYY"


class RequestFileError(ValueError):
    """The request file cannot be used as it is; the message lists every problem found.

    ``problems`` holds each one (file location first), for a UI that shows them as a list.
    """

    def __init__(self, path: Path, problems: Sequence[str]) -> None:
        self.path = path
        self.problems = list(problems)
        super().__init__(_problems_message(path, self.problems))


def _problems_message(path: Path, problems: Sequence[str]) -> str:
    """One header line naming the file, then up to MAX_PROBLEMS_SHOWN problems, then the rest counted."""
    count = len(problems)
    summary = "1 problem; fix it" if count == 1 else f"{count} problems; fix them all"
    lines = [f"request file {path}: {summary} in the file and save it again:"]
    lines += [f"  {p}" for p in problems[:MAX_PROBLEMS_SHOWN]]
    if count > MAX_PROBLEMS_SHOWN:
        lines.append(f"  and {count - MAX_PROBLEMS_SHOWN} more")
    return "\n".join(lines)


@dataclass(frozen=True)
class RequestRow:
    """One data row of the request file: what the researcher asked for, and where it stands.

    ``row`` is the row number as the researcher sees it in the spreadsheet (header = 1), so an
    answer can point back at it. Fields are None when their cell is empty (or the column absent).
    """

    row: int
    patient_id: str | None = None
    accession_number: str | None = None
    study_instance_uid: str | None = None
    study_date_from: str | None = None
    study_date_until: str | None = None
    modalities: tuple[str, ...] | None = None
    study_description: re.Pattern[str] | None = None
    extra: dict[str, str] = field(default_factory=dict, hash=False)

    @property
    def key(self) -> str:
        """A hash of what the row asks for, not where it is.

        Moving or re-sorting rows keeps every key (the row is not "new"); changing an ID, the
        window, the modalities or the description regex changes it (it is a new request). Dates
        are hashed normalised and modalities sorted, so ``2020-01-02`` and ``20200102`` or
        ``MR,CT`` and ``CT\\MR`` are the same request. Free columns are not part of it.
        """
        known = {
            "patient_id": self.patient_id,
            "accession_number": self.accession_number,
            "study_instance_uid": self.study_instance_uid,
            "study_date_from": self.study_date_from,
            "study_date_until": self.study_date_until,
            "modalities": sorted(self.modalities) if self.modalities else None,
            "study_description": self.study_description.pattern if self.study_description else None,
        }
        canonical = json.dumps(known, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
        return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class RequestFile:
    """A request file as read: its rows in file order, its free columns, and a hash of its bytes.

    ``content_sha256`` lets a sensor notice that the researcher edited the file.
    """

    path: Path
    rows: tuple[RequestRow, ...]
    extra_columns: tuple[str, ...]
    content_sha256: str

    @property
    def duplicates(self) -> dict[str, tuple[int, ...]]:
        """Keys asked for by more than one row -> those row numbers (both rows are kept).

        Duplicates are flagged, not refused: the rows may differ in their free columns and the
        researcher expects an answer on each.
        """
        rows_by_key: dict[str, list[int]] = {}
        for row in self.rows:
            rows_by_key.setdefault(row.key, []).append(row.row)
        return {key: tuple(rows) for key, rows in rows_by_key.items() if len(rows) > 1}


# --- reading the file into a table of raw cells -------------------------------------------------


@dataclass
class _Table:
    """The file's cells before interpretation: header texts and (row number, raw values) pairs.

    CSV values are strings; XLSX values are whatever openpyxl read (str, int, float, datetime,
    bool or None), so the column rules can tell a text ID from a number cell.
    """

    header: list[str]
    rows: list[tuple[int, list[object]]]
    sheet: str | None = None  # XLSX only: the sheet read, for "sheet 'X' cell B7" locations

    def cell(self, row: int, col: int) -> str:
        """Where a cell is, as the researcher finds it: ``row 7, column 'X'`` or ``sheet 'S' cell B7``."""
        name = self.header[col] if col < len(self.header) and self.header[col] else None
        column = f"column '{name}'" if name else f"column {col + 1}"
        if self.sheet is None:
            return f"row {row}, {column}"
        return f"sheet '{self.sheet}' cell {_column_letter(col)}{row} ({column})"

    def row_at(self, row: int) -> str:
        """A whole row's location (for problems that belong to no single cell)."""
        return f"row {row}" if self.sheet is None else f"sheet '{self.sheet}' row {row}"


def _column_letter(col: int) -> str:
    """Excel's column letters for a 0-based index (0 -> A, 26 -> AA)."""
    letters = ""
    number = col + 1
    while number:
        number, rest = divmod(number - 1, 26)
        letters = chr(ord("A") + rest) + letters
    return letters


def _fail(path: Path, problem: str) -> RequestFileError:
    """A single-problem error, for problems that stop reading the file at all."""
    return RequestFileError(path, [problem])


def _csv_table(path: Path, data: bytes) -> _Table:
    """Decode (UTF-8, BOM or not) and split a CSV export; the delimiter is taken from the header."""
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise _fail(
            path,
            f"row {line}: byte 0x{data[exc.start]:02x} is not UTF-8; in Excel use "
            "Save As > 'CSV UTF-8 (Comma delimited)' (plain 'CSV' uses the Windows code page)",
        ) from None
    delimiter = _sniff_delimiter(path, text)
    records = list(csv.reader(io.StringIO(text, newline=""), delimiter=delimiter, strict=False))
    if not records:
        return _Table(header=[], rows=[])
    header = [h.strip() for h in records[0]]
    rows = [(number, list(values)) for number, values in enumerate(records[1:], start=2)]
    return _Table(header=header, rows=rows)


def _sniff_delimiter(path: Path, text: str) -> str:
    """The delimiter among ``,`` ``;`` and tab that occurs most often in the header line.

    The header line decides (column names rarely contain delimiters; free text in data rows
    often contains commas). Quoted parts are ignored. A header with no delimiter is a
    single-column file, read with ``,``; a tie between two delimiters is refused.
    """
    first_line = re.split(r"\r\n|\r|\n", text, maxsplit=1)[0]
    unquoted = re.sub(r'"[^"]*"', "", first_line)
    counts = {d: unquoted.count(d) for d in _CSV_DELIMITERS}
    best = max(counts.values())
    winners = [d for d, n in counts.items() if n == best]
    if best == 0:
        return ","
    if len(winners) > 1:
        shown = " and ".join(repr(d) for d in winners)
        raise _fail(path, f"row 1: cannot tell the delimiter: the header has as many {shown}; use one of them only")
    return winners[0]


def _xlsx_table(path: Path, data: bytes, sheet: str | None) -> _Table:
    """Every cell of one worksheet (the first, or ``sheet``) as openpyxl stored it.

    Read-only mode streams the sheet; ``data_only`` gives formula cells their last computed
    value (e.g. ``=TEXT(A2,"000000")``), as Excel shows them.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "no default style" and the like: harmless
            workbook = openpyxl.load_workbook(io.BytesIO(data), read_only=True, data_only=True)
    except (zipfile.BadZipFile, InvalidFileException, KeyError, ValueError, OSError) as exc:
        raise _fail(
            path,
            f"the file cannot be opened as an Excel workbook ({exc}); open it in Excel and Save As 'Excel Workbook (.xlsx)'",
        ) from None
    try:
        if sheet is not None and sheet not in workbook.sheetnames:
            names = ", ".join(repr(n) for n in workbook.sheetnames)
            raise _fail(path, f"the file has no sheet {sheet!r} (its sheets: {names}); name one of them")
        if not workbook.worksheets:
            raise _fail(path, "the file has no worksheet; put the request on the first sheet")
        worksheet = workbook[sheet] if sheet is not None else workbook.worksheets[0]
        worksheet.reset_dimensions()  # the file's <dimension> tag may be stale ("A1"): read every row
        records = [list(values) for values in worksheet.iter_rows(values_only=True)]
        title = worksheet.title
    finally:
        workbook.close()
    if not records:
        return _Table(header=[], rows=[], sheet=title)
    header = [_header_text(value) for value in records[0]]
    rows = [(number, values) for number, values in enumerate(records[1:], start=2)]
    return _Table(header=header, rows=rows, sheet=title)


def _header_text(value: object) -> str:
    """A header cell as text (a header typed as a number or date still names a column)."""
    return "" if value is None else _free_text(value).strip()


# --- interpreting the table -----------------------------------------------------------------------


def _normalise_header(name: str) -> str:
    """``Patient ID``, ``patient_id`` and ``PATIENTID`` all become ``patientid``."""
    return re.sub(r"[\s_]+", "", name).lower()


_HEADER_LOOKUP = {_normalise_header(column): f for column, f in KNOWN_COLUMNS.items()}


@dataclass
class _Columns:
    """Which column index holds which known field, and the free columns in file order."""

    known: dict[str, int]
    free: list[tuple[str, int]]
    unnamed: set[int]
    reported: set[int] = field(default_factory=set)  # header-less columns already reported


def _map_columns(table: _Table, problems: list[str]) -> _Columns:
    """Match the header to the known columns; a column named twice or no ID column is a problem."""
    known: dict[str, int] = {}
    free: list[tuple[str, int]] = []
    unnamed: set[int] = set()
    seen: dict[str, int] = {}
    for col, name in enumerate(table.header):
        if not name:
            unnamed.add(col)
            continue
        field_name = _HEADER_LOOKUP.get(_normalise_header(name))
        identity = field_name or name
        if identity in seen:
            first = table.header[seen[identity]]
            problems.append(
                f"{table.cell(1, col)}: the column {first!r} appears twice ({_column_letter(seen[identity])} and "
                f"{_column_letter(col)}); delete or rename one of them"
            )
            continue
        seen[identity] = col
        if field_name:
            known[field_name] = col
        else:
            free.append((name, col))
    if not any(f in known for f in ID_FIELDS):
        found = ", ".join(repr(h) for h in table.header if h) or "none"
        problems.append(
            f"{table.row_at(1)}: the header names none of PatientID, AccessionNumber, StudyInstanceUID "
            f"(found: {found}); row 1 must be the header, with at least one of these columns"
        )
    return _Columns(known=known, free=free, unnamed=unnamed)


def _is_blank(value: object) -> bool:
    """An empty cell: nothing, or only whitespace."""
    return value is None or (isinstance(value, str) and not value.strip())


def _free_text(value: object) -> str:
    """A cell as text for the report: numbers without a spurious ``.0``, dates as ISO dates."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "TRUE" if value else "FALSE"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, dt.datetime):
        return value.date().isoformat() if value.time() == dt.time() else value.isoformat(sep=" ")
    return str(value)


def _text_cell(value: object, where: str, problems: list[str], column: str) -> str | None:
    """An ID cell's text, stripped at the ends only, so ``000123`` and ``AB 12`` survive.

    A number or date cell is refused: its original text is gone (see _not_text_problem).
    """
    if _is_blank(value):
        return None
    if not isinstance(value, str):
        problems.append(_not_text_problem(value, where, column))
        return None
    return value.strip()


def _id_value(value: object, where: str, problems: list[str], *, column: str) -> str | None:
    """A PatientID or AccessionNumber: text without query wildcards, at most 64 characters."""
    text = _text_cell(value, where, problems, column)
    if text is None:
        return None
    special = [c for c in _QUERY_SPECIAL if c in text]
    if special:
        problems.append(
            f"{where}: {text!r} contains {' '.join(special)}, which a PACS query reads as a wildcard or a "
            "value separator; a row names one exact ID: remove the character"
        )
        return None
    if len(text) > 64:
        problems.append(f"{where}: {text[:20]!r}... is {len(text)} characters, longer than a DICOM ID (64)")
        return None
    return text


def _not_text_problem(value: object, where: str, column: str) -> str:
    """Why a number or date cell cannot be an ID, and how to fix the column in Excel."""
    kind = "a date" if isinstance(value, (dt.date, dt.time)) else "a number"
    return (
        f"{where}: {_free_text(value)!r} is stored as {kind}, so leading zeros Excel dropped "
        f"(000123 -> 123) cannot be recovered; format the {column} column as Text in Excel "
        "(Home > Number format > Text), type the IDs again as written in the PACS, and save"
    )


def _uid_value(value: object, where: str, problems: list[str]) -> str | None:
    """A StudyInstanceUID: digits and single dots, at most 64 characters (DICOM PS3.5 9.1)."""
    text = _text_cell(value, where, problems, "StudyInstanceUID")
    if text is None:
        return None
    if not _UID.match(text):
        problems.append(f"{where}: {text!r} is not a DICOM UID (digits separated by single dots, like 1.2.840.10008.1)")
        return None
    if len(text) > 64:
        problems.append(f"{where}: the UID is {len(text)} characters long; a DICOM UID has at most 64")
        return None
    return text


def _date_value(value: object, where: str, problems: list[str]) -> str | None:
    """A date cell as ``YYYYMMDD``: an Excel date, or text in one of the accepted formats."""
    if _is_blank(value):
        return None
    if isinstance(value, (dt.datetime, dt.date)):
        return value.strftime("%Y%m%d")
    text = _free_text(value).strip()
    for pattern, fmt in _DATE_PATTERNS:
        if pattern.match(text):
            try:
                return dt.datetime.strptime(text, fmt).strftime("%Y%m%d")
            except ValueError:
                problems.append(f"{where}: {text!r} is not a real calendar date; check day and month")
                return None
    problems.append(f"{where}: {text!r} is not a date; {_DATE_HINT}")
    return None


def _modalities_value(value: object, where: str, problems: list[str]) -> tuple[str, ...] | None:
    """Modality codes split on ``\\ , ; /`` or spaces, upper-cased, first occurrence kept."""
    if _is_blank(value):
        return None
    codes: list[str] = []
    for token in _MODALITY_SEPARATORS.split(_free_text(value).strip()):
        code = token.upper()
        if not code or code in codes:
            continue
        if not _MODALITY.match(code):
            problems.append(
                f"{where}: {token!r} is not a DICOM modality code (like CT, MR, PT); "
                "separate several with a comma, like 'CT, MR'"
            )
            return None
        codes.append(code)
    return tuple(codes) or None


def _regex_value(value: object, where: str, problems: list[str]) -> re.Pattern[str] | None:
    """The StudyDescription regex, compiled case-insensitively now so a typo fails at read time."""
    if _is_blank(value):
        return None
    text = _free_text(value).strip()
    try:
        return re.compile(text, re.IGNORECASE)
    except re.error as exc:
        problems.append(
            f"{where}: {text!r} is not a valid regular expression ({exc}); fix it, or put \\ before "
            "characters meant literally, like \\( or \\."
        )
        return None


#: RequestRow field -> reader(raw cell value, cell location, problems) -> value or None.
_READERS: dict[str, Callable[[object, str, list[str]], object]] = {
    "patient_id": partial(_id_value, column="PatientID"),
    "accession_number": partial(_id_value, column="AccessionNumber"),
    "study_instance_uid": _uid_value,
    "study_date_from": _date_value,
    "study_date_until": _date_value,
    "modalities": _modalities_value,
    "study_description": _regex_value,
}


def _parse_row(
    table: _Table, columns: _Columns, number: int, values: list[object], problems: list[str]
) -> RequestRow | None:
    """One data row -> a RequestRow, or None when it is fully empty or has a problem (recorded)."""
    if all(_is_blank(v) for v in values):
        return None
    before = len(problems)
    parsed: dict[str, object] = {}
    for field_name, reader in _READERS.items():
        col = columns.known.get(field_name)
        if col is None:
            parsed[field_name] = None
        else:
            value = values[col] if col < len(values) else None
            parsed[field_name] = reader(value, table.cell(number, col), problems)
    _check_unheaded_cells(table, columns, number, values, problems)
    _check_window(table, columns, number, parsed, problems)
    if len(problems) == before and not any(parsed[f] for f in ID_FIELDS):
        problems.append(
            f"{table.row_at(number)}: names none of PatientID, AccessionNumber, StudyInstanceUID; "
            "fill in one of them, or delete the row"
        )
    if len(problems) > before:
        return None
    extra = {name: _free_text(values[col] if col < len(values) else None) for name, col in columns.free}
    return RequestRow(row=number, extra=extra, **parsed)  # type: ignore[arg-type]


def _check_window(
    table: _Table, columns: _Columns, number: int, parsed: dict[str, object], problems: list[str]
) -> None:
    """A StudyDateFrom after its StudyDateUntil selects nothing: almost always swapped columns."""
    start, end = parsed["study_date_from"], parsed["study_date_until"]
    if isinstance(start, str) and isinstance(end, str) and start > end:
        where = table.cell(number, columns.known["study_date_from"])
        problems.append(
            f"{where}: StudyDateFrom {start} is after StudyDateUntil {end} "
            f"({table.cell(number, columns.known['study_date_until'])}); swap them"
        )


def _check_unheaded_cells(
    table: _Table, columns: _Columns, number: int, values: list[object], problems: list[str]
) -> None:
    """A value in a column without a header would be lost silently: report it (once per column)."""
    width = len(table.header)
    for col, value in enumerate(values):
        headerless = col >= width or col in columns.unnamed
        if _is_blank(value) or not headerless or col in columns.reported:
            continue
        columns.reported.add(col)
        problems.append(
            f"{table.cell(number, col)}: {_free_text(value)!r} is in a column without a header; "
            "give the column a header in row 1 or clear it"
        )


def _parse_table(path: Path, table: _Table) -> tuple[list[RequestRow], list[str]]:
    """All rows of the table, or RequestFileError listing every problem of the file."""
    problems: list[str] = []
    if not table.header or not any(table.header):
        raise _fail(path, f"{table.row_at(1)}: the file has no header; row 1 must name the columns (PatientID, ...)")
    columns = _map_columns(table, problems)
    if not any(f in columns.known for f in ID_FIELDS):
        raise RequestFileError(path, problems)  # every row would repeat "names no ID": stop here
    rows = [r for number, values in table.rows if (r := _parse_row(table, columns, number, values, problems))]
    if problems:
        raise RequestFileError(path, problems)
    if not rows:
        raise _fail(path, "the file has a header but no data rows; add one row per patient, examination or study")
    return rows, [name for name, _ in columns.free]


def read_request_file(path: str | Path, sheet: str | None = None) -> RequestFile:
    """Read a ``.csv`` or ``.xlsx`` request file (see the module docstring for the columns).

    CSV: UTF-8 with or without BOM, any line ends, delimiter ``,`` ``;`` or tab (from the
    header line). XLSX: the first worksheet, or ``sheet``; ID cells must be text cells.
    Raises RequestFileError naming every problem (file, row or cell, column, the fix).
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in REQUEST_FILE_SUFFIXES:
        raise _fail(
            path,
            f"the file is a {suffix or 'extension-less'} file; save the spreadsheet as .xlsx (Excel Workbook) or .csv (CSV UTF-8)",
        )
    if sheet is not None and suffix == ".csv":
        raise _fail(
            path, f"the file is a CSV file, which has no sheets (sheet={sheet!r} was given); leave the sheet out"
        )
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise _fail(path, f"the file cannot be read: {exc.strerror or exc}") from None
    table = _csv_table(path, data) if suffix == ".csv" else _xlsx_table(path, data, sheet)
    rows, extra_columns = _parse_table(path, table)
    return RequestFile(
        path=path,
        rows=tuple(rows),
        extra_columns=tuple(extra_columns),
        content_sha256=hashlib.sha256(data).hexdigest(),
    )
