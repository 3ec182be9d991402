"""A synthetic CT cohort on disk: what the development PACS serves.

The demo, the fast tests and anyone working offline need DICOM that looks like the real thing to
a retriever (a patient / study / series / instance hierarchy with consistent UIDs, plausible CT
headers, 16-bit pixel data) without shipping patient data. Everything is generated here.

Design points:

* **Layout** ``<out_dir>/<StudyInstanceUID>/<SeriesInstanceUID>/<SOPInstanceUID>.dcm``. Only
  UIDs name directories, so any legal PatientID (``..``, ``a b/c``, ``*``, non-ASCII) is safe.
  Each file is written under a hidden temporary name and renamed, so a PACS scanning the folder
  while we write never reads a half-written file.
* **UIDs are random** (:func:`pydicom.uid.generate_uid`), so two calls never collide, even with
  the same seed. Everything else (demographics, dates, descriptions, pixels) is a deterministic
  function of the seed, so the same spec gives the same images.
* **Speed**: one phantom and one Gaussian noise field per series; each slice only re-thresholds
  precomputed distance maps and rolls the noise field, so a 512x512 slice costs a few
  milliseconds and a 1 GB cohort is written at disk speed, not Python-loop speed.
* **Descriptions repeat on purpose**: two series of a study may share a SeriesDescription
  (``Axial 5.0 mm`` twice), because real PACSes do and SeriesDescription must never be a key.
"""

from __future__ import annotations

import datetime as dt
import os
import uuid
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterator

import numpy as np
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

__all__ = ["CohortSpec", "CohortSummary", "GeneratedSeries", "add_series", "generate_cohort"]

UTF8_CHARSET = "ISO_IR 192"
INSTITUTION = "Dev Hospital"
_FIRST_NAMES = (
    ("Anna", "F"), ("Ben", "M"), ("Chloé", "F"), ("David", "M"), ("Eva", "F"),
    ("Farid", "M"), ("Greta", "F"), ("Hiro", "M"), ("Ingrid", "F"), ("José", "M"),
)  # fmt: skip
_LAST_NAMES = ("Smith", "Jones", "Müller", "García", "Novak", "Kowalski", "Dubois", "Rossi", "Andersen", "Nakamura")
#: (StudyDescription, BodyPartExamined); a study keeps one body part for all its series.
_STUDY_KINDS = (("CT CHEST", "CHEST"), ("CT ABDOMEN PELVIS", "ABDOMEN"), ("CT HEAD", "HEAD"), ("CT THORAX", "CHEST"))
#: (SeriesDescription, SliceThickness mm); the repeat of the first entry is deliberate (see module doc).
_SERIES_KINDS = (("Axial 5.0 mm", 5.0), ("Axial 1.0 mm", 1.0), ("Axial 5.0 mm", 5.0), ("Coronal 3.0 mm", 3.0))
_FIRST_STUDY_DAY = dt.date(2019, 1, 1)
_STUDY_DAYS = (dt.date(2024, 12, 31) - _FIRST_STUDY_DAY).days
_FIELD_OF_VIEW_MM = 350.0


@dataclass(frozen=True)
class CohortSpec:
    """What to generate: patients x studies x series x slices of ``rows`` x ``columns`` CT.

    ``patient_ids``, when given, replaces ``patient_id_prefix`` / ``patients``: it is how tests
    and demos get hostile IDs (spaces, ``/``, ``.``, ``*``, non-ASCII, 64 characters).
    """

    patients: int = 3
    studies_per_patient: int = 1
    series_per_study: int = 2
    slices_per_series: int = 10
    rows: int = 64
    columns: int = 64
    patient_id_prefix: str = "DEMO"
    patient_ids: tuple[str, ...] | None = None
    seed: int = 0

    def resolved_patient_ids(self) -> tuple[str, ...]:
        """The PatientIDs to generate, in order (``DEMO0001``, ``DEMO0002``, ... by default)."""
        if self.patient_ids is not None:
            return tuple(self.patient_ids)
        return tuple(f"{self.patient_id_prefix}{i:04d}" for i in range(1, self.patients + 1))


@dataclass(frozen=True)
class GeneratedSeries:
    """One series written to disk; ``bytes`` is the total size of its files."""

    patient_id: str
    study_instance_uid: str
    series_instance_uid: str
    series_number: int
    instances: int
    bytes: int
    sop_instance_uids: tuple[str, ...]


@dataclass(frozen=True)
class CohortSummary:
    """Everything :func:`generate_cohort` wrote, so tests can compare a PACS's answers with it."""

    series: tuple[GeneratedSeries, ...]

    @property
    def patients(self) -> tuple[str, ...]:
        return tuple(sorted({s.patient_id for s in self.series}))

    @property
    def studies(self) -> int:
        return len({s.study_instance_uid for s in self.series})

    @property
    def instances(self) -> int:
        return sum(s.instances for s in self.series)

    @property
    def bytes(self) -> int:
        return sum(s.bytes for s in self.series)


# --------------------------------------------------------------------------------------------
# The hierarchy as plain values: what one file of a series needs to know about its parents.


@dataclass(frozen=True)
class _Patient:
    patient_id: str
    name: str
    sex: str
    birth_date: str


@dataclass(frozen=True)
class _Study:
    uid: str
    date: str
    time: str
    study_id: str
    accession: str
    description: str
    body_part: str
    frame_of_reference_uid: str
    institution: str = INSTITUTION


@dataclass(frozen=True)
class _SeriesPlan:
    number: int
    description: str
    thickness: float
    slices: int
    rows: int
    columns: int
    signed: bool


def _rng(*parts: int) -> np.random.Generator:
    """A generator seeded from several integers, so each entity's randomness is independent."""
    return np.random.default_rng([abs(p) for p in parts])


def _make_patient(patient_id: str, rng: np.random.Generator) -> _Patient:
    first, sex = _FIRST_NAMES[int(rng.integers(len(_FIRST_NAMES)))]
    last = _LAST_NAMES[int(rng.integers(len(_LAST_NAMES)))]
    birth = dt.date(1940, 1, 1) + dt.timedelta(days=int(rng.integers(0, 60 * 365)))
    return _Patient(patient_id, f"{last}^{first}", sex, birth.strftime("%Y%m%d"))


def _make_study(date: dt.date, rng: np.random.Generator) -> _Study:
    """A new study on ``date``: fresh UIDs, a random time of day and one of the study kinds."""
    uid = generate_uid()
    description, body_part = _STUDY_KINDS[int(rng.integers(len(_STUDY_KINDS)))]
    seconds = int(rng.integers(7 * 3600, 19 * 3600))
    return _Study(
        uid=uid,
        date=date.strftime("%Y%m%d"),
        time=f"{seconds // 3600:02d}{seconds // 60 % 60:02d}{seconds % 60:02d}",
        study_id=str(int(rng.integers(1, 100000))),
        accession=f"ACC{uuid.uuid4().int % 10**12:012d}",  # SH: 15 chars, unique enough
        description=description,
        body_part=body_part,
        frame_of_reference_uid=generate_uid(),
    )


def _study_dates(count: int, rng: np.random.Generator) -> list[dt.date]:
    """``count`` distinct-ish dates spread over 2019-2024, oldest first."""
    days = sorted(int(d) for d in rng.integers(0, _STUDY_DAYS + 1, size=count))
    return [_FIRST_STUDY_DAY + dt.timedelta(days=d) for d in days]


def _series_plan(index: int, number: int, slices: int, rows: int, columns: int) -> _SeriesPlan:
    description, thickness = _SERIES_KINDS[index % len(_SERIES_KINDS)]
    # Alternate pixel encodings so readers meet both: unsigned 12-bit and signed 16-bit.
    return _SeriesPlan(number, description, thickness, slices, rows, columns, signed=index % 2 == 1)


# --------------------------------------------------------------------------------------------
# Pixels: a noisy elliptical phantom, vectorised per slice.


def _phantom_slices(plan: _SeriesPlan, rng: np.random.Generator) -> Iterator[np.ndarray]:
    """Yield the stored pixel values (HU + 1024) of each slice of a series.

    A soft-tissue ellipse in air, with a dense "bone" disc and two light "lung" discs whose radii
    shrink towards both ends of the stack (spheres), plus Gaussian noise. Distance maps and the
    noise field are computed once; each slice thresholds the maps and rolls the noise.
    """
    rows, cols = plan.rows, plan.columns
    yy, xx = np.mgrid[-1.0 : 1.0 : rows * 1j, -1.0 : 1.0 : cols * 1j].astype(np.float32)
    body = (xx / 0.85) ** 2 + (yy / 0.65) ** 2 <= 1.0
    base = np.where(body, np.float32(40.0), np.float32(-1000.0)).astype(np.float32)
    jitter = rng.uniform(-0.05, 0.05, size=(3, 2)).astype(np.float32)
    discs = [  # (centre x, centre y, radius, HU)
        (0.0 + jitter[0, 0], 0.35 + jitter[0, 1], 0.12, 700.0),
        (-0.4 + jitter[1, 0], -0.1 + jitter[1, 1], 0.22, -750.0),
        (0.4 + jitter[2, 0], -0.1 + jitter[2, 1], 0.20, -750.0),
    ]
    distances = [((xx - cx) ** 2 + (yy - cy) ** 2, r * r, hu) for cx, cy, r, hu in discs]
    noise = rng.normal(0.0, 12.0, size=(rows, cols)).astype(np.float32)
    dtype, low, high = (np.dtype("<i2"), -32768, 32767) if plan.signed else (np.dtype("<u2"), 0, 4095)
    for k in range(plan.slices):
        z = (2.0 * k + 1.0) / plan.slices - 1.0  # -1 .. 1 through the stack
        scale = max(0.0, 1.0 - 0.6 * z * z)
        image = base.copy()
        for d2, r2, hu in distances:
            image[(d2 <= r2 * scale) & body] = hu
        image += np.roll(noise, (7 * k % rows, 13 * k % cols), axis=(0, 1))
        yield np.clip(np.rint(image + 1024.0), low, high).astype(dtype)


# --------------------------------------------------------------------------------------------
# Datasets and files.


def _needs_utf8(*texts: str) -> bool:
    return any(not text.isascii() for text in texts)


def _ds(value: float) -> str:
    """A DS string that always fits the 16-character limit."""
    return f"{value:.6g}"


def _series_template(patient: _Patient, study: _Study, plan: _SeriesPlan, series_time: str) -> Dataset:
    """Every attribute shared by the slices of one series; per-slice values are set later."""
    ds = Dataset()
    if _needs_utf8(patient.patient_id, patient.name, study.description, plan.description, study.institution):
        ds.SpecificCharacterSet = UTF8_CHARSET
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.SOPClassUID = CTImageStorage
    ds.StudyDate = study.date
    ds.SeriesDate = study.date
    ds.ContentDate = study.date
    ds.StudyTime = study.time
    ds.SeriesTime = series_time
    ds.ContentTime = series_time
    ds.AccessionNumber = study.accession
    ds.Modality = "CT"
    ds.Manufacturer = "dicom_assets devpacs"
    ds.InstitutionName = study.institution
    ds.ReferringPhysicianName = ""
    ds.StudyDescription = study.description
    ds.SeriesDescription = plan.description
    ds.PatientName = patient.name
    ds.PatientID = patient.patient_id
    ds.PatientBirthDate = patient.birth_date
    ds.PatientSex = patient.sex
    age = int(study.date[:4]) - int(patient.birth_date[:4])
    ds.PatientAge = f"{max(age, 0):03d}Y"
    ds.BodyPartExamined = study.body_part
    ds.SliceThickness = _ds(plan.thickness)
    ds.SpacingBetweenSlices = _ds(plan.thickness)
    ds.KVP = "120"
    ds.PatientPosition = "HFS"
    ds.StudyInstanceUID = study.uid
    ds.SeriesInstanceUID = generate_uid()
    ds.StudyID = study.study_id
    ds.SeriesNumber = plan.number
    ds.AcquisitionNumber = 1
    ds.ImageOrientationPatient = ["1", "0", "0", "0", "1", "0"]
    ds.FrameOfReferenceUID = study.frame_of_reference_uid
    ds.PositionReferenceIndicator = ""
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = plan.rows
    ds.Columns = plan.columns
    spacing = _FIELD_OF_VIEW_MM / max(plan.rows, plan.columns)
    ds.PixelSpacing = [_ds(spacing), _ds(spacing)]
    ds.BitsAllocated = 16
    ds.BitsStored = 16 if plan.signed else 12
    ds.HighBit = ds.BitsStored - 1
    ds.PixelRepresentation = 1 if plan.signed else 0
    ds.WindowCenter = "40"
    ds.WindowWidth = "400"
    ds.RescaleIntercept = "-1024"
    ds.RescaleSlope = "1"
    ds.RescaleType = "HU"
    return ds


def _write_atomically(ds: Dataset, final: Path) -> int:
    """Write ``ds`` as a DICOM file via a hidden temp name + rename; return the file size."""
    temp = final.with_name(f".{final.name}.{uuid.uuid4().hex[:8]}.part")
    ds.save_as(temp, enforce_file_format=True)
    size = temp.stat().st_size
    os.replace(temp, final)
    return size


def _write_series(out_dir: Path, patient: _Patient, study: _Study, plan: _SeriesPlan, rng: np.random.Generator) -> GeneratedSeries:
    """Write one series, one file per slice, and describe what was written."""
    offset = 60 * plan.number + int(rng.integers(0, 60))
    start = dt.datetime.strptime(study.time, "%H%M%S") + dt.timedelta(seconds=offset)
    ds = _series_template(patient, study, plan, start.strftime("%H%M%S"))
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    series_dir = out_dir / study.uid / str(ds.SeriesInstanceUID)
    series_dir.mkdir(parents=True, exist_ok=True)
    corner = -_FIELD_OF_VIEW_MM / 2.0
    z_top = float(rng.integers(-50, 50)) * 5.0
    sop_uids: list[str] = []
    total = 0
    for k, pixels in enumerate(_phantom_slices(plan, rng)):
        sop_uid = generate_uid()
        z = z_top - k * plan.thickness
        ds.SOPInstanceUID = sop_uid
        ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
        ds.InstanceNumber = k + 1
        ds.ImagePositionPatient = [_ds(corner), _ds(corner), _ds(z)]
        ds.SliceLocation = _ds(z)
        ds.PixelData = pixels.tobytes()
        total += _write_atomically(ds, series_dir / f"{sop_uid}.dcm")
        sop_uids.append(sop_uid)
    return GeneratedSeries(
        patient_id=patient.patient_id,
        study_instance_uid=study.uid,
        series_instance_uid=str(ds.SeriesInstanceUID),
        series_number=plan.number,
        instances=len(sop_uids),
        bytes=total,
        sop_instance_uids=tuple(sop_uids),
    )


def generate_cohort(out_dir: Path, spec: CohortSpec) -> CohortSummary:
    """Write a whole synthetic cohort under ``out_dir`` (created if needed) and summarise it."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written: list[GeneratedSeries] = []
    for p, patient_id in enumerate(spec.resolved_patient_ids()):
        patient = _make_patient(patient_id, _rng(spec.seed, p))
        dates = _study_dates(spec.studies_per_patient, _rng(spec.seed, p, 1))
        for s, date in enumerate(dates):
            study = _make_study(date, _rng(spec.seed, p, 2, s))
            for n in range(spec.series_per_study):
                plan = _series_plan(n, n + 1, spec.slices_per_series, spec.rows, spec.columns)
                written.append(_write_series(out_dir, patient, study, plan, _rng(spec.seed, p, 3, s, n)))
    return CohortSummary(tuple(written))


# --------------------------------------------------------------------------------------------
# Adding a series to what is already on disk (to test "files added while the PACS runs").

_EXISTING_TAGS = [
    "SpecificCharacterSet", "PatientID", "PatientName", "PatientSex", "PatientBirthDate",
    "StudyInstanceUID", "StudyDate", "StudyTime", "StudyID", "AccessionNumber", "StudyDescription",
    "BodyPartExamined", "FrameOfReferenceUID", "InstitutionName", "SeriesNumber",
]  # fmt: skip


def _existing_headers(out_dir: Path) -> Iterator[Dataset]:
    """Headers (a few tags, no pixels) of every readable DICOM file under ``out_dir``."""
    for root, dirs, files in os.walk(out_dir):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            if name.startswith("."):
                continue
            try:
                yield dcmread(Path(root) / name, stop_before_pixels=True, specific_tags=_EXISTING_TAGS)
            except (InvalidDicomError, OSError, ValueError, EOFError):
                continue


def _text(ds: Dataset, keyword: str, default: str = "") -> str:
    value = ds.get(keyword)
    return default if value is None else str(value)


def _patient_from(ds: Dataset) -> _Patient:
    return _Patient(_text(ds, "PatientID"), _text(ds, "PatientName"), _text(ds, "PatientSex"), _text(ds, "PatientBirthDate"))


def _study_from(ds: Dataset) -> _Study:
    """The study attributes of an existing file, with safe defaults for anything missing."""
    return _Study(
        uid=_text(ds, "StudyInstanceUID"),
        date=_text(ds, "StudyDate") or _FIRST_STUDY_DAY.strftime("%Y%m%d"),
        time=(_text(ds, "StudyTime") or "120000")[:6].ljust(6, "0"),
        study_id=_text(ds, "StudyID"),
        accession=_text(ds, "AccessionNumber"),
        description=_text(ds, "StudyDescription"),
        body_part=_text(ds, "BodyPartExamined"),
        frame_of_reference_uid=_text(ds, "FrameOfReferenceUID") or generate_uid(),
        institution=_text(ds, "InstitutionName", INSTITUTION),
    )


def add_series(
    out_dir: Path,
    patient_id: str,
    study_instance_uid: str | None = None,
    slices: int = 10,
    rows: int = 64,
    columns: int = 64,
    seed: int = 0,
    series_number: int | None = None,
) -> GeneratedSeries:
    """Add a new series to a patient's study on disk, reusing its demographics and study attributes.

    The study is ``study_instance_uid`` if given, else the patient's earliest study found under
    ``out_dir``. A patient or study that does not exist yet is created (with that UID if one was
    given). ``series_number`` defaults to one more than the highest in the study.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rng = _rng(seed, 0xADD)
    patient: _Patient | None = None
    studies: dict[str, Dataset] = {}
    numbers: dict[str, list[int]] = {}
    for ds in _existing_headers(out_dir):
        if _text(ds, "PatientID") != patient_id:
            continue
        patient = patient or _patient_from(ds)
        uid = _text(ds, "StudyInstanceUID")
        studies.setdefault(uid, ds)
        if "SeriesNumber" in ds and ds.SeriesNumber is not None:
            numbers.setdefault(uid, []).append(int(ds.SeriesNumber))
    if patient is None:
        patient = _make_patient(patient_id, rng)
    if study_instance_uid is None and studies:
        study_instance_uid = min(studies, key=lambda u: (_text(studies[u], "StudyDate"), _text(studies[u], "StudyTime"), u))
    if study_instance_uid in studies:
        study = _study_from(studies[study_instance_uid])
    else:
        study = _make_study(_study_dates(1, rng)[0], rng)
        if study_instance_uid is not None:
            study = replace(study, uid=study_instance_uid)
    if series_number is None:
        series_number = max(numbers.get(study.uid, [0])) + 1
    plan = _series_plan(int(rng.integers(len(_SERIES_KINDS))), series_number, slices, rows, columns)
    return _write_series(out_dir, patient, study, plan, rng)
