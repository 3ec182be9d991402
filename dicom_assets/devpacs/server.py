"""A small Query/Retrieve SCP that serves a folder of DICOM files: the development PACS.

It exists so the demo, the fast tests and offline users have a PACS that behaves like a real one
where it matters to a retriever: C-ECHO, C-FIND (Patient Root and Study Root, every level, the
standard matching rules, computed counts, an optional result cap), C-MOVE to registered
destinations and C-GET, with files sent exactly as stored.

How it is put together:

* :class:`_FolderIndex` keeps ``path -> header attributes`` (read with ``stop_before_pixels``),
  cached by ``(path, mtime_ns, size)``. Every query/retrieve asks it for a :class:`_Catalog`; it
  rescans the folder first unless it did so in the last ``rescan_interval_s`` seconds, so files
  copied in while the server runs are found without reparsing the others.
* :class:`_Catalog` is an immutable snapshot: instances grouped per level and the counts behind
  the computed attributes (``NumberOfStudyRelatedInstances``...). Queries never lock.
* :class:`_Query` compiles a C-FIND/C-MOVE/C-GET identifier into per-attribute filters
  (single value, ``*``/``?`` wildcards, UID lists, date/time ranges).
* Files go out as stored: the C-STORE sub-operations stream the file's own bytes (pynetdicom's
  ``STORE_SEND_CHUNKED_DATASET``), never a decoded and re-encoded dataset. pynetdicom's Q/R
  service only accepts a Dataset as "what to send", so the handlers yield a :class:`_StoredFile`
  stand-in and the sending association swaps it for the file path (see
  :func:`_send_files_as_stored`). Only when the peer did not accept the file's own transfer
  syntax is the file decoded and converted (without that, the sub-operation would just fail).
* Every association and every request passes through :meth:`DevPacs._request`, which counts it
  in a sliding window (``peak_requests_per_minute``) and injects the site's faults:
  ``reset_above_per_minute=N`` aborts every open association when more than N requests arrived in
  the last ``window_s`` (60) seconds, like the hospital PACS, including the one whose request
  went over; ``drop_every_s`` aborts every open association periodically, like a nightly network
  reset. Counters: ``resets_triggered``, ``drops``, ``associations_aborted``.
"""

from __future__ import annotations

import collections
import logging
import os
import re
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

from pydicom import dcmread
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.errors import InvalidDicomError
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence as DicomSequence
from pydicom.tag import Tag
from pynetdicom import (
    ALL_TRANSFER_SYNTAXES,
    AE,
    AllStoragePresentationContexts,
    _config,
    evt,
)
from pynetdicom.association import Association
from pynetdicom.events import Event
from pynetdicom.presentation import PresentationContext, build_context
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    PatientRootQueryRetrieveInformationModelFind,
    PatientRootQueryRetrieveInformationModelGet,
    PatientRootQueryRetrieveInformationModelMove,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
    Verification,
)

from dicom_assets.pacs.sockets import enable_tcp_nodelay

__all__ = ["DevPacs", "serve_forever"]

LOGGER = logging.getLogger("dicom_assets.devpacs")
UTF8_CHARSET = "ISO_IR 192"

# Statuses (PS3.4 C.4).
PENDING = 0xFF00
CANCELLED = 0xFE00
IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS = 0xA900
MAX_CONTEXTS = 128
#: An acceptor picks the first of its own syntaxes the requestor proposed. For C-GET storage
#: contexts, Explicit VR Little Endian first: it is what the generated cohort is stored in, so
#: those files go out as stored whenever the requestor allows it.
_STORAGE_SYNTAXES = ["1.2.840.10008.1.2.1"] + [ts for ts in ALL_TRANSFER_SYNTAXES if ts != "1.2.840.10008.1.2.1"]

# --------------------------------------------------------------------------------------------
# Levels, models and which attribute belongs to which level.

PATIENT, STUDY, SERIES, IMAGE = range(4)
LEVEL_NAMES = ("PATIENT", "STUDY", "SERIES", "IMAGE")
#: The unique key of each level, in level order.
UNIQUE_KEYS = tuple(int(Tag(k)) for k in ("PatientID", "StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"))

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

_PATIENT_ATTRS = (
    "PatientName", "PatientID", "IssuerOfPatientID", "PatientBirthDate", "PatientBirthTime", "PatientSex",
    "OtherPatientIDs", "OtherPatientNames", "EthnicGroup", "PatientComments",
)  # fmt: skip
_STUDY_ATTRS = (
    "StudyDate", "StudyTime", "AccessionNumber", "StudyID", "StudyInstanceUID", "ReferringPhysicianName",
    "StudyDescription", "PatientAge", "PatientSize", "PatientWeight", "Occupation", "AdditionalPatientHistory",
    "NameOfPhysiciansReadingStudy", "AdmittingDiagnosesDescription",
)  # fmt: skip
_SERIES_ATTRS = (
    "Modality", "SeriesNumber", "SeriesInstanceUID", "SeriesDescription", "SeriesDate", "SeriesTime",
    "BodyPartExamined", "ProtocolName", "Laterality", "Manufacturer", "ManufacturerModelName", "InstitutionName",
    "InstitutionalDepartmentName", "StationName", "OperatorsName", "PerformingPhysicianName",
    "FrameOfReferenceUID", "PatientPosition", "PerformedProcedureStepStartDate", "PerformedProcedureStepStartTime",
)  # fmt: skip
#: Attribute tag -> level; anything not listed is an IMAGE-level attribute.
_ATTR_LEVEL: dict[int, int] = {
    **{int(Tag(k)): PATIENT for k in _PATIENT_ATTRS},
    **{int(Tag(k)): STUDY for k in _STUDY_ATTRS},
    **{int(Tag(k)): SERIES for k in _SERIES_ATTRS},
}
_STUDY_DATE, _SERIES_NUMBER, _INSTANCE_NUMBER, _MODALITY = (int(Tag(k)) for k in ("StudyDate", "SeriesNumber", "InstanceNumber", "Modality"))
_RETRIEVE_AE_TITLE = int(Tag("RetrieveAETitle"))
#: Elements of the identifier that are about the request, not keys to match or return.
_CONTROL_TAGS = frozenset({int(Tag("SpecificCharacterSet")), int(Tag("QueryRetrieveLevel"))})
_WILDCARD_VRS = frozenset({"AE", "CS", "LO", "LT", "PN", "SH", "ST", "UC", "UT"})
_RANGE_VRS = frozenset({"DA", "TM", "DT"})
_NUMERIC_VRS = frozenset({"US", "SS", "UL", "SL", "FL", "FD", "UV", "SV"})
_BULK_VRS = frozenset({"OB", "OW", "OF", "OD", "OL", "OV", "UN", "SQ", "AT"})


class QueryError(Exception):
    """An identifier the SCP cannot process; ``status`` is the DIMSE failure status to return."""

    def __init__(self, message: str, status: int = IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS) -> None:
        super().__init__(message)
        self.status = status


# --------------------------------------------------------------------------------------------
# The index: one record per file, parsed once per (path, mtime_ns, size).


@dataclass(frozen=True)
class _Instance:
    """What the SCP needs from one file: where it is, how to send it, and its header values.

    ``values`` keeps each top-level non-bulk element as ``(VR, value)`` (strings and lists of
    strings for text VRs, numbers for binary numeric VRs) so responses can echo it, and
    ``texts`` the same values as strings for matching.
    """

    path: Path
    sop_class_uid: str
    transfer_syntax_uid: str
    values: Mapping[int, tuple[str, Any]]
    texts: Mapping[int, tuple[str, ...]]

    def text(self, tag: int) -> str:
        found = self.texts.get(tag, ())
        return found[0] if found else ""

    @property
    def ids(self) -> tuple[str, str, str, str]:
        """(PatientID, StudyInstanceUID, SeriesInstanceUID, SOPInstanceUID)."""
        return (self.text(UNIQUE_KEYS[0]), self.text(UNIQUE_KEYS[1]), self.text(UNIQUE_KEYS[2]), self.text(UNIQUE_KEYS[3]))

    def sort_key(self) -> tuple[Any, ...]:
        return (
            self.ids[0],
            self.text(_STUDY_DATE),
            self.ids[1],
            _int_or(self.text(_SERIES_NUMBER)),
            self.ids[2],
            _int_or(self.text(_INSTANCE_NUMBER)),
            self.ids[3],
        )


def _int_or(text: str, default: int = 1 << 31) -> int:
    try:
        return int(text)
    except ValueError:
        return default


def _element_value(elem: DataElement) -> tuple[Any, tuple[str, ...]] | None:
    """``(value to echo, values as strings)`` of a header element, or None to leave it out."""
    if elem.VR in _BULK_VRS or elem.tag.group in (0x0000, 0x0002):
        return None
    raw = elem.value
    if raw is None or raw == "":
        return "", ()
    items = list(raw) if isinstance(raw, (MultiValue, list, tuple)) else [raw]
    texts = tuple(str(item) for item in items)
    if elem.VR in _NUMERIC_VRS:
        return (items[0] if len(items) == 1 else items), texts
    return (texts[0] if len(texts) == 1 else list(texts)), texts


def _parse_instance(path: Path) -> _Instance | None:
    """Read one file's header; None for anything we could not send as stored."""
    try:
        ds = dcmread(path, stop_before_pixels=True)
        meta = ds.file_meta
        sop_class = str(meta.MediaStorageSOPClassUID)
        syntax = str(meta.TransferSyntaxUID)
        values: dict[int, tuple[str, Any]] = {}
        texts: dict[int, tuple[str, ...]] = {}
        for elem in ds:
            converted = _element_value(elem)
            if converted is not None:
                values[int(elem.tag)] = (str(elem.VR), converted[0])
                texts[int(elem.tag)] = converted[1]
    except (InvalidDicomError, OSError, AttributeError, ValueError, KeyError, EOFError, LookupError) as exc:
        LOGGER.debug("skipping %s: %s", path, exc)
        return None
    instance = _Instance(path, sop_class, syntax, values, texts)
    if not instance.ids[3] or not instance.ids[1] or not instance.ids[2]:
        LOGGER.debug("skipping %s: no Study/Series/SOP Instance UID", path)
        return None
    return instance


def _walk_files(root: Path) -> Iterator[tuple[Path, os.stat_result]]:
    """Every regular, non-hidden file under ``root`` (hidden names are in-flight temp files)."""
    stack = [root]
    while stack:
        directory = stack.pop()
        try:
            entries = list(os.scandir(directory))
        except OSError:
            continue
        for entry in entries:
            if entry.name.startswith("."):
                continue
            try:
                if entry.is_dir(follow_symlinks=False):
                    stack.append(Path(entry.path))
                elif entry.is_file():
                    yield Path(entry.path), entry.stat()
            except OSError:
                continue  # vanished while we looked


class _FolderIndex:
    """Thread-safe ``path -> _Instance`` cache of a folder, rescanned at most every interval."""

    def __init__(self, root: Path, rescan_interval_s: float) -> None:
        self._root = root
        self._interval = rescan_interval_s
        self._lock = threading.Lock()
        self._files: dict[Path, tuple[tuple[int, int], _Instance | None]] = {}
        self._catalog: _Catalog | None = None
        self._scanned_at = float("-inf")

    def catalog(self, force: bool = False) -> "_Catalog":
        """The current snapshot, rescanning first if the last scan is older than the interval."""
        with self._lock:
            if force or self._catalog is None or time.monotonic() - self._scanned_at >= self._interval:
                self._rescan()
            assert self._catalog is not None
            return self._catalog

    def _rescan(self) -> None:
        files: dict[Path, tuple[tuple[int, int], _Instance | None]] = {}
        changed = False
        for path, stat in _walk_files(self._root):
            key = (stat.st_mtime_ns, stat.st_size)
            cached = self._files.get(path)
            if cached is not None and cached[0] == key:
                files[path] = cached
            else:
                files[path] = (key, _parse_instance(path))
                changed = True
        changed = changed or files.keys() != self._files.keys()
        self._files = files
        if changed or self._catalog is None:
            self._catalog = _Catalog(record for _, record in files.values() if record is not None)
            LOGGER.debug("index of %s: %d instances", self._root, len(self._catalog.instances))
        self._scanned_at = time.monotonic()


# --------------------------------------------------------------------------------------------
# The catalog: groups per level and the counts behind computed attributes.


@dataclass(frozen=True)
class _Group:
    """The instances under one entity (a patient, study, series or instance) at a query level."""

    level: int
    ids: tuple[str, ...]
    instances: tuple[_Instance, ...]

    @property
    def first(self) -> _Instance:
        return self.instances[0]


@dataclass
class _Counts:
    studies: set[str] = field(default_factory=set)
    series: set[str] = field(default_factory=set)
    instances: int = 0
    modalities: set[str] = field(default_factory=set)


class _Catalog:
    """An immutable snapshot of the served instances, grouped for each query level."""

    def __init__(self, records: Iterable[_Instance]) -> None:
        self.instances: tuple[_Instance, ...] = tuple(sorted(records, key=_Instance.sort_key))
        grouped: list[dict[tuple[str, ...], list[_Instance]]] = [{}, {}, {}, {}]
        self.patients: dict[str, _Counts] = {}
        self.studies: dict[str, _Counts] = {}
        self.series: dict[str, _Counts] = {}
        for inst in self.instances:
            ids = inst.ids
            for level in range(4):
                grouped[level].setdefault(ids[: level + 1], []).append(inst)
            modality = inst.text(_MODALITY)
            for counts in (self.patients.setdefault(ids[0], _Counts()), self.studies.setdefault(ids[1], _Counts())):
                counts.studies.add(ids[1])
                counts.series.add(ids[2])
                counts.instances += 1
                if modality:
                    counts.modalities.add(modality)
            self.series.setdefault(ids[2], _Counts()).instances += 1
        self.groups: tuple[tuple[_Group, ...], ...] = tuple(
            tuple(_Group(level, key, tuple(members)) for key, members in grouped[level].items()) for level in range(4)
        )
        #: Per level, the groups under each StudyInstanceUID (catalog order): a query naming one
        #: study looks at its groups only, not at every group of the level (one series query per
        #: study over thousands of studies would otherwise scan them all every time).
        self.groups_of_study: tuple[dict[str, tuple[_Group, ...]], ...] = tuple(
            _by_study(self.groups[level]) if level >= STUDY else {} for level in range(4)
        )

    def computed(self, tag: int, group: _Group) -> tuple[str, Any] | None:
        """``(VR, value)`` of a computed attribute (``NumberOfStudyRelatedSeries``...) for ``group``.

        None if ``tag`` is not computed, or if the group is above the attribute's level (a
        patient has no NumberOfSeriesRelatedInstances), in which case it is returned empty.
        """
        spec = _COMPUTED.get(tag)
        if spec is None or group.level < spec[0]:
            return None
        return spec[1], spec[2](self, group.ids)


_COMPUTED: dict[int, tuple[int, str, Callable[[_Catalog, tuple[str, ...]], Any]]] = {
    int(Tag("NumberOfPatientRelatedStudies")): (PATIENT, "IS", lambda c, ids: len(c.patients[ids[0]].studies)),
    int(Tag("NumberOfPatientRelatedSeries")): (PATIENT, "IS", lambda c, ids: len(c.patients[ids[0]].series)),
    int(Tag("NumberOfPatientRelatedInstances")): (PATIENT, "IS", lambda c, ids: c.patients[ids[0]].instances),
    int(Tag("NumberOfStudyRelatedSeries")): (STUDY, "IS", lambda c, ids: len(c.studies[ids[1]].series)),
    int(Tag("NumberOfStudyRelatedInstances")): (STUDY, "IS", lambda c, ids: c.studies[ids[1]].instances),
    int(Tag("ModalitiesInStudy")): (STUDY, "CS", lambda c, ids: sorted(c.studies[ids[1]].modalities)),
    int(Tag("NumberOfSeriesRelatedInstances")): (SERIES, "IS", lambda c, ids: c.series[ids[2]].instances),
    int(Tag("InstanceAvailability")): (PATIENT, "CS", lambda c, ids: "ONLINE"),
}


def _by_study(groups: Sequence[_Group]) -> dict[str, tuple[_Group, ...]]:
    out: dict[str, list[_Group]] = {}
    for group in groups:
        out.setdefault(group.ids[STUDY], []).append(group)
    return {uid: tuple(members) for uid, members in out.items()}


def _as_texts(value: Any) -> tuple[str, ...]:
    if value is None or value == "":
        return ()
    if isinstance(value, (list, tuple, MultiValue)):
        return tuple(str(v) for v in value)
    return (str(value),)


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
    if vr in _WILDCARD_VRS and ("*" in text or "?" in text):
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


def _value_for(catalog: _Catalog, tag: int, group: _Group, level: int, ae_title: str) -> tuple[str, Any] | None:
    """``(VR, value)`` of ``tag`` for a matched group, or None to return it empty."""
    if tag == _RETRIEVE_AE_TITLE:
        return "AE", ae_title
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


# --------------------------------------------------------------------------------------------
# Sending files as stored.


class _StoredFile(Dataset):
    """What the Q/R handlers yield as "the dataset to send": it names a file, holds no data.

    pynetdicom's C-MOVE/C-GET service requires a Dataset; the sending association (patched by
    :func:`_send_files_as_stored`) recognises this class and streams the file instead. It carries
    the SOP Instance UID so a failed sub-operation is still listed in FailedSOPInstanceUIDList.
    """

    def __init__(self, instance: _Instance) -> None:
        super().__init__()
        object.__setattr__(self, "devpacs_instance", instance)
        self.SOPClassUID = instance.sop_class_uid
        self.SOPInstanceUID = instance.ids[3]
        self.file_meta = FileMetaDataset()
        self.file_meta.TransferSyntaxUID = instance.transfer_syntax_uid

    @property
    def instance(self) -> _Instance:
        return object.__getattribute__(self, "devpacs_instance")  # type: ignore[no-any-return]


def _accepts_as_stored(assoc: Association, instance: _Instance) -> bool:
    """Whether the peer accepted the file's own (SOP class, transfer syntax) with us as SCU."""
    return any(
        cx.abstract_syntax == instance.sop_class_uid and cx.transfer_syntax[0] == instance.transfer_syntax_uid and cx.as_scu
        for cx in assoc.accepted_contexts
    )


def _send_files_as_stored(assoc: Association) -> None:
    """Make ``assoc.send_c_store`` turn a :class:`_StoredFile` into its file path (idempotent).

    With ``STORE_SEND_CHUNKED_DATASET`` on, pynetdicom streams a path's bytes after the file meta
    unchanged. If the peer did not accept the file's transfer syntax, we send the decoded file so
    pynetdicom can convert between uncompressed syntaxes rather than fail outright.
    """
    if getattr(assoc, "_devpacs_sends_files", False):
        return
    original = assoc.send_c_store

    def send_c_store(dataset: Any, *args: Any, **kwargs: Any) -> Dataset:
        if isinstance(dataset, _StoredFile):
            instance = dataset.instance
            if _accepts_as_stored(assoc, instance):
                return original(instance.path, *args, **kwargs)
            LOGGER.info("peer did not accept %s as stored; converting", instance.path.name)
            return original(dcmread(instance.path), *args, **kwargs)
        return original(dataset, *args, **kwargs)

    assoc.send_c_store = send_c_store  # type: ignore[method-assign]
    assoc._devpacs_sends_files = True  # type: ignore[attr-defined]


def _responses_only_to_the_sender(assoc: Association) -> None:
    """Keep ``assoc``'s reactor thread from taking the responses its ``send_c_store`` waits for.

    pynetdicom's reactor polls the DIMSE queue (``get_msg(block=False)``) to serve requests
    from the peer; ``send_c_store`` pauses it first (``_reactor_checkpoint.clear()``, then waits
    for ``_is_paused``). That handshake has a hole: ``_is_paused`` is still True just after the
    reactor passed its checkpoint, so a sender pausing it then goes ahead, and the reactor's
    next poll can take the C-STORE-RSP (logged "Received unexpected C-STORE service message").
    The sub-operation then waits the whole DIMSE timeout (30 s), sending nothing on the
    C-MOVE's association meanwhile: the requestor sees a C-MOVE stall for its own timeout.

    A C-MOVE sub-association only sends C-STOREs; the storage SCP at the other end sends
    responses, never requests. So its reactor has nothing to poll for: every message that
    comes back belongs to the ``send_c_store`` waiting for it (a blocking ``get_msg``).
    """
    dimse = assoc.dimse
    take = dimse.get_msg

    def get_msg(block: bool = False) -> Any:
        return take(block) if block else (None, None)

    dimse.get_msg = get_msg  # type: ignore[method-assign]


class _DevPacsAE(AE):
    """An AE whose outgoing associations (C-MOVE sub-operations) send files as stored, and
    whose reactor threads leave the C-STORE responses to the sender (see
    :func:`_responses_only_to_the_sender`)."""

    def associate(self, *args: Any, **kwargs: Any) -> Association:  # type: ignore[override]
        assoc = super().associate(*args, **kwargs)
        _responses_only_to_the_sender(assoc)
        _send_files_as_stored(assoc)
        return assoc


def _move_contexts(instances: Sequence[_Instance]) -> list[PresentationContext]:
    """One context per (SOP class, transfer syntax) the files need, so each goes out as stored."""
    pairs = list(dict.fromkeys((i.sop_class_uid, i.transfer_syntax_uid) for i in instances))
    if len(pairs) > MAX_CONTEXTS:
        LOGGER.warning("C-MOVE needs %d presentation contexts; only %d can be proposed", len(pairs), MAX_CONTEXTS)
    return [build_context(sop_class, syntax) for sop_class, syntax in pairs[:MAX_CONTEXTS]] or [build_context(Verification)]


# --------------------------------------------------------------------------------------------
# The server.


def _quiet_pynetdicom() -> None:
    """pynetdicom logs every PDU at INFO; keep it at WARNING unless the user chose a level."""
    logger = logging.getLogger("pynetdicom")
    if logger.level == logging.NOTSET:
        logger.setLevel(logging.WARNING)


class DevPacs:
    """A Query/Retrieve SCP serving the DICOM files under ``storage_dir`` (see module doc).

    ``port=0`` binds a free port; :attr:`port` holds the bound one after :meth:`start`.
    ``move_destinations`` maps AE titles to ``(host, port)`` for C-MOVE; any other destination
    gets 0xA801. ``max_find_results > 0`` caps C-FIND matches like many hospital PACSes do
    (the final status stays Success, as theirs does). ``rescan_interval_s`` bounds how often
    the folder is rescanned for new or changed files.

    Fault injection (0 = off): ``reset_above_per_minute=N`` aborts every open association when a
    request (an association or a C-ECHO/C-FIND/C-MOVE/C-GET) arrives with more than N requests in
    the last ``window_s`` seconds; ``drop_every_s`` aborts every open association that often.
    ``window_s`` (60) is shortened by tests only.
    """

    def __init__(
        self,
        storage_dir: Path,
        ae_title: str = "DEVPACS",
        host: str = "127.0.0.1",
        port: int = 0,
        move_destinations: Mapping[str, tuple[str, int]] | None = None,
        max_find_results: int = 0,
        *,
        rescan_interval_s: float = 0.5,
        reset_above_per_minute: int = 0,
        drop_every_s: float = 0,
        window_s: float = 60.0,
    ) -> None:
        if reset_above_per_minute < 0 or drop_every_s < 0:
            raise ValueError("reset_above_per_minute and drop_every_s must be >= 0 (0 = off)")
        if window_s <= 0:
            raise ValueError("window_s must be > 0")
        self.storage_dir = Path(storage_dir)
        self.ae_title = ae_title
        self.host = host
        self.port = port
        self.max_find_results = max_find_results
        self._destinations: dict[str, tuple[str, int]] = dict(move_destinations or {})
        self._index = _FolderIndex(self.storage_dir, rescan_interval_s)
        self._lock = threading.Lock()
        self._served = 0
        self._served_by_kind: dict[str, int] = {}
        self._ae: _DevPacsAE | None = None
        self._server: Any = None
        # Fault injection and the request-rate counters behind it.
        self.reset_above_per_minute = int(reset_above_per_minute)
        self.drop_every_s = float(drop_every_s)
        self.window_s = float(window_s)
        self._arrivals: collections.deque[float] = collections.deque()
        self._peak = 0
        self._resets = 0
        self._drops = 0
        self._aborted = 0
        self._stop_drops = threading.Event()
        self._drop_thread: threading.Thread | None = None

    # ---- lifecycle

    def start(self) -> "DevPacs":
        """Index the folder and start serving in background threads; returns self."""
        if self._ae is not None:
            raise RuntimeError("DevPacs is already running")
        _quiet_pynetdicom()
        enable_tcp_nodelay()
        # Process-wide: send_c_store(<path>) streams the file's bytes instead of re-encoding it.
        _config.STORE_SEND_CHUNKED_DATASET = True
        self.storage_dir.mkdir(parents=True, exist_ok=True)
        catalog = self._index.catalog(force=True)
        ae = self._make_ae()
        server = ae.start_server((self.host, self.port), block=False, evt_handlers=self._handlers())
        assert server is not None
        self._ae = ae
        self._server = server
        self.port = int(server.server_address[1])
        if self.drop_every_s > 0:
            self._stop_drops.clear()
            self._drop_thread = threading.Thread(target=self._drop_loop, name="devpacs-drops", daemon=True)
            self._drop_thread.start()
        LOGGER.info(
            "DevPacs %s serving %d instances from %s on %s:%d",
            self.ae_title, len(catalog.instances), self.storage_dir, self.host, self.port,
        )  # fmt: skip
        return self

    def stop(self) -> None:
        """Stop listening and end every association (idempotent)."""
        ae, self._ae = self._ae, None
        self._stop_drops.set()
        drop_thread, self._drop_thread = self._drop_thread, None
        if drop_thread is not None:
            drop_thread.join()
        self._server = None
        if ae is not None:
            ae.shutdown()
            LOGGER.info("DevPacs %s on port %d stopped", self.ae_title, self.port)

    def __enter__(self) -> "DevPacs":
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()

    # ---- configuration and introspection

    def add_move_destination(self, ae_title: str, host: str, port: int) -> None:
        """Register (or replace) a C-MOVE destination; takes effect for the next C-MOVE."""
        with self._lock:
            self._destinations = {**self._destinations, ae_title.strip(): (host, int(port))}

    @property
    def requests_served(self) -> int:
        """Associations requested plus C-ECHO/C-FIND/C-MOVE/C-GET requests received."""
        with self._lock:
            return self._served

    def requests_by_kind(self) -> dict[str, int]:
        """The same count split by kind (``ASSOCIATION``, ``C-ECHO``, ``C-FIND``, ...)."""
        with self._lock:
            return dict(self._served_by_kind)

    @property
    def peak_requests_per_minute(self) -> int:
        """The most requests (as counted by :attr:`requests_served`) seen in any ``window_s``
        window so far, the requests that triggered a reset included."""
        with self._lock:
            return self._peak

    @property
    def resets_triggered(self) -> int:
        """Requests that arrived with more than ``reset_above_per_minute`` in the window (each
        aborted every open association)."""
        with self._lock:
            return self._resets

    @property
    def drops(self) -> int:
        """Periodic drops done by ``drop_every_s`` (each aborted every open association)."""
        with self._lock:
            return self._drops

    @property
    def associations_aborted(self) -> int:
        """Associations aborted by resets and drops."""
        with self._lock:
            return self._aborted

    def drop_all(self) -> int:
        """Abort every open association now (what a reset or a drop does); returns how many."""
        return self._abort_all()

    def rescan(self) -> int:
        """Rescan the folder now (ignoring the interval); returns the number of instances served."""
        return len(self._index.catalog(force=True).instances)

    # ---- internals

    def _make_ae(self) -> _DevPacsAE:
        ae = _DevPacsAE(ae_title=self.ae_title)
        ae.maximum_associations = 64
        ae.add_supported_context(Verification, ALL_TRANSFER_SYNTAXES)
        for model in _MODEL_LEVELS:
            ae.add_supported_context(model, ALL_TRANSFER_SYNTAXES)
        # C-GET: the requestor proposes storage contexts in which it is the SCP; accept that role.
        for cx in AllStoragePresentationContexts:
            ae.add_supported_context(cx.abstract_syntax, _STORAGE_SYNTAXES, scp_role=True, scu_role=False)
        return ae

    def _handlers(self) -> list[Any]:
        return [
            (evt.EVT_REQUESTED, self._on_association),
            (evt.EVT_C_ECHO, self._on_echo),
            (evt.EVT_C_FIND, self._on_find),
            (evt.EVT_C_MOVE, self._on_move),
            (evt.EVT_C_GET, self._on_get),
        ]

    def _request(self, kind: str, event: Event) -> bool:
        """Count one association or request; True when it went over ``reset_above_per_minute``.

        Then every open association is aborted: the others by a helper thread (a blocking abort
        waits for the association to end), the caller's own here without blocking (this is its
        thread); the handler then answers nothing more.
        """
        now = time.monotonic()
        with self._lock:
            self._served += 1
            self._served_by_kind[kind] = self._served_by_kind.get(kind, 0) + 1
            arrivals = self._arrivals
            arrivals.append(now)
            while now - arrivals[0] >= self.window_s:
                arrivals.popleft()
            in_window = len(arrivals)
            self._peak = max(self._peak, in_window)
            reset = 0 < self.reset_above_per_minute < in_window
            if reset:
                self._resets += 1
        LOGGER.debug("%s from %s", kind, event.assoc.requestor.ae_title)
        if reset:
            LOGGER.warning(
                "%d requests in %g s (limit %d): resetting every association",
                in_window, self.window_s, self.reset_above_per_minute,
            )  # fmt: skip
            threading.Thread(target=self._abort_all, args=(event.assoc,), name="devpacs-reset", daemon=True).start()
            event.assoc.abort(block=False)  # queue the A-ABORT; this thread is the association's
            with self._lock:
                self._aborted += 1
        return reset

    def _abort_all(self, spare: Association | None = None) -> int:
        """Abort every association a client opened with us (not ``spare``); returns how many."""
        server = self._server
        if server is None:
            return 0
        aborted = 0
        for assoc in list(server.active_associations):
            if assoc is spare or assoc.is_aborted or assoc.is_released:
                continue
            try:
                assoc.abort()
            except Exception as exc:  # noqa: BLE001 - one association that will not die stops no other
                LOGGER.debug("abort of an association failed: %s", exc)
                continue
            aborted += 1
        with self._lock:
            self._aborted += aborted
        return aborted

    def _drop_loop(self) -> None:
        while not self._stop_drops.wait(self.drop_every_s):
            with self._lock:
                self._drops += 1
            n = self._abort_all()
            LOGGER.warning("periodic drop: aborted %d association(s)", n)

    def _destination(self, ae_title: str | None) -> tuple[str, int] | None:
        with self._lock:
            return self._destinations.get((ae_title or "").strip())

    def _on_association(self, event: Event) -> None:
        self._request("ASSOCIATION", event)  # an abort here means pynetdicom never accepts it

    def _on_echo(self, event: Event) -> int:
        if self._request("C-ECHO", event):
            return 0xC000  # never sent: the association is aborted
        return 0x0000

    def _on_find(self, event: Event) -> Iterator[tuple[int, Dataset | None]]:
        if self._request("C-FIND", event):
            return
        try:
            query = _Query.parse(event.identifier, event.context.abstract_syntax)
        except QueryError as exc:
            LOGGER.warning("C-FIND refused: %s", exc)
            yield exc.status, None
            return
        catalog = self._index.catalog()
        matches = query.matches(catalog)
        if self.max_find_results > 0:
            matches = matches[: self.max_find_results]
        for group in matches:
            if event.is_cancelled:
                yield CANCELLED, None
                return
            yield PENDING, query.response(catalog, group, self.ae_title)

    def _on_move(self, event: Event) -> Iterator[Any]:
        if self._request("C-MOVE", event):
            yield None, None  # pynetdicom sees the association is gone and stops here
            return
        destination = self._destination(event.move_destination)
        if destination is None:
            LOGGER.warning("C-MOVE to unknown destination %r refused", event.move_destination)
            yield None, None
            return
        try:
            instances = self._retrieve_set(event)
        except QueryError as exc:
            LOGGER.warning("C-MOVE refused: %s", exc)
            # pynetdicom only sends a failure status after associating with the destination;
            # propose what we serve, which a storage SCP accepts, then fail the one sub-operation.
            yield (*destination, {"contexts": _move_contexts(self._index.catalog().instances)})
            yield 1
            yield exc.status, None
            return
        yield (*destination, {"contexts": _move_contexts(instances)})
        yield len(instances)
        yield from self._sub_operations(event, instances)

    def _on_get(self, event: Event) -> Iterator[Any]:
        if self._request("C-GET", event):
            yield 0  # no sub-operations; the response goes nowhere, the association is gone
            return
        _send_files_as_stored(event.assoc)
        try:
            instances = self._retrieve_set(event)
        except QueryError as exc:
            LOGGER.warning("C-GET refused: %s", exc)
            yield 1
            yield exc.status, None
            return
        yield len(instances)
        yield from self._sub_operations(event, instances)

    def _retrieve_set(self, event: Event) -> list[_Instance]:
        query = _Query.parse(event.identifier, event.context.abstract_syntax)
        return query.instances(self._index.catalog())

    @staticmethod
    def _sub_operations(event: Event, instances: Sequence[_Instance]) -> Iterator[tuple[int, Dataset | None]]:
        """One Pending per instance (pynetdicom sends it and reports the counts), or Cancel."""
        for instance in instances:
            if event.is_cancelled:
                yield CANCELLED, None
                return
            yield PENDING, _StoredFile(instance)


def serve_forever(
    storage_dir: Path,
    port: int,
    ae_title: str = "DEVPACS",
    host: str = "127.0.0.1",
    move_destinations: Mapping[str, tuple[str, int]] | None = None,
    reset_above_per_minute: int = 0,
    drop_every_s: float = 0,
    window_s: float = 60.0,
) -> None:
    """Serve ``storage_dir`` until SIGINT or SIGTERM (the ``dicom-assets pacs serve`` command);
    the fault-injection arguments are :class:`DevPacs`'s."""
    stop = threading.Event()
    previous: dict[int, Any] = {}
    if threading.current_thread() is threading.main_thread():

        def _on_signal(signum: int, frame: FrameType | None) -> None:
            LOGGER.info("received signal %d, stopping", signum)
            stop.set()

        for signum in (signal.SIGINT, signal.SIGTERM):
            previous[signum] = signal.signal(signum, _on_signal)
    try:
        with DevPacs(
            storage_dir, ae_title=ae_title, host=host, port=port, move_destinations=move_destinations,
            reset_above_per_minute=reset_above_per_minute, drop_every_s=drop_every_s, window_s=window_s,
        ):  # fmt: skip
            try:
                stop.wait()
            except KeyboardInterrupt:
                pass
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
