"""A cohort planned study by study: what request-file tests, the demo and the benchmark query.

:func:`~dicom_assets.devpacs.cohort.generate_cohort` makes N look-alike patients, which is right
for throughput but useless for a request file: a request file names *particular* patients,
accessions and dates, and the interesting cases are the awkward ones (a PatientID with leading
zeros next to the same number without them, an accession shared by two patients, a localizer or
a dose report nobody asked for). Here the caller lists exactly what should exist
(:class:`PlannedStudy` / :class:`PlannedSeries`) and :func:`write_planned_cohort` writes it.

* **Deterministic**: every UID is derived from the seed and what the study/series is (patient,
  accession, date, description, position), so the same plan and seed give the same UIDs on every
  machine and a test can name a study by its UID before the PACS is even started. The flip side:
  writing the same plan twice into one PACS gives the same instances (use another seed).
* **Small**: 32x32 images, a few slices; the pixels and headers come from
  :mod:`~dicom_assets.devpacs.cohort` (same phantom, same layout
  ``<out>/<StudyInstanceUID>/<SeriesInstanceUID>/<SOPInstanceUID>.dcm``, atomic writes).
* **Kinds** (:data:`SERIES_KINDS`): ``image`` (CT or MR Image Storage, by modality),
  ``localizer`` (the same, ImageType ``ORIGINAL\\PRIMARY\\LOCALIZER``, description
  ``Localizer``; it keeps the series' modality because an MR scout is MR: a CT-only query must
  not match an MR study because of its scout), ``sr`` (Basic Text SR) and ``dose_sr`` (X-Ray
  Radiation Dose SR, TID 10011 shaped, description ``Dose Report``), both with Modality ``SR``
  and one instance (:mod:`~dicom_assets.devpacs.sr_documents`).

:func:`request_test_cohort` is the fixed scenario the request-file tests share (documented on
the function and in :data:`REQUEST_TEST_STUDIES`), :func:`request_test_csv` /
:func:`write_request_test_xlsx` its request file, and :func:`bulk_request_cohort` /
:func:`bulk_request_csv` the 1,000-row benchmark. The scenario's row -> study expectations are
part of the returned :class:`ScenarioRow` values, so tests assert against one definition.
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import zlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Literal, Mapping, Sequence

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, MRImageStorage, generate_uid

from dicom_assets.devpacs.cohort import (
    CohortSummary,
    GeneratedSeries,
    _make_patient,
    _Patient,
    _phantom_slices,
    _rng,
    _series_template,
    _SeriesPlan,
    _Study,
    _write_atomically,
)
from dicom_assets.devpacs.sr_documents import BASIC_TEXT_SR, XRAY_RADIATION_DOSE_SR, sr_document

__all__ = [
    "BASIC_TEXT_SR",
    "REQUEST_TEST_COLUMNS",
    "REQUEST_TEST_STUDIES",
    "SERIES_KINDS",
    "XRAY_RADIATION_DOSE_SR",
    "PlannedSeries",
    "PlannedStudy",
    "ScenarioRow",
    "WrittenCohort",
    "WrittenSeries",
    "WrittenStudy",
    "bulk_request_cohort",
    "bulk_request_csv",
    "bulk_request_studies",
    "request_file_csv",
    "request_test_cohort",
    "request_test_csv",
    "request_test_rows",
    "write_planned_cohort",
    "write_request_test_xlsx",
    "write_text_xlsx",
]

SeriesKind = Literal["image", "localizer", "sr", "dose_sr"]
SERIES_KINDS: tuple[str, ...] = ("image", "localizer", "sr", "dose_sr")
_IMAGE_STORAGE = {"CT": str(CTImageStorage), "MR": str(MRImageStorage)}
_DEFAULT_DESCRIPTIONS = {"image": "Axial 5.0 mm", "localizer": "Localizer", "sr": "Report", "dose_sr": "Dose Report"}
_UID_NAMESPACE = "dicom-assets-request-cohort"
_SLICE_MM = 5.0


# --------------------------------------------------------------------------------------------
# The plan and what was written.


@dataclass(frozen=True)
class PlannedSeries:
    """One series to write. ``series_description`` defaults per kind (``Localizer``, ``Dose Report``...);
    ``slices`` is the number of instances (SR kinds always write one)."""

    modality: str = "CT"
    series_description: str | None = None
    kind: SeriesKind = "image"
    slices: int = 3

    def __post_init__(self) -> None:
        if self.kind not in SERIES_KINDS:
            raise ValueError(f"kind {self.kind!r} is not one of {', '.join(SERIES_KINDS)}")
        if self.kind in ("image", "localizer") and self.modality not in _IMAGE_STORAGE:
            raise ValueError(f"an {self.kind} series is CT or MR, not {self.modality!r}")
        if self.kind in ("sr", "dose_sr") and self.modality != "SR":
            raise ValueError(f"a {self.kind} series has Modality SR, not {self.modality!r}")

    @property
    def description(self) -> str:
        return self.series_description if self.series_description is not None else _DEFAULT_DESCRIPTIONS[self.kind]

    @property
    def instances(self) -> int:
        return 1 if self.kind in ("sr", "dose_sr") else self.slices


@dataclass(frozen=True)
class PlannedStudy:
    """One study to write: its patient, StudyDate (``YYYYMMDD``), accession, description and series.

    ``label`` names the study in a scenario (``WrittenCohort.study(label)``); ``series`` may be
    given as a list (it is kept as a tuple).
    """

    patient_id: str
    study_date: str
    accession_number: str
    study_description: str
    series: Sequence[PlannedSeries] = ()
    label: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "series", tuple(self.series))
        dt.datetime.strptime(self.study_date, "%Y%m%d")  # a bad date fails here, not in the PACS


@dataclass(frozen=True)
class WrittenSeries:
    """One series on disk, with what a series filter looks at (kind, modality, description, SOP class)."""

    patient_id: str
    study_instance_uid: str
    series_instance_uid: str
    series_number: int
    modality: str
    kind: str
    series_description: str
    sop_class_uid: str
    sop_instance_uids: tuple[str, ...]
    bytes: int

    @property
    def instances(self) -> int:
        return len(self.sop_instance_uids)

    def generated(self) -> GeneratedSeries:
        """The same series as :func:`generate_cohort` describes one (for helpers that take those)."""
        return GeneratedSeries(self.patient_id, self.study_instance_uid, self.series_instance_uid, self.series_number,
                               self.instances, self.bytes, self.sop_instance_uids)  # fmt: skip


@dataclass(frozen=True)
class WrittenStudy:
    """One study on disk: its keys as a C-FIND at STUDY level returns them, and its series."""

    label: str
    patient_id: str
    study_instance_uid: str
    study_date: str
    accession_number: str
    study_description: str
    series: tuple[WrittenSeries, ...]

    @property
    def modalities(self) -> tuple[str, ...]:
        """ModalitiesInStudy as a PACS computes it (sorted, distinct)."""
        return tuple(sorted({s.modality for s in self.series}))

    @property
    def sop_classes(self) -> tuple[str, ...]:
        """SOPClassesInStudy (sorted, distinct)."""
        return tuple(sorted({s.sop_class_uid for s in self.series}))

    @property
    def instances(self) -> int:
        return sum(s.instances for s in self.series)


@dataclass(frozen=True)
class WrittenCohort:
    """Everything :func:`write_planned_cohort` wrote under ``root``, in plan order."""

    root: Path
    studies: tuple[WrittenStudy, ...]

    def study(self, label: str) -> WrittenStudy:
        """The study planned with ``label`` (KeyError if none)."""
        for study in self.studies:
            if study.label == label:
                return study
        raise KeyError(f"no study labelled {label!r}; labels: {', '.join(s.label for s in self.studies)}")

    def studies_of(self, patient_id: str) -> tuple[WrittenStudy, ...]:
        return tuple(s for s in self.studies if s.patient_id == patient_id)

    def with_accession(self, accession_number: str) -> tuple[WrittenStudy, ...]:
        return tuple(s for s in self.studies if s.accession_number == accession_number)

    @property
    def series(self) -> tuple[WrittenSeries, ...]:
        return tuple(series for study in self.studies for series in study.series)

    @property
    def patients(self) -> tuple[str, ...]:
        return tuple(sorted({s.patient_id for s in self.studies}))

    @property
    def instances(self) -> int:
        return sum(s.instances for s in self.studies)

    @property
    def bytes(self) -> int:
        return sum(s.bytes for s in self.series)

    def summary(self) -> CohortSummary:
        """The cohort as a :class:`CohortSummary` (what the other PACS helpers and tests take)."""
        return CohortSummary(tuple(s.generated() for s in self.series))


# --------------------------------------------------------------------------------------------
# Writing a plan.


def _uid(seed: int, *parts: object) -> str:
    """A UID that depends only on the seed and ``parts`` (pydicom's hash-based derivation)."""
    return str(generate_uid(entropy_srcs=[_UID_NAMESPACE, str(seed), *(repr(p) for p in parts)]))


def _patient(patient_id: str, seed: int) -> _Patient:
    """Demographics that depend on the seed and the PatientID only (``000123`` and ``123`` differ)."""
    return _make_patient(patient_id, _rng(seed, zlib.crc32(patient_id.encode("utf-8"))))


def _body_part(description: str) -> str:
    """``CT CHEST`` -> ``CHEST``: the word after the modality, as a CS value."""
    words = description.upper().split()
    part = words[1] if len(words) > 1 else (words[0] if words else "")
    return "".join(c for c in part if c.isascii() and (c.isalnum() or c == "_"))[:16]


def _study(planned: PlannedStudy, uid: str, seed: int) -> _Study:
    rng = _rng(seed, zlib.crc32(uid.encode()))
    seconds = int(rng.integers(7 * 3600, 18 * 3600))
    return _Study(
        uid=uid,
        date=planned.study_date,
        time=f"{seconds // 3600:02d}{seconds // 60 % 60:02d}{seconds % 60:02d}",
        study_id=str(int(rng.integers(1, 100000))),
        accession=planned.accession_number,
        description=planned.study_description,
        body_part=_body_part(planned.study_description),
        frame_of_reference_uid=_uid(seed, uid, "frame"),
    )


def _series_time(study: _Study, number: int) -> str:
    start = dt.datetime.strptime(study.time, "%H%M%S") + dt.timedelta(minutes=2 * number)
    return start.strftime("%H%M%S")


def _with_meta(ds: Dataset) -> Dataset:
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return ds


def _as_mr(ds: Dataset) -> None:
    """Turn the CT template into an MR image: MR Image module attributes instead of CT ones."""
    for keyword in ("KVP", "RescaleIntercept", "RescaleSlope", "RescaleType"):
        if keyword in ds:
            delattr(ds, keyword)
    ds.ScanningSequence, ds.SequenceVariant, ds.ScanOptions = "SE", "NONE", ""
    ds.MRAcquisitionType = "2D"
    ds.RepetitionTime, ds.EchoTime, ds.EchoTrainLength = "500", "15", 1
    ds.MagneticFieldStrength = "1.5"
    ds.WindowCenter, ds.WindowWidth = "600", "1200"


def _image_template(patient: _Patient, study: _Study, planned: PlannedSeries, plan: _SeriesPlan, series_uid: str) -> Dataset:
    """The shared header of an ``image`` or ``localizer`` series (CT or MR)."""
    ds = _series_template(patient, study, plan, _series_time(study, plan.number))
    ds.SeriesInstanceUID = series_uid
    ds.SOPClassUID = _IMAGE_STORAGE[planned.modality]
    ds.Modality = planned.modality
    if planned.kind == "localizer":
        ds.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
    if planned.modality == "MR":
        _as_mr(ds)
    return ds


def _write_images(out: Path, patient: _Patient, study: _Study, planned: PlannedSeries, number: int, seed: int) -> WrittenSeries:
    """An image or localizer series: ``planned.slices`` phantom slices, 5 mm apart."""
    series_uid = _uid(seed, study.uid, "series", number)
    plan = _SeriesPlan(number, planned.description, _SLICE_MM, planned.slices, 32, 32, signed=False)
    ds = _image_template(patient, study, planned, plan, series_uid)
    directory = out / study.uid / series_uid
    directory.mkdir(parents=True, exist_ok=True)
    sop_uids: list[str] = []
    total = 0
    for k, pixels in enumerate(_phantom_slices(plan, np.random.default_rng([seed, number, zlib.crc32(series_uid.encode())]))):
        ds.SOPInstanceUID = _uid(seed, series_uid, "instance", k)
        ds.InstanceNumber = k + 1
        ds.ImagePositionPatient = ["-175", "-175", f"{-k * _SLICE_MM:g}"]
        ds.SliceLocation = f"{-k * _SLICE_MM:g}"
        ds.PixelData = pixels.tobytes()
        total += _write_atomically(_with_meta(ds), directory / f"{ds.SOPInstanceUID}.dcm")
        sop_uids.append(str(ds.SOPInstanceUID))
    return WrittenSeries(patient.patient_id, study.uid, series_uid, number, planned.modality, planned.kind,
                         planned.description, str(ds.SOPClassUID), tuple(sop_uids), total)  # fmt: skip


def _write_sr(out: Path, patient: _Patient, study: _Study, planned: PlannedSeries, number: int, seed: int) -> WrittenSeries:
    """An ``sr`` or ``dose_sr`` series: one SR document."""
    series_uid = _uid(seed, study.uid, "series", number)
    sop_uid = _uid(seed, series_uid, "instance", 0)
    ds = sr_document(planned.kind, patient, study, (series_uid, sop_uid), number, planned.description,
                     _series_time(study, number), seed)  # fmt: skip
    directory = out / study.uid / series_uid
    directory.mkdir(parents=True, exist_ok=True)
    size = _write_atomically(_with_meta(ds), directory / f"{ds.SOPInstanceUID}.dcm")
    return WrittenSeries(patient.patient_id, study.uid, series_uid, number, "SR", planned.kind, planned.description,
                         str(ds.SOPClassUID), (sop_uid,), size)  # fmt: skip


def _study_uids(studies: Sequence[PlannedStudy], seed: int) -> list[str]:
    """One UID per planned study from what the study is, so adding a study keeps the others' UIDs;
    identical plans get an occurrence number."""
    seen: Counter[tuple[str, ...]] = Counter()
    uids = []
    for planned in studies:
        key = (planned.patient_id, planned.accession_number, planned.study_date, planned.study_description, planned.label)
        uids.append(_uid(seed, "study", *key, seen[key]))
        seen[key] += 1
    return uids


def write_planned_cohort(out_dir: Path, studies: Sequence[PlannedStudy], seed: int = 0) -> WrittenCohort:
    """Write every planned study under ``out_dir`` (created if needed); series are numbered 1, 2, ...

    Patients are made once per PatientID (same name, sex and birth date in all their studies).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    patients: dict[str, _Patient] = {}
    written: list[WrittenStudy] = []
    for planned, uid in zip(studies, _study_uids(studies, seed)):
        patient = patients.setdefault(planned.patient_id, _patient(planned.patient_id, seed))
        study = _study(planned, uid, seed)
        series = tuple(
            (_write_sr if s.kind in ("sr", "dose_sr") else _write_images)(out, patient, study, s, number, seed)
            for number, s in enumerate(planned.series, start=1)
        )
        written.append(WrittenStudy(planned.label, planned.patient_id, uid, planned.study_date, planned.accession_number,
                                    planned.study_description, series))  # fmt: skip
    return WrittenCohort(out, tuple(written))


# --------------------------------------------------------------------------------------------
# Request files: CSV text and an all-text XLSX.


def request_file_csv(header: Sequence[str], rows: Iterable[Mapping[str, str]]) -> str:
    """CSV text (comma, ``\\n`` line ends, quoted where needed) with ``header`` and one line per row."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    for row in rows:
        writer.writerow([row.get(column, "") for column in header])
    return buffer.getvalue()


def write_text_xlsx(path: Path, header: Sequence[str], rows: Iterable[Mapping[str, str]]) -> Path:
    """An XLSX whose every cell (header included) is a Text cell (number format ``@``) holding a string,
    as a researcher's sheet must be for ``000123`` to survive; empty cells are left empty."""
    import openpyxl  # only the XLSX writers need it

    workbook = openpyxl.Workbook()
    sheet = workbook.active
    assert sheet is not None
    sheet.title = "Request"
    for r, values in enumerate([dict(zip(header, header)), *rows], start=1):
        for c, column in enumerate(header, start=1):
            cell = sheet.cell(row=r, column=c)
            cell.number_format = "@"
            text = values.get(column, "")
            if text != "":
                cell.value = str(text)
    path = Path(path)
    workbook.save(path)
    return path


# --------------------------------------------------------------------------------------------
# The request-file test scenario.


def _series(modality: str, description: str | None = None, slices: int = 3) -> PlannedSeries:
    return PlannedSeries(modality, description, "image", slices)


_LOCALIZER_CT = PlannedSeries("CT", kind="localizer", slices=2)
_LOCALIZER_MR = PlannedSeries("MR", kind="localizer", slices=2)

#: The scenario of :func:`request_test_cohort`, by label. The traps are deliberate: ``123`` has a
#: CT CHEST on the same day as ``000123``'s (only an exact PatientID match tells them apart),
#: ``ACC-DUP`` belongs to two patients, and ``000123``'s MR study has an MR (not CT) localizer,
#: so a Modality CT row with a window over 2019-2020 matches the 2019 study only.
REQUEST_TEST_STUDIES: tuple[PlannedStudy, ...] = (
    PlannedStudy("000123", "20190301", "ACC-0123-2019", "CT CHEST",
                 [_LOCALIZER_CT, _series("CT", "Axial 5.0 mm", 4), PlannedSeries("SR", kind="sr")], "000123-2019-ct"),
    PlannedStudy("000123", "20200615", "ACC-0123-2020", "MR BRAIN", [_LOCALIZER_MR, _series("MR", "T1 axial", 4)],
                 "000123-2020-mr"),
    PlannedStudy("000123", "20220110", "ACC-0123-2022", "CT ABDOMEN",
                 [_series("CT", "Axial 1.0 mm", 4), PlannedSeries("SR", kind="dose_sr")], "000123-2022-ct"),
    PlannedStudy("123", "20190301", "ACC-123-2019", "CT CHEST", [_series("CT")], "123-2019-ct"),
    PlannedStudy("P-ACC", "20210304", "ACC-1001", "CT HEAD", [_series("CT")], "acc-1001"),
    PlannedStudy("P-DUP1", "20200202", "ACC-DUP", "CT CHEST", [_series("CT")], "dup-1"),
    PlannedStudy("P-DUP2", "20200203", "ACC-DUP", "CT THORAX", [_series("CT")], "dup-2"),
    PlannedStudy("P-UID", "20180808", "ACC-UID-1", "MR KNEE", [_series("MR", "PD sagittal")], "by-uid"),
    PlannedStudy("P-LATE", "20210501", "ACC-LATE-2021", "CT CHEST", [_series("CT")], "late-2021"),
    PlannedStudy("P-LATE", "20230909", "ACC-LATE-2023", "CT CHEST", [_series("CT")], "late-2023"),
)  # fmt: skip

#: The request file's columns, in file order (``Subject`` is a free column carried to the report).
REQUEST_TEST_COLUMNS: tuple[str, ...] = (
    "PatientID", "AccessionNumber", "StudyInstanceUID", "StudyDateFrom", "StudyDateUntil", "Modality",
    "StudyDescription", "Subject",
)  # fmt: skip

Outcome = Literal["found", "ambiguous", "not found"]


@dataclass(frozen=True)
class ScenarioRow:
    """One row of the scenario's request file and what resolving it must give.

    ``cells`` maps columns to their text (absent = empty cell); ``studies`` are the labels of the
    studies the row's C-FIND must return (both ``ACC-DUP`` studies for the ambiguous row, which
    fetches nothing); ``outcome`` is ``found``, ``ambiguous`` or ``not found``.
    """

    cells: Mapping[str, str]
    studies: tuple[str, ...]
    outcome: Outcome
    row: int = field(default=0)  # the spreadsheet row (header = 1), set by request_test_rows

    @property
    def subject(self) -> str:
        return self.cells["Subject"]


def request_test_cohort(out_dir: Path, seed: int = 0) -> WrittenCohort:
    """Write :data:`REQUEST_TEST_STUDIES` (7 patients, 10 studies, 14 series, 39 instances) under ``out_dir``.

    Patients and studies (labels in brackets; accession numbers in :data:`REQUEST_TEST_STUDIES`):

    * ``000123``: 2019-03-01 CT CHEST [``000123-2019-ct``]: Localizer (CT, 2), Axial 5.0 mm
      (CT, 4), Report (Basic Text SR); 2020-06-15 MR BRAIN [``000123-2020-mr``]: Localizer (MR,
      2), T1 axial (MR, 4); 2022-01-10 CT ABDOMEN [``000123-2022-ct``]: Axial 1.0 mm (CT, 4),
      Dose Report (X-Ray Radiation Dose SR).
    * ``123``: 2019-03-01 CT CHEST [``123-2019-ct``] (never to be confused with ``000123``).
    * ``P-ACC``: accession ``ACC-1001`` [``acc-1001``].
    * ``P-DUP1`` and ``P-DUP2``: one study each with accession ``ACC-DUP`` [``dup-1``, ``dup-2``].
    * ``P-UID``: an MR KNEE [``by-uid``], requested by its StudyInstanceUID.
    * ``P-LATE``: CT studies of 2021-05-01 [``late-2021``] and 2023-09-09 [``late-2023``], asked
      for only by the rows added later (``request_test_rows(cohort, late=True)``).

    Every non-SR series has 3 slices unless stated; every SR series one instance.
    """
    return write_planned_cohort(out_dir, REQUEST_TEST_STUDIES, seed)


def _row(subject: str, studies: tuple[str, ...], outcome: Outcome, **cells: str) -> ScenarioRow:
    return ScenarioRow({**cells, "Subject": subject}, studies, outcome)


def request_test_rows(cohort: WrittenCohort, late: bool = False) -> tuple[ScenarioRow, ...]:
    """The scenario's request rows in file order (``late=True`` adds the two ``P-LATE`` rows at the end).

    S01 ``000123`` from 2019-01-01 until 2020-12-31, CT -> the 2019 CT only (the 2020 study is
    MR, ``123``'s is another patient); S02 ``000123``, MR, description ``brain`` -> the 2020 MR;
    S03 ``ACC-1001``; S04 ``ACC-DUP`` -> ambiguous (two patients); S05 the ``P-UID`` study's UID;
    S06 PatientID ``NOPE-999`` and S07 accession ``ACC-MISSING`` -> not found. Late: S08
    ``P-LATE`` within 2021 -> ``late-2021``; S09 accession ``ACC-LATE-2023`` -> ``late-2023``.
    """
    rows = [
        _row("S01", ("000123-2019-ct",), "found", PatientID="000123", StudyDateFrom="2019-01-01",
             StudyDateUntil="2020-12-31", Modality="CT"),
        _row("S02", ("000123-2020-mr",), "found", PatientID="000123", Modality="MR", StudyDescription="brain"),
        _row("S03", ("acc-1001",), "found", AccessionNumber="ACC-1001"),
        _row("S04", ("dup-1", "dup-2"), "ambiguous", AccessionNumber="ACC-DUP"),
        _row("S05", ("by-uid",), "found", StudyInstanceUID=cohort.study("by-uid").study_instance_uid),
        _row("S06", (), "not found", PatientID="NOPE-999"),
        _row("S07", (), "not found", AccessionNumber="ACC-MISSING"),
    ]  # fmt: skip
    if late:
        rows += [
            _row("S08", ("late-2021",), "found", PatientID="P-LATE", StudyDateFrom="20210101", StudyDateUntil="20211231"),
            _row("S09", ("late-2023",), "found", AccessionNumber="ACC-LATE-2023"),
        ]
    return tuple(ScenarioRow(r.cells, r.studies, r.outcome, row=i) for i, r in enumerate(rows, start=2))


def request_test_csv(cohort: WrittenCohort, late: bool = False) -> str:
    """The scenario's request file as CSV text (columns :data:`REQUEST_TEST_COLUMNS`)."""
    return request_file_csv(REQUEST_TEST_COLUMNS, (r.cells for r in request_test_rows(cohort, late)))


def write_request_test_xlsx(path: Path, cohort: WrittenCohort, late: bool = False) -> Path:
    """The same rows as :func:`request_test_csv` as an XLSX of Text cells (see :func:`write_text_xlsx`)."""
    return write_text_xlsx(path, REQUEST_TEST_COLUMNS, (r.cells for r in request_test_rows(cohort, late)))


# --------------------------------------------------------------------------------------------
# The 1,000-row benchmark.

_BULK_FIRST_DAY = dt.date(2015, 1, 1)


def bulk_request_studies(patients: int = 1000) -> tuple[PlannedStudy, ...]:
    """``patients`` patients x 1 CT study x 1 series x 1 slice. PatientIDs are 8 digits with
    leading zeros (``00000001``...) so a benchmark also exercises IDs that must stay text."""
    return tuple(
        PlannedStudy(f"{i:08d}", (_BULK_FIRST_DAY + dt.timedelta(days=i % 3650)).strftime("%Y%m%d"),
                     f"BULK{i:08d}", "CT CHEST", [_series("CT", slices=1)], f"bulk-{i}")
        for i in range(1, patients + 1)
    )  # fmt: skip


def bulk_request_cohort(out_dir: Path, patients: int = 1000, seed: int = 0) -> WrittenCohort:
    """Write :func:`bulk_request_studies` under ``out_dir`` (1,000 instances of ~3 kB by default)."""
    return write_planned_cohort(out_dir, bulk_request_studies(patients), seed)


def bulk_request_csv(cohort: WrittenCohort) -> str:
    """A request file with one PatientID row per patient of ``cohort`` (plus a free ``Subject`` column)."""
    rows = ({"PatientID": pid, "Subject": f"B{i:05d}"} for i, pid in enumerate(cohort.patients, start=1))
    return request_file_csv(("PatientID", "Subject"), rows)
