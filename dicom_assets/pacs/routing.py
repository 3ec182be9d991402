"""The routing UIDs of an instance, read from the first bytes of its dataset as it streams in.

The receiver must know an instance's Study and Series Instance UIDs (and check its SOP Instance
UID) before it writes a byte, but must not hold a whole instance in memory to learn them. They
sit near the start of the dataset (groups 0008 and 0020, in ascending tag order), so this walks
element headers over the bytes received so far and stops after (0020,000E); it says "need more"
until those bytes have arrived. Undefined-length sequences before group 0020 are skipped item by
item. Deflated datasets cannot be walked before they are inflated: the caller waits for the
whole dataset (see ``needs_whole_dataset``).
"""

from __future__ import annotations

import struct
import zlib

IMPLICIT_VR_LE = "1.2.840.10008.1.2"
EXPLICIT_VR_BE = "1.2.840.10008.1.2.2"
DEFLATED_EXPLICIT_VR_LE = "1.2.840.10008.1.2.1.99"

ROUTING_TAGS = {0x00080018: "SOPInstanceUID", 0x0020000D: "StudyInstanceUID", 0x0020000E: "SeriesInstanceUID"}
_LAST_ROUTING_TAG = 0x0020000E
_UNDEFINED = 0xFFFFFFFF
_ITEM, _ITEM_END, _SEQUENCE_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
_LONG_VRS = frozenset({b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"})


class NeedMore(Exception):
    """The bytes received so far end before the routing UIDs."""


class MalformedDataset(ValueError):
    """The dataset's structure cannot be walked."""


def needs_whole_dataset(transfer_syntax: str) -> bool:
    return transfer_syntax == DEFLATED_EXPLICIT_VR_LE


class _Walker:
    """Element headers over the bytes so far. Runs for every instance received, some 30 headers
    each before (0020,000E): one precompiled unpack per header (0.16 -> 0.06 ms an instance)."""

    def __init__(self, data: bytes | bytearray | memoryview, transfer_syntax: str) -> None:
        self.data = data
        self.size = len(data)
        self.implicit = transfer_syntax == IMPLICIT_VR_LE
        endian = ">" if transfer_syntax == EXPLICIT_VR_BE else "<"
        self._explicit = struct.Struct(endian + "HH2sH").unpack_from  # group, element, VR, short length
        self._implicit = struct.Struct(endian + "HHL").unpack_from  # group, element, length
        self._long = struct.Struct(endian + "L").unpack_from

    def _need(self, end: int) -> None:
        if end > self.size:
            raise NeedMore

    def header(self, offset: int) -> tuple[int, int, int]:
        """(tag, value length, value offset) of the element at ``offset``."""
        if offset + 8 > self.size:
            raise NeedMore
        if self.implicit:
            group, element, length = self._implicit(self.data, offset)
            return (group << 16) | element, length, offset + 8
        group, element, vr, length = self._explicit(self.data, offset)
        if group == 0xFFFE:  # item and delimiters: no VR, a 4-byte length
            return (group << 16) | element, self._long(self.data, offset + 4)[0], offset + 8
        if vr in _LONG_VRS:
            if offset + 12 > self.size:
                raise NeedMore
            return (group << 16) | element, self._long(self.data, offset + 8)[0], offset + 12
        return (group << 16) | element, length, offset + 8

    def skip_sequence(self, offset: int, depth: int = 0) -> int:
        """Offset after an undefined-length sequence whose items start at ``offset``."""
        if depth > 32:
            raise MalformedDataset("sequences nested deeper than 32")
        while True:
            tag, length, value = self.header(offset)
            if tag == _SEQUENCE_END:
                return value
            if tag != _ITEM:
                raise MalformedDataset(f"expected a sequence item, found ({tag >> 16:04X},{tag & 0xFFFF:04X})")
            offset = self.skip_item(value, depth + 1) if length == _UNDEFINED else value + length

    def skip_item(self, offset: int, depth: int) -> int:
        """Offset after an undefined-length item whose elements start at ``offset``."""
        while True:
            tag, length, value = self.header(offset)
            if tag == _ITEM_END:
                return value
            offset = self.skip_sequence(value, depth) if length == _UNDEFINED else value + length

    def routing(self, complete: bool) -> dict[str, str]:
        found: dict[str, str] = {}
        offset = 0
        while offset < self.size or not complete:
            tag, length, value = self.header(offset)
            if tag > _LAST_ROUTING_TAG:
                break
            if length == _UNDEFINED:
                offset = self.skip_sequence(value)
                continue
            offset = value + length
            if tag in ROUTING_TAGS:
                self._need(offset)
                raw = bytes(self.data[value:offset])
                found[ROUTING_TAGS[tag]] = raw.decode("ascii", "replace").rstrip("\x00 ")
        return found


def routing_uids(data: bytes | bytearray | memoryview, transfer_syntax: str, complete: bool = False) -> dict[str, str] | None:
    """The routing UIDs found in ``data`` (the start of a dataset), or None if more is needed.

    ``complete``: ``data`` is the whole dataset, so running out of bytes ends the walk.
    Raises MalformedDataset when the structure is broken.
    """
    if needs_whole_dataset(transfer_syntax):
        if not complete:
            return None
        try:
            data = zlib.decompress(bytes(data), -zlib.MAX_WBITS)
        except zlib.error as exc:
            raise MalformedDataset(f"cannot inflate the deflated dataset: {exc}") from exc
        transfer_syntax = "1.2.840.10008.1.2.1"
    try:
        return _Walker(data, transfer_syntax).routing(complete)
    except NeedMore:
        if complete:
            raise MalformedDataset("the dataset ends inside an element") from None
        return None
    except struct.error as exc:
        raise MalformedDataset(str(exc)) from exc
