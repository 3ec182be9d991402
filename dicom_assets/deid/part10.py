"""Part 10 files taken apart and put together again without touching the pixel data.

Why not ``dcmread`` + ``save_as`` of the whole file: the pixel data is most of the bytes and none
of the identity (burned-in text is handled by leaving series out, not by touching pixels), and
pydicom's writer costs ~40 us per element. So:

* **reading**: the file meta group is parsed here (pydicom validates and converts every meta
  value), the data set with pydicom's ``read_dataset`` up to the first pixel data element, and
  the pixel data element's extent is found from its header (and, when encapsulated, its item
  headers);
* **writing**: a new file meta group, then every element in tag order, kept elements from their
  raw bytes, changed ones pre-encoded or through pydicom's per-element writer; then the pixel
  bytes, copied by the kernel (``copy_file_range``), never decoded, re-encoded or even held in
  Python. Same transfer syntax, same bytes: what the issue asks ("pixels copied byte for byte").

This only works when the pixel data is the last thing in the file. Anything after it (a Digital
Signatures Sequence, trailing padding, a private group 7FE1...) must go through the profile too,
and a deflated file has no raw bytes to copy: :func:`read_header` then says "not raw" and the
caller reads and writes the whole file with pydicom (still without decoding pixels).
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from operator import itemgetter
from typing import BinaryIO

from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import read_dataset
from pydicom.filewriter import write_data_element
from pydicom.tag import BaseTag
from pydicom.uid import DeflatedExplicitVRLittleEndian, UID

__all__ = ["Header", "ascii_element", "copy_range", "encode_dataset", "encode_file_meta", "read_header", "write_all"]

_PIXEL_TAGS = frozenset({0x7FE00008, 0x7FE00009, 0x7FE00010})
_LONG_VRS = frozenset({b"OB", b"OW", b"OF", b"OD", b"OL", b"OV", b"UN", b"SQ", b"UT", b"UC", b"UR", b"SV", b"UV"})
_ITEM, _SEQUENCE_END = 0xFFFEE000, 0xFFFEE0DD
_UNDEFINED = 0xFFFFFFFF
_COPY_CHUNK = 1 << 24


@dataclass
class Header:
    """A file's dataset without pixel data, its file meta values (tag -> raw bytes) and where its
    raw pixel bytes are (``pixel_start`` to ``pixel_end``; ``None``: the file must be read whole)."""

    dataset: Dataset
    meta: dict[int, bytes]
    pixel_start: int | None
    pixel_end: int | None

    def meta_text(self, tag: int) -> str:
        return self.meta.get(tag, b"").decode("latin-1").strip("\x00 ")


def _element_end(f: BinaryIO, pos: int, implicit: bool, little: bool) -> tuple[int, int] | None:
    """(tag, end offset) of the element starting at ``pos``; None when it cannot be walked."""
    endian = "<" if little else ">"
    f.seek(pos)
    head = f.read(12)
    if len(head) < 8:
        return None
    group, element = struct.unpack(endian + "HH", head[:4])
    tag = (group << 16) | element
    if implicit:
        (length,), value_start = struct.unpack(endian + "L", head[4:8]), pos + 8
    elif head[4:6] in _LONG_VRS:
        if len(head) < 12:
            return None
        (length,), value_start = struct.unpack(endian + "L", head[8:12]), pos + 12
    else:
        (length,), value_start = struct.unpack(endian + "H", head[6:8]), pos + 8
    if length != _UNDEFINED:
        return tag, value_start + length
    at = value_start  # encapsulated: items until the sequence delimiter
    while True:
        f.seek(at)
        item = f.read(8)
        if len(item) < 8:
            return None
        item_group, item_element, item_length = struct.unpack(endian + "HHL", item)
        item_tag = (item_group << 16) | item_element
        if item_tag == _SEQUENCE_END:
            return tag, at + 8
        if item_tag != _ITEM or item_length == _UNDEFINED:
            return None
        at += 8 + item_length


def _read_meta(f: BinaryIO) -> dict[int, bytes] | None:
    """The file meta group (always explicit VR little endian) after preamble and ``DICM``, as
    tag -> value bytes; None when the file does not start like a Part 10 file. Parsed here rather
    than by pydicom, which validates and converts every value (a third of its read time)."""
    if f.read(132)[128:] != b"DICM":
        return None
    meta: dict[int, bytes] = {}
    while True:
        pos = f.tell()
        head = f.read(8)
        if len(head) < 8:
            return None
        group, element = struct.unpack("<HH", head[:4])
        if group != 2:
            f.seek(pos)
            return meta
        if head[4:6] in _LONG_VRS:
            extra = f.read(4)
            if len(extra) < 4:
                return None
            (length,) = struct.unpack("<L", extra)
        else:
            (length,) = struct.unpack("<H", head[6:8])
        if length == _UNDEFINED:
            return None
        meta[(group << 16) | element] = f.read(length)


def _stop_at_pixels(tag: BaseTag, vr: str | None, length: int) -> bool:
    return tag in _PIXEL_TAGS


def read_header(f: BinaryIO, size: int) -> Header:
    """The dataset before the pixel data, and the raw pixel byte range when it ends the file.

    Files this cannot take apart (no preamble, deflated, a dataset not encoded as its transfer
    syntax says, anything after the pixel data) come back with no pixel range and no dataset
    worth using: the caller reads them whole with pydicom."""
    whole = Header(Dataset(), {}, None, None)
    meta = _read_meta(f)
    if meta is None:
        return whole
    syntax = UID(meta.get(0x00020010, b"").decode("latin-1").strip("\x00 "))
    if syntax == DeflatedExplicitVRLittleEndian or syntax.is_private or not syntax.is_transfer_syntax:
        return Header(Dataset(), meta, None, None)
    implicit, little = syntax.is_implicit_VR, syntax.is_little_endian
    ds = read_dataset(f, implicit, little, stop_when=_stop_at_pixels)
    if tuple(ds.original_encoding) != (implicit, little):
        return Header(ds, meta, None, None)
    start = pos = f.tell()
    while pos < size:
        found = _element_end(f, pos, implicit, little)
        if found is None or found[0] not in _PIXEL_TAGS or found[1] > size:
            return Header(ds, meta, None, None)
        pos = found[1]
    return Header(ds, meta, start, pos)


def copy_range(src: BinaryIO, dst_fd: int, start: int, end: int) -> None:
    """Copy ``src[start:end]`` to the current position of ``dst_fd`` (kernel-side when possible)."""
    src_fd, remaining, offset = src.fileno(), end - start, start
    while remaining > 0:
        try:
            copied = os.copy_file_range(src_fd, dst_fd, min(remaining, _COPY_CHUNK), offset)
        except OSError:
            copied = 0
        if copied <= 0:  # not supported here (another file system, an old kernel): plain copy
            src.seek(offset)
            while remaining > 0:
                chunk = src.read(min(remaining, _COPY_CHUNK))
                if not chunk:
                    raise OSError("the source file ended before its pixel data did")
                write_all(dst_fd, chunk)
                remaining -= len(chunk)
            return
        offset += copied
        remaining -= copied


def write_all(fd: int, data: bytes | memoryview) -> None:
    """``os.write`` until every byte is written (it may write less than asked)."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


# -- writing -------------------------------------------------------------------------------------
# Elements left as read are written from their raw bytes (header packed here); only changed
# elements go through pydicom's per-element writer. pydicom's dcmwrite does the same job but at
# ~40 us per element; for a header of a hundred elements that was half the time of an instance.

_SEQUENCE_DELIMITER = (0xFFFE, 0xE0DD)
_first = itemgetter(0)
_ITEM_TAG = (0xFFFE, 0xE000)


def _header(tag: int, vr: str | None, length: int, implicit: bool, little: bool) -> bytes:
    e = "<" if little else ">"
    if implicit:
        return struct.pack(e + "HHL", tag >> 16, tag & 0xFFFF, length)
    code = (vr or "UN").encode("ascii")
    if code in _LONG_VRS:
        return struct.pack(e + "HH2s2xL", tag >> 16, tag & 0xFFFF, code, length)
    return struct.pack(e + "HH2sH", tag >> 16, tag & 0xFFFF, code, length)


def ascii_element(tag: int, vr: str, text: str, implicit: bool, little: bool) -> RawDataElement:
    """A new element of an ASCII value (UI, DA, DT, TM, CS, dummies) already encoded, so that
    writing it costs what copying a kept element costs. pydicom decodes it if anyone reads it."""
    value = text.encode("ascii")
    if len(value) & 1:
        value += b"\x00" if vr == "UI" else b" "
    return RawDataElement(BaseTag(tag), vr, len(value), value, 0, implicit, little)


def encode_dataset(ds: Dataset, implicit: bool, little: bool, encodings: str | list[str] | None) -> bytearray:
    """``ds`` encoded in the given transfer syntax encoding, elements in tag order (no group lengths)."""
    charset = ds.get_item(0x00080005)
    if charset is not None:
        encodings = ds.SpecificCharacterSet or encodings
    out = bytearray()
    for tag, elem in sorted(ds.items(), key=_first):
        if not tag & 0xFFFF and tag >> 16 > 6:
            continue
        _encode_element(out, ds, elem, implicit, little, encodings)
    return out


def _encode_element(out: bytearray, ds: Dataset, elem: DataElement | RawDataElement, implicit: bool, little: bool,
                    encodings: str | list[str] | None) -> None:  # fmt: skip
    if elem.is_raw:
        raw: RawDataElement = elem  # type: ignore[assignment]
        value, vr = raw.value, raw.VR
        if (raw.is_implicit_VR == implicit and raw.is_little_endian == little and value is not None and not raw.is_buffered
                and (implicit or (vr is not None and len(vr) == 2 and (vr.encode() in _LONG_VRS or len(value) <= 0xFFFF)))):  # fmt: skip
            undefined = raw.length == _UNDEFINED
            out += _header(raw.tag, vr, _UNDEFINED if undefined else len(value), implicit, little)
            out += value
            if undefined:
                out += struct.pack(("<" if little else ">") + "HHL", *_SEQUENCE_DELIMITER, 0)
            return
        elem = ds[raw.tag]  # another encoding: let pydicom decode it, then encode it below
    if elem.VR == "SQ":
        body = bytearray()
        for item in elem.value:
            encoded = encode_dataset(item, implicit, little, encodings)
            body += struct.pack(("<" if little else ">") + "HHL", *_ITEM_TAG, len(encoded))
            body += encoded
        out += _header(elem.tag, "SQ", len(body), implicit, little)
        out += body
        return
    fp = DicomBytesIO()
    fp.is_implicit_VR, fp.is_little_endian = implicit, little
    write_data_element(fp, elem, encodings)
    out += fp.getvalue()


def encode_file_meta(sop_class: str, sop_instance: str, syntax: str, implementation_uid: str, version_name: str) -> bytes:
    """Preamble, ``DICM`` and a file meta group holding only what PS3.10 requires (explicit VR LE)."""
    body = bytearray(_header(0x00020001, "OB", 2, False, True) + b"\x00\x01")
    for tag, vr, text in ((0x00020002, "UI", sop_class), (0x00020003, "UI", sop_instance), (0x00020010, "UI", syntax),
                          (0x00020012, "UI", implementation_uid), (0x00020013, "SH", version_name)):  # fmt: skip
        value = ascii_element(tag, vr, text, False, True).value or b""
        body += _header(tag, vr, len(value), False, True) + value
    group_length = _header(0x00020000, "UL", 4, False, True) + struct.pack("<L", len(body))
    return b"\x00" * 128 + b"DICM" + group_length + bytes(body)
