"""Instances that carry a unique marker in every attribute de-identification must clear.

Issue 12's proof of de-identification is a search: put a marker string where identity could be,
de-identify, then look for every marker in the BYTES of every output file. This module makes the
inputs. Every attribute of PS3.15 Table E.1-1 (:data:`dicom_assets.deid.profile.TABLE`) that can
hold a value gets one, at the top level and inside an item of every listed sequence:

* text VRs (names, IDs, descriptions, addresses, comments, AE titles, code strings, URLs): a
  unique ``MRK0001``-style marker (free text as ``free text MRK0001``);
* binary VRs (OB, OW, UN...): the marker's bytes; attributes pydicom does not know: as UN;
* UIDs: fresh original UIDs (the originals are the markers), references included: the
  ReferencedSOPInstanceUID of every item names another instance of the series;
* dates: values in a 40-day band of January 1931 (dates cannot hold text; the band is far from
  any real study date, and narrow so a date shift rarely lands a date on another one); study,
  series, acquisition and content dates are the ``study_date`` given, so intervals can be checked;
* numbers, ages, sex: valid values (they cannot be found by a byte search; tests check them by
  parsing).

Plus private elements and a private sequence (group 0009), an overlay (group 6000) and a curve
(group 5000), free-text items in every sequence, and on the first instance a Digital Signatures
Sequence after the pixel data. One instance per transfer syntax: explicit and implicit VR
little endian, RLE Lossless (compressed, encapsulated), plus any other asked for (deflated,
big endian).

:func:`all_markers` lists what to search for; :func:`leaked_markers` searches bytes for them.
"""

from __future__ import annotations

import datetime as dt
import warnings
import zlib
from pathlib import Path
from typing import Iterable, Iterator, Mapping, Sequence

import numpy as np
from pydicom import dcmread
from pydicom.datadict import dictionary_VR
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filewriter import dcmwrite
from pydicom.uid import (
    CTImageStorage,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    RLELossless,
    UID,
    generate_uid,
)

from dicom_assets.deid import profile

__all__ = ["DEFAULT_SYNTAXES", "MARKER_DATE_BAND", "all_markers", "leaked_markers", "searchable_bytes", "write_marked_series"]

DEFAULT_SYNTAXES: tuple[str, ...] = (ExplicitVRLittleEndian, ImplicitVRLittleEndian, RLELossless, ExplicitVRLittleEndian)
DEFAULT_STUDY_DATE = dt.date(2019, 3, 4)
_DATE_BASE = dt.date(1931, 1, 1)
#: Marker dates are _DATE_BASE + 0..MARKER_DATE_BAND-1 days.
MARKER_DATE_BAND = 40
_UID_PREFIX = "1.2.826.0.1.3680043.8.498."
_WELL_KNOWN = "1.2.840.10008."
#: Set per instance, not by the marker loop (identity and structure of the instance).
_SPECIAL = {0x00080018, 0x0020000D, 0x0020000E, 0x00200052, 0x00100020, 0x00100010}
_TRAILING = {0xFFFAFFFA, 0xFFFCFFFC}  # after the pixel data: only on the first instance
_STUDY_DATES = {0x00080020, 0x00080021, 0x00080022, 0x00080023}
_VALID = {  # attributes whose VR-valid marker would be meaningless: realistic values instead
    0x00100040: "F", 0x00101010: "045Y", 0x00101020: "1.70", 0x00101030: "70", 0x001021A0: "NO",
}  # fmt: skip
_NUMBERS = {"US": 7, "SS": -7, "UL": 7, "SL": -7, "FL": 7.5, "FD": 7.5, "SV": 7, "UV": 7, "DS": "7.5", "IS": "7",
            "AT": 0x00100010}  # fmt: skip
_LONG_TEXT = {"LT", "ST", "UT", "UC"}


class _Book:
    """Hands out markers in a fixed order and remembers where each went."""

    def __init__(self) -> None:
        self.markers: dict[str, str] = {}
        self._dates = 0

    def text(self, where: str) -> str:
        marker = f"MRK{len(self.markers) + 1:04d}"
        self.markers[marker] = where
        return marker

    def date(self) -> str:
        self._dates += 1
        return (_DATE_BASE + dt.timedelta(days=self._dates % MARKER_DATE_BAND)).strftime("%Y%m%d")


def _vr(tag: int) -> str:
    try:
        return dictionary_VR(tag)[:2]
    except KeyError:
        return "UN"


def _value(book: _Book, tag: int, vr: str, where: str, study_date: str, uid: Iterator[str]) -> object:
    if tag in _VALID:
        return _VALID[tag]
    if vr in ("PN", "LO", "SH", "CS", "AE", "UR"):
        return book.text(where)
    if vr in _LONG_TEXT:
        return f"free text {book.text(where)}"
    if vr == "UI":
        return next(uid)
    if vr == "DA":
        return study_date if tag in _STUDY_DATES else book.date()
    if vr == "DT":
        return f"{book.date()}101112.123456"
    if vr == "TM":
        return "101112.123456"
    if vr == "AS":
        return "045Y"
    if vr in _NUMBERS:
        return _NUMBERS[vr]
    marker = book.text(where).encode("ascii") + b"\x00"
    return marker + b"\x00" * (-len(marker) % 8)  # OB/OW/OF/OD/UN...: the marker's bytes


def _item(book: _Book, where: str, code: bool, reference: str, uid: Iterator[str]) -> Dataset:
    """One sequence item with markers in table attributes (and code values for code sequences)."""
    item = Dataset()
    item.ReferencedSOPClassUID = CTImageStorage
    item.ReferencedSOPInstanceUID = reference
    item.add_new(0x00081160, "IS", "1")  # ReferencedFrameNumber: a K attribute next to the others
    item.PersonName = book.text(f"{where}.(0040,A123) PersonName")
    item.InstitutionName = book.text(f"{where}.(0008,0080) InstitutionName")
    item.Date = book.date()
    item.DateTime = f"{book.date()}080910"
    item.UID = next(uid)
    item.TextValue = f"free text {book.text(f'{where}.(0040,A160) TextValue')}"
    if code:
        item.CodeValue = book.text(f"{where}.(0008,0100) CodeValue")
        item.CodingSchemeDesignator = book.text(f"{where}.(0008,0102) CodingSchemeDesignator")
        item.CodeMeaning = book.text(f"{where}.(0008,0104) CodeMeaning")
    return item


def _fill(ds: Dataset, book: _Book, study_date: str, uid: Iterator[str], reference: str) -> None:
    """A marker in every Table E.1-1 attribute (top level and one item of every sequence)."""
    for tag in sorted(profile.TABLE):
        if tag >> 16 in (0x0000, 0x0002) or tag in _SPECIAL or tag in _TRAILING:
            continue
        vr = _vr(tag)
        where = f"({tag >> 16:04X},{tag & 0xFFFF:04X}) {profile.TABLE[tag].name}"
        if vr == "SQ":
            item = _item(book, where, profile.TABLE[tag].name.replace(" ", "").endswith("CodeSequence"), reference, uid)
            if tag == 0x00400275:  # RequestAttributesSequence: a sequence inside a sequence item
                item.ReferencedStudySequence = [_item(book, f"{where}.ReferencedStudySequence", False, reference, uid)]
            if tag == 0x0040A730:  # ContentSequence (kept, cleaned): a reference two levels down
                item.ReferencedImageSequence = [_item(book, f"{where}.ReferencedImageSequence", False, reference, uid)]
            ds.add(DataElement(tag, "SQ", [item]))
        else:
            ds.add(DataElement(tag, vr, _value(book, tag, vr, where, study_date, uid)))
    block = ds.private_block(0x0009, "MRK PRIVATE", create=True)
    block.add_new(0x01, "LO", book.text("(0009,xx01) private LO"))
    block.add_new(0x02, "UN", book.text("(0009,xx02) private UN").encode("ascii") + b" ")
    block.add_new(0x03, "SQ", [_item(book, "(0009,xx03) private sequence", False, reference, uid)])
    safe = ds.private_block(0x0011, "MRK SAFE", create=True)  # for tests of Retain Safe Private
    safe.add_new(0x01, "LO", book.text("(0011,xx01) private LO (declared safe in tests)"))
    ds.add_new(0x60000010, "US", 8)  # an overlay plane (burned-in graphics), Overlay Data with a marker
    ds.add_new(0x60000011, "US", 8)
    ds.add_new(0x60000022, "LO", book.text("(6000,0022) Overlay Description"))
    ds.add_new(0x60000040, "CS", "G")
    ds.add_new(0x60000050, "SS", [1, 1])
    ds.add_new(0x60000100, "US", 1)
    ds.add_new(0x60000102, "US", 0)
    ds.add_new(0x60003000, "OW", book.text("(6000,3000) Overlay Data").encode("ascii") + b"\x00")
    ds.add_new(0x60004000, "LT", f"free text {book.text('(6000,4000) Overlay Comments')}")
    ds.add_new(0x50000022, "LO", book.text("(5000,0022) Curve Description"))
    ds.add_new(0x50003000, "OB", book.text("(5000,3000) Curve Data").encode("ascii") + b"\x00")


def _trailing(ds: Dataset, book: _Book, uid: Iterator[str], reference: str) -> None:
    signature = _item(book, "(FFFA,FFFA) Digital Signatures Sequence", False, reference, uid)
    signature.CertificateOfSigner = book.text("(FFFA,FFFA).(0400,0115) CertificateOfSigner").encode("ascii") + b"\x00"
    ds.add(DataElement(0xFFFAFFFA, "SQ", [signature]))
    ds.add(DataElement(0xFFFCFFFC, "OB", b"\x00" * 8))


def _uids(*seed: object) -> Iterator[str]:
    n = 0
    while True:
        n += 1
        yield generate_uid(_UID_PREFIX, entropy_srcs=[str(s) for s in (*seed, n)])


def _pixels(ds: Dataset, syntax: str, rows: int, columns: int, rng: np.random.Generator) -> None:
    ds.Rows, ds.Columns, ds.SamplesPerPixel, ds.PhotometricInterpretation = rows, columns, 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    arr = rng.integers(0, 4096, size=(rows, columns), dtype=np.uint16)
    if syntax == RLELossless:
        ds.compress(RLELossless, arr, encoding_plugin="pydicom", generate_instance_uid=False)
    else:
        ds.PixelData = arr.astype(">u2" if syntax == ExplicitVRBigEndian else "<u2").tobytes()


def write_marked_series(out_dir: Path, patient_id: str, *, study_date: dt.date = DEFAULT_STUDY_DATE,
                        transfer_syntaxes: Sequence[str] = DEFAULT_SYNTAXES, modality: str = "CT",
                        sop_class_uid: str = CTImageStorage, burned_in_annotation: str | None = None,
                        rows: int = 16, columns: int = 16, seed: int = 0) -> list[Path]:  # fmt: skip
    """One study with one series of marked instances (one per transfer syntax) under
    ``out_dir/<StudyInstanceUID>/<SeriesInstanceUID>/<SOPInstanceUID>.dcm``; returns the files.
    UIDs are a function of (patient_id, study_date, seed), so a call repeated gives the same files."""
    uid = _uids(patient_id, study_date.isoformat(), seed)
    study, series, frame = next(uid), next(uid), next(uid)
    sops = [next(uid) for _ in transfer_syntaxes]
    rng = np.random.default_rng([seed, len(patient_id)])
    paths = []
    for i, (syntax, sop) in enumerate(zip(transfer_syntaxes, sops)):
        ds = Dataset()
        book = _Book()
        ds.SpecificCharacterSet = "ISO_IR 192"
        _fill(ds, book, study_date.strftime("%Y%m%d"), uid, sops[(i + 1) % len(sops)])
        ds.PatientName = f"{book.text('(0010,0010) Patient Name')}^Zoë"
        ds.PatientID = patient_id
        ds.SOPClassUID, ds.SOPInstanceUID = sop_class_uid, sop
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.Modality, ds.InstanceNumber, ds.SeriesNumber = modality, i + 1, 1
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        if burned_in_annotation is not None:
            ds.BurnedInAnnotation = burned_in_annotation
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID, ds.file_meta.MediaStorageSOPInstanceUID = sop_class_uid, sop
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian if syntax == RLELossless else UID(syntax)
        _pixels(ds, syntax, rows, columns, rng)
        if i == 0:
            _trailing(ds, book, uid, sops[0])
        path = Path(out_dir) / study / series / f"{sop}.dcm"
        path.parent.mkdir(parents=True, exist_ok=True)
        syntax_uid = UID(syntax)
        dcmwrite(path, ds, enforce_file_format=True, implicit_vr=syntax_uid.is_implicit_VR,
                 little_endian=syntax_uid.is_little_endian)  # fmt: skip
        paths.append(path)
    return paths


def _walk(ds: Dataset, where: str) -> Iterator[tuple[str, str, str]]:
    for elem in ds:
        if elem.VR == "SQ":
            for n, item in enumerate(elem.value):
                yield from _walk(item, f"{where}{elem.tag}[{n}].")
        elif elem.VR in ("UI", "DA", "DT") and elem.value not in (None, ""):
            values = elem.value if isinstance(elem.value, (list, tuple)) or hasattr(elem.value, "append") else [elem.value]
            for v in values:
                yield elem.VR, str(v), f"{where}{elem.tag} {elem.keyword}"


def all_markers(files: Iterable[Path] = ()) -> dict[str, str]:
    """Marker -> where it was put. Without ``files``: the text markers every marked instance
    carries (the same for every call). With the original ``files``: also every original UID
    (not the standard's well-known ones) and every date (DA, and the date of DT) they hold."""
    book = _Book()
    _fill(Dataset(), book, DEFAULT_STUDY_DATE.strftime("%Y%m%d"), _uids("markers"), "1.2.3")
    book.text("(0010,0010) Patient Name")
    _trailing(Dataset(), book, _uids("markers"), "1.2.3")
    markers = dict(book.markers)
    for path in files:
        with warnings.catch_warnings():  # attributes pydicom does not know read back as UN: expected here
            warnings.simplefilter("ignore")
            ds = dcmread(path)
        pairs = [("UI", str(ds.file_meta.get("MediaStorageSOPInstanceUID", "")), "file meta")]
        for vr, value, where in [*pairs, *_walk(ds, "")]:
            value = value.strip()
            if vr == "UI" and value and not value.startswith(_WELL_KNOWN):
                markers.setdefault(value, f"{path.name}: {where}")
            elif vr in ("DA", "DT") and len(value) >= 8 and value[:8].isdigit():
                markers.setdefault(value[:8], f"{path.name}: {where}")
    return markers


def leaked_markers(data: bytes, markers: Mapping[str, str], date_shift_days: int | None = None) -> list[str]:
    """The markers found in ``data`` (bytes of a file). A marker of digits (a date) found right
    after a digit or a dot is inside a longer number (a new 2.25. UID) and does not count; with
    ``date_shift_days``, a date that is another marker date shifted is ambiguous and skipped."""
    dates = {m for m in markers if m.isdigit()}
    shifted: set[str] = set()
    if date_shift_days is not None:
        for d in dates:
            try:
                moved = dt.date(int(d[:4]), int(d[4:6]), int(d[6:8])) + dt.timedelta(days=date_shift_days)
            except ValueError:
                continue
            shifted.add(moved.strftime("%Y%m%d"))
    found = []
    for marker in markers:
        needle = marker.encode("utf-8")
        if marker not in dates:
            if needle in data:
                found.append(marker)
            continue
        if marker in shifted:
            continue
        at = data.find(needle)
        while at >= 0:
            if at == 0 or data[at - 1 : at] not in b"0123456789.":
                found.append(marker)
                break
            at = data.find(needle, at + 1)
    return found


def searchable_bytes(path: Path) -> bytes:
    """The bytes of a Part 10 file as a search must see them: a deflated data set is inflated
    (its markers would otherwise hide in the compressed stream), everything else as stored."""
    data = Path(path).read_bytes()
    if data[128:132] != b"DICM":
        return data
    pos = 132
    syntax = b""
    while pos + 8 <= len(data) and data[pos : pos + 2] == b"\x02\x00":
        long_vr = data[pos + 4 : pos + 6] in (b"OB", b"OW", b"UN", b"UT", b"SQ", b"UC", b"UR")
        length = int.from_bytes(data[pos + 8 : pos + 12] if long_vr else data[pos + 6 : pos + 8], "little")
        start = pos + (12 if long_vr else 8)
        if data[pos + 2 : pos + 4] == b"\x10\x00":
            syntax = data[start : start + length].rstrip(b"\x00 ")
        pos = start + length
    if syntax == DeflatedExplicitVRLittleEndian.encode("ascii"):
        return data[:pos] + zlib.decompress(data[pos:], -zlib.MAX_WBITS)
    return data
