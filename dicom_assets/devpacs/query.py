"""C-FIND/C-MOVE/C-GET identifiers compiled into filters over a :class:`~dicom_assets.devpacs.catalog._Catalog`.

:class:`_Query` turns an identifier into per-attribute filters (single value, ``*``/``?``
wildcards, UID lists, date/time ranges) at the level it names, checked against the information
model (Patient Root or Study Root), and builds the C-FIND responses.

Matching, checked against Orthanc 1.10.1 by ``dicom_assets_tests/test_devpacs_query_keys.py``:

* Text is matched **case-sensitively** except PN (PS3.4 C.2.2.2.1; Orthanc's default): a
  SeriesDescription ``*localizer*`` does not match ``Localizer``, an AccessionNumber ``acc-1``
  not ``ACC-1``. A case-insensitive filter must be applied by the requestor, on returned values.
* ``*``/``?`` wildcards in a single value; several values (``CT\\MR``) match any of them,
  exactly (wildcards in a list are literal, as in Orthanc). IDs match exactly: ``000123`` is
  not ``123``. DA/TM/DT ranges ``lo-hi``, ``lo-``, ``-hi`` include their bounds.
* Computed study attributes are matching keys: ModalitiesInStudy and SOPClassesInStudy match a
  study when any of its values does (Orthanc: ModalitiesInStudy likewise; SOPClassesInStudy
  matches no study there). The ``NumberOf...`` counts match too (Orthanc: never).
* A key of a level below the query's (Modality at STUDY level) is ignored, as return-only.
  Orthanc differs: Modality or SeriesDescription at STUDY level match no study, SOPClassUID at
  SERIES level is tested on one instance of each series. Send every filter at its own level.

Split out of :mod:`dicom_assets.devpacs.server` (names kept, so the moved code reads as before).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence as DicomSequence
from pydicom.tag import Tag
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    PatientRootQueryRetrieveInformationModelFind,
    PatientRootQueryRetrieveInformationModelGet,
    PatientRootQueryRetrieveInformationModelMove,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
)

from dicom_assets.devpacs.catalog import (
    _ATTR_LEVEL,
    _COMPUTED,
    IMAGE,
    LEVEL_NAMES,
    PATIENT,
    SERIES,
    STUDY,
    UNIQUE_KEYS,
    _as_texts,
    _Catalog,
    _Group,
    _Instance,
)

UTF8_CHARSET = "ISO_IR 192"
IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS = 0xA900

_PATIENT_ROOT_LEVELS = frozenset({PATIENT, STUDY, SERIES, IMAGE})
_STUDY_ROOT_LEVELS = frozenset({STUDY, SERIES, IMAGE})
#: Information model SOP class UID -> the query levels it allows.
_MODEL_LEVELS: dict[str, frozenset[int]] = {
    str(PatientRootQueryRetrieveInformationModelFind): _PATIENT_ROOT_LEVELS,
    str(PatientRootQueryRetrieveInformationModelMove): _PATIENT_ROOT_LEVELS,
    str(PatientRootQueryRetrieveInformationModelGet): _PATIENT_ROOT_LEVELS,
    str(StudyRootQueryRetrieveInformationModelFind): _STUDY_ROOT_LEVELS,
    str(StudyRootQueryRetrieveInformationModelMove): _STUDY_ROOT_LEVELS,
    str(StudyRootQueryRetrieveInformationModelGet): _STUDY_ROOT_LEVELS,
}

_RETRIEVE_AE_TITLE = int(Tag("RetrieveAETitle"))
#: Elements of the identifier that are about the request, not keys to match or return.
_CONTROL_TAGS = frozenset({int(Tag("SpecificCharacterSet")), int(Tag("QueryRetrieveLevel"))})
_WILDCARD_VRS = frozenset({"AE", "CS", "LO", "LT", "PN", "SH", "ST", "UC", "UT"})
_RANGE_VRS = frozenset({"DA", "TM", "DT"})


class QueryError(Exception):
    """An identifier the SCP cannot process; ``status`` is the DIMSE failure status to return."""

    def __init__(self, message: str, status: int = IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS) -> None:
        super().__init__(message)
        self.status = status



# --------------------------------------------------------------------------------------------
# Queries: an identifier compiled into filters.


@dataclass(frozen=True)
class _Filter:
    """One non-universal key of the identifier: the attribute and how its values must match."""

    tag: int
    accepts: Callable[[Sequence[str]], bool]
    uids: frozenset[str] | None = None  # the values of a UID (list) match, for index lookups


def _query_text(elem: DataElement) -> str:
    """The identifier value as the requestor wrote it (multiple values joined by backslash)."""
    value = elem.value
    if value is None:
        return ""
    if isinstance(value, (MultiValue, list, tuple)):
        return "\\".join(str(v) for v in value)
    return str(value)


def _wildcard(pattern: str, ignore_case: bool) -> re.Pattern[str]:
    """``*`` = any run of characters, ``?`` = one character; everything else literal."""
    body = "".join(".*" if c == "*" else "." if c == "?" else re.escape(c) for c in pattern)
    return re.compile(rf"\A{body}\Z", re.DOTALL | (re.IGNORECASE if ignore_case else 0))


def _range_test(text: str) -> Callable[[Sequence[str]], bool]:
    """``lo-hi``, ``lo-`` or ``-hi`` on DA/TM/DT; a bound of lower precision covers its whole span."""
    low, high = (part.strip() for part in text.split("-", 1))

    def accepts(values: Sequence[str]) -> bool:
        return any(v and (not low or v >= low) and (not high or v[: len(high)] <= high) for v in values)

    return accepts


def _compile(vr: str, text: str) -> Callable[[Sequence[str]], bool] | None:
    """How values of an attribute must look to match ``text``; None for universal matching."""
    if text == "" or set(text) == {"*"}:
        return None
    if vr == "UI":
        wanted = frozenset(text.split("\\"))
        return lambda values: any(v in wanted for v in values)
    if vr in _RANGE_VRS and "-" in text and not (vr == "DT" and text.count("-") > 1):
        return _range_test(text)
    alternatives = text.split("\\")
    # Several values (CT\MR) match any of them exactly: like Orthanc, ``*``/``?`` are wildcards
    # in a single value only (Localizer\T1* matches "T1*" literally).
    if vr in _WILDCARD_VRS and len(alternatives) == 1 and ("*" in text or "?" in text):
        patterns = [_wildcard(alt, ignore_case=vr == "PN") for alt in alternatives]
        return lambda values: any(p.match(v) for p in patterns for v in values)
    if vr == "PN":
        folded = frozenset(alt.casefold() for alt in alternatives)
        return lambda values: any(v.casefold() in folded for v in values)
    exact = frozenset(alternatives)
    return lambda values: any(v in exact for v in values)


@dataclass(frozen=True)
class _Query:
    """A parsed identifier: the level, the keys to return (in order) and the filters to apply."""

    level: int
    requested: tuple[tuple[int, str], ...]
    filters: tuple[_Filter, ...]

    @classmethod
    def parse(cls, identifier: Dataset, model_uid: str) -> "_Query":
        allowed = _MODEL_LEVELS.get(str(model_uid))
        if allowed is None:
            raise QueryError(f"unsupported information model {model_uid}")
        try:
            level_name = str(identifier.get("QueryRetrieveLevel", "") or "").strip().upper()
            elements = [elem for elem in identifier if int(elem.tag) not in _CONTROL_TAGS and elem.tag.group > 0x0002]
            keys = [(int(elem.tag), str(elem.VR), "" if elem.VR == "SQ" else _query_text(elem)) for elem in elements]
        except Exception as exc:  # noqa: BLE001 - pydicom decodes lazily: any failure is a bad identifier
            raise QueryError(f"cannot decode the identifier: {exc}") from exc
        if level_name not in LEVEL_NAMES or LEVEL_NAMES.index(level_name) not in allowed:
            raise QueryError(f"QueryRetrieveLevel {level_name!r} is not valid for model {model_uid}")
        level = LEVEL_NAMES.index(level_name)
        filters = []
        for tag, vr, text in keys:
            attr_level = _COMPUTED[tag][0] if tag in _COMPUTED else _ATTR_LEVEL.get(tag, IMAGE)
            test = _compile(vr, text) if attr_level <= level and vr != "SQ" else None
            if test is not None:
                filters.append(_Filter(tag, test, frozenset(text.split("\\")) if vr == "UI" else None))
        return cls(level, tuple((tag, vr) for tag, vr, _ in keys), tuple(filters))

    def matches(self, catalog: _Catalog) -> list[_Group]:
        """The groups at this query's level that pass every filter, in catalog order."""
        candidates: Sequence[_Group] = catalog.groups[self.level]
        study = next((f.uids for f in self.filters if f.tag == UNIQUE_KEYS[STUDY] and f.uids is not None), None)
        if self.level >= STUDY and study is not None and len(study) == 1:
            candidates = catalog.groups_of_study[self.level].get(next(iter(study)), ())
        return [g for g in candidates if all(f.accepts(_values_for(catalog, f.tag, g)) for f in self.filters)]

    def instances(self, catalog: _Catalog) -> list[_Instance]:
        """Every instance under a matching group: what a C-MOVE/C-GET sends."""
        return [inst for group in self.matches(catalog) for inst in group.instances]

    def response(self, catalog: _Catalog, group: _Group, retrieve_ae_title: str) -> Dataset:
        """The C-FIND response identifier for one match: the requested keys and the unique keys."""
        rsp = Dataset()
        rsp.QueryRetrieveLevel = LEVEL_NAMES[self.level]
        wanted = list(self.requested)
        present = {tag for tag, _ in wanted}
        wanted += [(tag, "UI" if i else "LO") for i, tag in enumerate(UNIQUE_KEYS[: self.level + 1]) if tag not in present]
        needs_utf8 = False
        for tag, vr in wanted:
            if vr == "SQ":
                rsp.add_new(tag, "SQ", DicomSequence())
                continue
            found = _value_for(catalog, tag, group, self.level, retrieve_ae_title)
            out_vr, value = found if found is not None else (vr, None)
            rsp.add_new(tag, out_vr, value)
            needs_utf8 = needs_utf8 or any(not t.isascii() for t in _as_texts(value))
        if needs_utf8:
            rsp.SpecificCharacterSet = UTF8_CHARSET
        return rsp


_AVAILABLE_TRANSFER_SYNTAX = 0x00083002


def _value_for(catalog: _Catalog, tag: int, group: _Group, level: int, ae_title: str) -> tuple[str, Any] | None:
    """``(VR, value)`` of ``tag`` for a matched group, or None to return it empty."""
    if tag == _RETRIEVE_AE_TITLE:
        return "AE", ae_title
    if tag == _AVAILABLE_TRANSFER_SYNTAX and level == IMAGE:  # how this PACS stores the instance
        return "UI", group.first.transfer_syntax_uid
    computed = catalog.computed(tag, group)
    if computed is not None or tag in _COMPUTED:
        return computed
    if _ATTR_LEVEL.get(tag, IMAGE) > level:
        return None  # a lower-level attribute has no single value at this level
    return group.first.values.get(tag)


def _values_for(catalog: _Catalog, tag: int, group: _Group) -> tuple[str, ...]:
    """The values a filter on ``tag`` is tested against for ``group``."""
    if tag in _COMPUTED:
        computed = catalog.computed(tag, group)
        return _as_texts(computed[1]) if computed else ()
    return group.first.texts.get(tag, ())

