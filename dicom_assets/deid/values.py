"""Replacement values: dummies by VR, shifted dates, empty values.

**Dummies (action D)** say "there was a value" and nothing else: ``ANONYMIZED`` for strings (fits
every string VR's length, valid CS and AE characters), 1900-01-01 / 00:00 for dates and times
(only when dates are not shifted; with Retain Longitudinal Modified Dates a D date is shifted
like every other date), 0 for numbers, two zero bytes for binary values.

**Date shifts** move DA values and the date part of DT values by whole days; the time of day, the
fraction and the UTC offset of a DT are kept (a date shifted by days keeps every interval of the
patient's history, and a time without its date identifies nobody). A value that is not a date
(``00000000``, a partial DT ``2019`` or ``201903``, garbage) cannot be shifted without guessing,
so it is emptied: nothing of it survives.
"""

from __future__ import annotations

import datetime as dt
import re

__all__ = ["DUMMY_TEXT", "dummy_value", "empty_value", "shift_da", "shift_dt", "shift_value"]

DUMMY_TEXT = "ANONYMIZED"
_DUMMIES: dict[str, object] = {
    "AE": DUMMY_TEXT, "CS": DUMMY_TEXT, "LO": DUMMY_TEXT, "SH": DUMMY_TEXT, "LT": DUMMY_TEXT, "ST": DUMMY_TEXT,
    "UT": DUMMY_TEXT, "UC": DUMMY_TEXT, "PN": DUMMY_TEXT, "UR": DUMMY_TEXT,
    "DA": "19000101", "TM": "000000", "DT": "19000101000000", "AS": "000D",
    "IS": "0", "DS": "0", "US": 0, "SS": 0, "UL": 0, "SL": 0, "UV": 0, "SV": 0, "FL": 0.0, "FD": 0.0,
    "AT": 0, "OB": b"\x00\x00", "OW": b"\x00\x00", "OD": b"\x00" * 8, "OF": b"\x00" * 4, "OL": b"\x00" * 4,
    "OV": b"\x00" * 8, "UN": b"\x00\x00",
}  # fmt: skip
_BINARY_VRS = frozenset({"OB", "OW", "OD", "OF", "OL", "OV", "UN"})
_NUMBER_VRS = frozenset({"US", "SS", "UL", "SL", "UV", "SV", "FL", "FD", "AT"})
_DT = re.compile(r"^(\d{8})(\d{0,6}(?:\.\d{1,6})?)([+-]\d{4})?$")


def dummy_value(vr: str) -> object:
    """A non-empty value of ``vr`` that carries nothing (a UI is never dummied: it is replaced)."""
    return _DUMMIES.get(vr, b"\x00\x00")


def empty_value(vr: str) -> object:
    """The zero-length value pydicom writes for ``vr``."""
    if vr == "SQ":
        return []
    if vr in _BINARY_VRS:
        return b""
    if vr in _NUMBER_VRS:
        return None
    return ""


def _parse_date(text: str) -> dt.date | None:
    if len(text) == 10 and text[4] == "." and text[7] == ".":  # ACR-NEMA 2.0 "YYYY.MM.DD"
        text = text[:4] + text[5:7] + text[8:]
    if len(text) != 8 or not text.isdigit():
        return None
    try:
        return dt.date(int(text[:4]), int(text[4:6]), int(text[6:8]))
    except ValueError:
        return None


def _shift(date: dt.date, days: int) -> str | None:
    try:
        return (date + dt.timedelta(days=days)).strftime("%Y%m%d")
    except OverflowError:
        return None


def shift_da(value: str, days: int) -> str | None:
    """One DA value shifted by ``days``; None when it is not a full date."""
    date = _parse_date(value.strip())
    return _shift(date, days) if date else None


def shift_dt(value: str, days: int) -> str | None:
    """One DT value with its date part shifted, time/fraction/offset kept; None when the value
    does not start with a full date."""
    match = _DT.match(value.strip())
    if not match:
        return None
    date = _parse_date(match.group(1))
    shifted = _shift(date, days) if date else None
    return None if shifted is None else shifted + match.group(2) + (match.group(3) or "")


def shift_value(vr: str, text: str, days: int) -> str:
    """A whole (possibly multi-valued) DA or DT string shifted; every value that cannot be shifted
    makes the whole result empty (a partly shifted attribute would still hold an original)."""
    shift = shift_da if vr == "DA" else shift_dt
    out = []
    for part in text.split("\\"):
        if not part.strip():
            out.append("")
            continue
        moved = shift(part, days)
        if moved is None:
            return ""
        out.append(moved)
    return "\\".join(out)
