"""De-identifying one instance: the PS3.15 Basic Profile with a site's options, pixels untouched.

:class:`Deidentifier` is the domain core the pipeline calls per file. It holds the resolved plan
(:mod:`dicom_assets.deid.plan`) and the keys; per instance it walks the header once
(:mod:`dicom_assets.deid.walk`), then says what was done in the instance itself:

* PatientName and PatientID = the pseudonym the caller chose (the caller keeps the crosswalk and
  resolves pseudonym collisions; this class never sees another patient);
* PatientIdentityRemoved = YES; DeidentificationMethod (the profile, its edition, each option)
  and DeidentificationMethodCodeSequence (CID 7050 codes of the profile and options used);
* LongitudinalTemporalInformationModified = MODIFIED when dates were shifted, REMOVED otherwise;
* the Clinical Trial Subject/Study attributes of the site's trial, when configured (the subject ID
  is the pseudonym);
* a new file meta group: only the elements Part 10 needs, MediaStorageSOPInstanceUID replaced like
  SOPInstanceUID; the original's source/sending AE titles and private file meta are dropped.

:func:`burned_in_reason` decides which instances must not be shared at all (see
:mod:`dicom_assets.deid.options`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from pydicom import dcmread
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filewriter import dcmwrite
from pydicom.tag import BaseTag
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, UID

from dicom_assets.deid import part10
from dicom_assets.deid.clean import TextCleaner
from dicom_assets.deid.keys import DeidKeys
from dicom_assets.deid.options import DeidOptions
from dicom_assets.deid.plan import Act, Plan
from dicom_assets.deid.profile import BASIC_EDITION
from dicom_assets.deid.walk import Walker

__all__ = ["DeidentifiedInstance", "Deidentifier", "burned_in_reason"]

IMPLEMENTATION_VERSION_NAME = "DICOM_ASSETS"
_MAX_LO = 64


@dataclass(frozen=True)
class DeidentifiedInstance:
    """What was written: the instance's NEW UIDs and the output file's size in bytes."""

    sop_instance_uid: str
    series_instance_uid: str
    study_instance_uid: str
    bytes: int


def _value(ds: Dataset, keyword: str) -> str:
    value = ds.get(keyword)
    return "" if value is None else str(value).strip()


def _uid_of(ds: Dataset, tag: int) -> str:
    """A UI value straight from the raw bytes when it is still raw (no pydicom conversion)."""
    elem = ds.get_item(tag)
    if elem is None or elem.value is None:
        return ""
    value = elem.value
    return (value.decode("latin-1") if isinstance(value, bytes) else str(value)).strip("\x00 ")


class _Putter:
    """Sets an element of ``ds``: pre-encoded when the value is ASCII and the encoding is known."""

    def __init__(self, ds: Dataset, implicit: bool | None, little: bool | None) -> None:
        self.ds, self.implicit, self.little = ds, implicit, little

    def __call__(self, tag: int, vr: str, text: str) -> None:
        if self.implicit is not None and self.little is not None and text.isascii():
            self.ds[tag] = part10.ascii_element(tag, vr, text, self.implicit, self.little)
        else:
            self.ds[tag] = DataElement(tag, vr, text.split("\\") if "\\" in text else text)


class Deidentifier:
    """Applies Table E.1-1 under ``options`` with the pseudonym UIDs and date shifts of ``keys``.

    Stateless between instances apart from the UID cache of ``keys``, so one Deidentifier may
    serve every patient of a run (and threads)."""

    def __init__(self, options: DeidOptions, keys: DeidKeys) -> None:
        self.options = options
        self.keys = keys
        self._plan = Plan.build(options)
        self._walker = Walker(self._plan, keys.uid)
        self._needs_cleaner = any(Act.CLEAN in entry for entry in self._plan.acts.values())
        codes = options.method_codes()
        self._method_codes = codes
        self._method_text = [f"{codes[0][2]} (PS3.15 {BASIC_EDITION})"[:_MAX_LO]] + [meaning[:_MAX_LO] for _, _, meaning in codes[1:]]
        self._encoded_codes: dict[tuple[bool, bool], RawDataElement] = {}

    # -- datasets ----------------------------------------------------------------------------------

    def deidentify_dataset(self, ds: Dataset, pseudonym: str, date_shift_days: int) -> Dataset:
        """De-identify ``ds`` in place (and its ``file_meta`` when it has one); returns ``ds``."""
        meta = getattr(ds, "file_meta", None)
        new_meta_uid = self._deidentify(ds, pseudonym, date_shift_days, _uid_of(meta, 0x00020003) if meta is not None else "")
        if hasattr(ds, "file_meta"):
            meta = FileMetaDataset()
            meta.FileMetaInformationVersion = b"\x00\x01"
            meta.MediaStorageSOPClassUID = _value(ds.file_meta, "MediaStorageSOPClassUID") or _value(ds, "SOPClassUID")
            meta.MediaStorageSOPInstanceUID = new_meta_uid
            meta.TransferSyntaxUID = ds.file_meta.TransferSyntaxUID
            meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
            meta.ImplementationVersionName = IMPLEMENTATION_VERSION_NAME
            ds.file_meta = meta
        return ds

    def _deidentify(self, ds: Dataset, pseudonym: str, date_shift_days: int, original_meta_uid: str) -> str:
        """The work of :meth:`deidentify_dataset` except the file meta; returns the new
        MediaStorageSOPInstanceUID: the new SOPInstanceUID (the file stays consistent), or the
        replacement of the original file meta's when the dataset has none."""
        if not pseudonym or len(pseudonym) > _MAX_LO or any(c in pseudonym for c in "\\^="):
            raise ValueError("the pseudonym must be 1-64 characters without \\ ^ or =")
        cleaner = TextCleaner.from_dataset(ds) if self._needs_cleaner else None
        self._walker.walk(ds, int(date_shift_days), cleaner)
        if 0x00120081 in ds and 0x00120082 not in ds:  # Type 1C on the approval number, which the profile removes
            del ds[0x00120081]
        implicit, little = ds.original_encoding
        put = _Putter(ds, implicit, little)
        put(0x00100010, "PN", pseudonym)
        put(0x00100020, "LO", pseudonym)
        put(0x00120062, "CS", "YES")
        put(0x00120063, "LO", "\\".join(self._method_text))
        ds[0x00120064] = self._code_sequence(implicit, little)
        put(0x00280303, "CS", "MODIFIED" if self._plan.shift_dates else "REMOVED")
        trial = self.options.trial
        if trial is not None and not trial.is_empty():
            if trial.sponsor_name:
                put(0x00120010, "LO", trial.sponsor_name[:_MAX_LO])
            if trial.protocol_id:
                put(0x00120020, "LO", trial.protocol_id[:_MAX_LO])
            put(0x00120021, "LO", (trial.protocol_name or "")[:_MAX_LO])  # Type 2: present, maybe empty
            put(0x00120030, "LO", (trial.site_id or "")[:_MAX_LO])
            put(0x00120031, "LO", (trial.site_name or "")[:_MAX_LO])
            put(0x00120040, "LO", pseudonym)
        return _uid_of(ds, 0x00080018) or (self.keys.uid(original_meta_uid) if original_meta_uid else "")

    def _code_sequence(self, implicit: bool | None, little: bool | None) -> DataElement | RawDataElement:
        """DeidentificationMethodCodeSequence, encoded once per transfer syntax encoding."""
        key = (implicit, little)
        raw = self._encoded_codes.get(key)  # type: ignore[arg-type]
        if raw is not None:
            return raw
        items = []
        for value, scheme, meaning in self._method_codes:
            item = Dataset()
            item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, scheme, meaning
            items.append(item)
        if implicit is None or little is None:
            return DataElement(0x00120064, "SQ", items)
        body = part10.encode_dataset(Dataset({0x00120064: DataElement(0x00120064, "SQ", items)}), implicit, little, None)
        value = bytes(body[12 if not implicit else 8:])  # the items, without the element header
        raw = self._encoded_codes[key] = RawDataElement(BaseTag(0x00120064), "SQ", len(value), value, 0, implicit, little)
        return raw

    # -- files -------------------------------------------------------------------------------------

    def deidentify_file(self, src: Path, dst: Path, pseudonym: str, date_shift_days: int) -> DeidentifiedInstance:
        """Read ``src``, write its de-identified copy to ``dst``: a Part 10 file in the same
        transfer syntax whose pixel data bytes are identical (copied raw after the new header when
        the pixel data ends the file, else kept as pydicom read them; never decoded). On any
        failure ``dst`` is removed, so a file there is always a whole output."""
        src, dst = Path(src), Path(dst)
        if dst.exists() and os.path.samefile(src, dst):
            raise ValueError("deidentify_file writes a new file: dst must not be src")
        dst.parent.mkdir(parents=True, exist_ok=True)
        try:
            with open(src, "rb") as f:
                header = part10.read_header(f, os.fstat(f.fileno()).st_size)
                if header.pixel_start is None or header.pixel_end is None:
                    ds, size = self._write_whole(src, dst, pseudonym, date_shift_days)
                else:
                    ds, size = header.dataset, self._write_spliced(f, header, dst, pseudonym, date_shift_days)
        except BaseException:
            dst.unlink(missing_ok=True)
            raise
        return DeidentifiedInstance(_uid_of(ds, 0x00080018), _uid_of(ds, 0x0020000E), _uid_of(ds, 0x0020000D), size)

    def _write_spliced(self, f: BinaryIO, header: part10.Header, dst: Path, pseudonym: str, date_shift_days: int) -> int:
        """The fast path: new file meta + the de-identified header + the source's pixel bytes."""
        ds = header.dataset
        syntax = UID(header.meta_text(0x00020010))
        new_uid = self._deidentify(ds, pseudonym, date_shift_days, header.meta_text(0x00020003))
        sop_class = header.meta_text(0x00020002) or _uid_of(ds, 0x00080016)
        head = part10.encode_file_meta(sop_class, new_uid, syntax, PYDICOM_IMPLEMENTATION_UID, IMPLEMENTATION_VERSION_NAME)
        body = part10.encode_dataset(ds, syntax.is_implicit_VR, syntax.is_little_endian, None)
        fd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            part10.write_all(fd, head)
            part10.write_all(fd, body)
            part10.copy_range(f, fd, header.pixel_start or 0, header.pixel_end or 0)
            return os.fstat(fd).st_size
        finally:
            os.close(fd)

    def _write_whole(self, src: Path, dst: Path, pseudonym: str, date_shift_days: int) -> tuple[Dataset, int]:
        """Files the fast path cannot take apart (deflated, elements after the pixel data): read
        and written whole by pydicom; the pixel data stays the bytes pydicom read."""
        ds = dcmread(src)
        self.deidentify_dataset(ds, pseudonym, date_shift_days)
        ds.preamble = None
        dcmwrite(dst, ds, enforce_file_format=True)
        return ds, os.stat(dst).st_size


def burned_in_reason(ds: Dataset, options: DeidOptions) -> str | None:
    """Why this instance (and so its series) must be left out of the de-identified copy because
    its pixels may carry burned-in identity; None = share it. Always None with ``keep_burned_in``.
    Reads the header only (``stop_before_pixels`` is enough); the reason names no identity."""
    if options.keep_burned_in:
        return None
    if _value(ds, "BurnedInAnnotation").upper() == "YES":
        return "BurnedInAnnotation is YES"
    modality = _value(ds, "Modality").upper()
    if modality and modality in options.burned_in_modalities:
        return f"modality {modality} may carry burned-in text"
    sop_class = _value(ds, "SOPClassUID")
    if sop_class and sop_class in options.burned_in_sop_classes:
        return f"SOP class {UID(sop_class).name} may carry burned-in text"
    image_type = ds.get("ImageType") or []
    values = [image_type] if isinstance(image_type, str) else list(image_type)
    if any("SCREEN SAVE" in str(v).upper() or "SCREENSHOT" in str(v).upper() for v in values):
        return "ImageType says screen save"
    return None
