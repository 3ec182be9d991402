"""One pass over a dataset and every nested sequence item, applying a :class:`Plan`.

Speed is the reason this looks the way it does: an instance header has a few hundred elements
and most are kept, so a kept element must cost one dict look-up and nothing else. Elements read
from a file stay pydicom ``RawDataElement`` (undecoded bytes) unless we change them, and are
written back byte for byte (:func:`dicom_assets.deid.part10.encode_dataset`), so nothing is
decoded or re-encoded for them. UIDs and dates are ASCII: read straight from the raw bytes, and
their replacements stored pre-encoded (:func:`~dicom_assets.deid.part10.ascii_element`); only
text that is cleaned goes through pydicom's character-set decoding.
"""

from __future__ import annotations

from typing import Callable

from pydicom.datadict import dictionary_VR
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue

from dicom_assets.deid.clean import TextCleaner
from dicom_assets.deid.part10 import ascii_element
from dicom_assets.deid.plan import KEEP_UI_TAGS, STRING_VRS, Act, Plan
from dicom_assets.deid.values import dummy_value, empty_value, shift_value

__all__ = ["Walker", "WELL_KNOWN_UID_ROOT"]

#: UIDs of the standard itself (SOP classes, transfer syntaxes, well-known frames of reference):
#: never identifying, never replaced.
WELL_KNOWN_UID_ROOT = "1.2.840.10008."
_DATE_VRS = ("DA", "DT")


def _is_overlay_or_curve(group: int) -> bool:
    return group & 0xFF00 in (0x5000, 0x6000) and not group & 1


class Walker:
    """Applies a plan in place. One per :class:`~dicom_assets.deid.deidentify.Deidentifier`;
    ``uid`` maps an original UID to its replacement (keyed, consistent across instances)."""

    def __init__(self, plan: Plan, uid: Callable[[str], str]) -> None:
        self._acts = plan.acts
        self._unlisted = plan.unlisted
        self._shift_dates = plan.shift_dates
        self._safe_private = plan.safe_private
        self._safe_blocks = {(creator, group) for creator, group, _ in plan.safe_private}
        self._uid = uid
        self._vr_cache: dict[int, str] = {}

    # -- helpers ---------------------------------------------------------------------------------

    def _dictionary_vr(self, tag: int) -> str:
        vr = self._vr_cache.get(tag)
        if vr is None:
            try:
                vr = dictionary_VR(tag)[:2]  # "US or SS" -> "US", "OB or OW" -> "OB"
            except KeyError:
                vr = "UN"
            self._vr_cache[tag] = vr
        return vr

    def map_uids(self, text: str) -> str:
        """Every UID of a (possibly multi-valued) UI string replaced, well-known ones kept."""
        out = []
        for value in text.split("\\"):
            value = value.strip("\x00 ")
            out.append(value if not value or value.startswith(WELL_KNOWN_UID_ROOT) else self._uid(value))
        return "\\".join(out)

    @staticmethod
    def _set(ds: Dataset, tag: int, vr: str, value: object, elem: object) -> None:
        """Replace an element's value; as pre-encoded raw bytes when the value is ASCII text and the
        element came from a file (its encoding is known), else as a pydicom DataElement."""
        if isinstance(value, str) and elem.is_raw and value.isascii():  # type: ignore[attr-defined]
            ds[tag] = ascii_element(tag, vr, value, elem.is_implicit_VR, elem.is_little_endian)  # type: ignore[attr-defined]
        else:
            ds[tag] = DataElement(tag, vr, value.split("\\") if isinstance(value, str) and "\\" in value else value)

    @staticmethod
    def _ascii(elem: object) -> str:
        """The value of a raw or decoded ASCII element (UI, DA, DT, TM) as one string."""
        value = elem.value  # type: ignore[attr-defined]
        if value is None:
            return ""
        if isinstance(value, (bytes, bytearray)):
            return bytes(value).decode("latin-1").rstrip("\x00 ")
        if isinstance(value, (MultiValue, list, tuple)):
            return "\\".join(str(v) for v in value)
        return str(value)

    @staticmethod
    def _text(ds: Dataset, tag: int) -> str:
        """The decoded value (character set applied) of a string element as one string."""
        value = ds[tag].value
        if value is None:
            return ""
        if isinstance(value, (MultiValue, list, tuple)):
            return "\\".join(str(v) for v in value)
        return str(value)

    def _private_keep(self, ds: Dataset, tag: int) -> bool:
        """Whether a private element is declared safe (Retain Safe Private); creators of safe blocks too."""
        group, element = tag >> 16, tag & 0xFFFF
        if 0x10 <= element <= 0xFF:
            creator = ds.get_item(tag)
            return creator is not None and (self._ascii(creator).strip(), group) in self._safe_blocks
        if element < 0x1000:
            return False
        creator = ds.get_item((group << 16) | (element >> 8))
        return creator is not None and (self._ascii(creator).strip(), group, element & 0xFF) in self._safe_private

    # -- the walk --------------------------------------------------------------------------------

    def walk(self, ds: Dataset, days: int, cleaner: TextCleaner | None, dummy_strings: bool = False) -> None:
        """Apply the plan to every element of ``ds`` and, recursively, of its sequence items."""
        acts, unlisted = self._acts, self._unlisted
        private: list[int] = []
        for tag, elem in list(ds.items()):
            group = tag >> 16
            if group & 1:
                private.append(tag)
                continue
            if not tag & 0xFFFF or _is_overlay_or_curve(group):
                del ds[tag]
                continue
            vr = elem.VR
            if vr is None or vr == "UN" or len(vr) != 2:
                vr = self._dictionary_vr(tag)
            entry = acts.get(tag)
            if entry is None:
                act, fallback = unlisted.get(vr, Act.KEEP), Act.KEEP
            else:
                act, fallback = (entry[1] if vr == "SQ" else entry[0]), entry[2]
            if dummy_strings and vr in STRING_VRS and act is not Act.REMOVE:
                act = Act.DUMMY
            if act is not Act.KEEP:
                self._apply(ds, tag, elem, vr, act, fallback, days, cleaner, dummy_strings)
        if private:
            for tag in private:
                if not self._safe_private or not self._private_keep(ds, tag):
                    del ds[tag]

    def _apply(self, ds: Dataset, tag: int, elem: object, vr: str, act: Act, fallback: Act, days: int,
               cleaner: TextCleaner | None, dummy_strings: bool) -> None:  # fmt: skip
        if act is Act.REMOVE:
            del ds[tag]
        elif act is Act.RECURSE or act is Act.DUMMY_CODES:
            if vr != "SQ":  # a sequence in the dictionary, stored otherwise (UN): cannot clean it
                del ds[tag]
                return
            for item in ds[tag].value:
                self.walk(item, days, cleaner, dummy_strings or act is Act.DUMMY_CODES)
        elif act is Act.EMPTY:
            self._set(ds, tag, vr, empty_value(vr), elem)
        elif act is Act.UID or act is Act.UID_UNLISTED or (act is Act.DUMMY and vr == "UI"):
            if vr != "UI":
                self._apply(ds, tag, elem, vr, Act.DUMMY if act is Act.UID else Act.KEEP, fallback, days, cleaner, dummy_strings)
            elif act is not Act.UID_UNLISTED or tag not in KEEP_UI_TAGS:
                self._set(ds, tag, "UI", self.map_uids(self._ascii(elem)), elem)
        elif act is Act.DUMMY:
            if vr in _DATE_VRS and self._shift_dates:
                self._apply(ds, tag, elem, vr, Act.SHIFT, Act.EMPTY, days, cleaner, dummy_strings)
            elif vr == "SQ":
                self._apply(ds, tag, elem, vr, Act.RECURSE, fallback, days, cleaner, dummy_strings)
            else:
                self._set(ds, tag, vr, dummy_value(vr), elem)
        elif act is Act.SHIFT:
            if vr in _DATE_VRS:
                self._set(ds, tag, vr, shift_value(vr, self._ascii(elem), days), elem)
            elif vr != "TM":  # times are kept: the date moved, the time of day identifies nobody
                self._apply(ds, tag, elem, vr, fallback, Act.REMOVE, days, cleaner, dummy_strings)
        elif act is Act.CLEAN:
            if vr in STRING_VRS and cleaner is not None:
                self._set(ds, tag, vr, cleaner.clean(vr, self._text(ds, tag)), ds.get_item(tag))
            else:
                self._apply(ds, tag, elem, vr, fallback if fallback is not Act.CLEAN else Act.REMOVE, Act.REMOVE,
                            days, cleaner, dummy_strings)  # fmt: skip
