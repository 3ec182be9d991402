"""What the bundled PACS serves: a live index of a folder's DICOM files and immutable catalogs.

* :class:`_FolderIndex` keeps ``path -> header attributes`` (read with ``stop_before_pixels``),
  cached by ``(path, mtime_ns, size)``. Every query/retrieve asks it for a :class:`_Catalog`; it
  rescans the folder first unless it did so in the last ``rescan_interval_s`` seconds, so files
  copied in while the server runs are found without reparsing the others.
* :class:`_Catalog` is an immutable snapshot: instances grouped per level and the counts behind
  the computed attributes (``NumberOfStudyRelatedInstances``...). Queries never lock.

Split out of :mod:`dicom_assets.devpacs.server` (names kept, so the moved code reads as before).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

from pydicom import dcmread
from pydicom.dataelem import DataElement
from pydicom.errors import InvalidDicomError
from pydicom.multival import MultiValue
from pydicom.tag import Tag

LOGGER = logging.getLogger("dicom_assets.devpacs")

# --------------------------------------------------------------------------------------------
# Levels and which attribute belongs to which level.

PATIENT, STUDY, SERIES, IMAGE = range(4)
LEVEL_NAMES = ("PATIENT", "STUDY", "SERIES", "IMAGE")
#: The unique key of each level, in level order.
UNIQUE_KEYS = tuple(int(Tag(k)) for k in ("PatientID", "StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"))

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
_NUMERIC_VRS = frozenset({"US", "SS", "UL", "SL", "FL", "FD", "UV", "SV"})
_BULK_VRS = frozenset({"OB", "OW", "OF", "OD", "OL", "OV", "UN", "SQ", "AT"})


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
    """Thread-safe ``path -> _Instance`` cache of a folder, rescanned at most every interval.

    ``parse`` reads one file (:func:`_parse_instance` unless the server passes its own, which is
    how a test counts the files parsed).
    """

    def __init__(
        self, root: Path, rescan_interval_s: float, parse: Callable[[Path], _Instance | None] = _parse_instance
    ) -> None:
        self._root = root
        self._interval = rescan_interval_s
        self._parse = parse
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
                files[path] = (key, self._parse(path))
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
    sop_classes: set[str] = field(default_factory=set)


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
                counts.sop_classes.add(inst.sop_class_uid)
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
    # A matching key like ModalitiesInStudy: a study matches when any of its classes is (one of) the
    # value(s). Orthanc 1.10.1 returns it but matches no study on it: dicom_assets_tests/test_devpacs_query_keys.py.
    int(Tag("SOPClassesInStudy")): (STUDY, "UI", lambda c, ids: sorted(c.studies[ids[1]].sop_classes)),
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

