"""How each kind of the mixed set is made (:mod:`dicom_assets.devpacs.mixed` lists the kinds).

Every builder takes a :class:`Job` (the kind's series, its deterministic UIDs and random
generators, the size parameters, a work folder) and returns the files it wrote there; the
generator then checks and installs them. pydicom writes the uncompressed sources and the objects
no tool makes (text SR, Enhanced CT, the streamed large multi-frame and private OB); DCMTK and
GDCM turn sources into the compressed syntaxes.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.tag import Tag
from pydicom.uid import (
    CTImageStorage,
    EnhancedCTImageStorage,
    ExplicitVRLittleEndian,
    MultiFrameGrayscaleWordSecondaryCaptureImageStorage,
    SecondaryCaptureImageStorage,
    UltrasoundMultiFrameImageStorage,
    generate_uid,
)

from dicom_assets.devpacs.mixed_files import (
    minimal_pdf,
    random_chunks,
    run_tool,
    with_file_meta,
    write_streamed,
)

_UID_NAMESPACE = "dicom-assets-mixed"
_STUDY_DATE = dt.date(2024, 3, 4)
_PRIVATE_CREATOR = "DICOM_ASSETS MIXED"
_PRIVATE_GROUP = 0x0009
#: (0009,1010): the private OB, in the block reserved by (0009,0010).
_PRIVATE_BLOB = Tag(_PRIVATE_GROUP, 0x1010)
_PIXEL_DATA = Tag("PixelData")
_LARGE_FRAME_SIDE = 512
_CT_STREAM = 0xC7  # the random stream of the CT phantom's noise


@dataclass(frozen=True)
class Entity:
    """The patient and study a kind's series belongs to (header values shared by its files)."""

    patient_id: str
    patient_name: str
    sex: str
    birth_date: str
    study_uid: str
    study_description: str
    accession: str


@dataclass
class Job:
    """What a kind's builder needs: where to work, its series, its UIDs and the size parameters."""

    kind: str  # the kind's name: its SeriesDescription, and part of its UIDs
    work: Path
    entity: Entity
    series_uid: str
    series_number: int
    seed: int
    ct_slices: int
    rows: int
    columns: int
    large_bytes: int
    private_ob_bytes: int

    def uid(self, *parts: object) -> str:
        """A UID that depends only on the seed, the kind and ``parts``."""
        return make_uid(self.seed, self.kind, *parts)

    def rng(self, *parts: int) -> np.random.Generator:
        """A random generator of this series (seeded by the seed, the series and ``parts``)."""
        return np.random.default_rng([self.seed, self.series_number, *parts])

    def temp(self, name: str) -> Path:
        return self.work / f"{self.kind}-{name}"


def make_uid(seed: int, *parts: object) -> str:
    """A deterministic UID (pydicom's hash-based ``2.25``-style derivation under its root)."""
    return str(generate_uid(entropy_srcs=[_UID_NAMESPACE, str(seed), *(str(p) for p in parts)]))


# --------------------------------------------------------------------------------------------
# Headers shared by every kind.


def _base(job: Job, sop_class: str, sop_uid: str, modality: str, number: int) -> Dataset:
    """Patient, study, series and instance attributes of one file (Explicit VR LE file meta)."""
    entity = job.entity
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_uid
    date = (_STUDY_DATE + dt.timedelta(days=job.seed % 365)).strftime("%Y%m%d")
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = date
    ds.StudyTime = "091500"
    ds.SeriesTime = ds.ContentTime = f"{10 + job.series_number // 60:02d}{job.series_number % 60:02d}00"
    ds.AccessionNumber = entity.accession
    ds.Modality = modality
    ds.Manufacturer = "dicom_assets devpacs"
    ds.InstitutionName = "Dev Hospital"
    ds.ReferringPhysicianName = ""
    ds.StudyDescription = entity.study_description
    ds.SeriesDescription = job.kind
    ds.PatientName = entity.patient_name
    ds.PatientID = entity.patient_id
    ds.PatientBirthDate = entity.birth_date
    ds.PatientSex = entity.sex
    ds.StudyInstanceUID = entity.study_uid
    ds.SeriesInstanceUID = job.series_uid
    ds.StudyID = "1"
    ds.SeriesNumber = job.series_number
    ds.InstanceNumber = number
    return with_file_meta(ds, ExplicitVRLittleEndian)


def _image_pixels(ds: Dataset, rows: int, columns: int, samples: int, bits: int, frames: int = 0) -> None:
    """The Image Pixel module of an unsigned grey (1 sample) or RGB (3, interleaved) image."""
    ds.SamplesPerPixel = samples
    ds.PhotometricInterpretation = "RGB" if samples == 3 else "MONOCHROME2"
    if samples == 3:
        ds.PlanarConfiguration = 0
    if frames:
        ds.NumberOfFrames = frames
    ds.Rows, ds.Columns = rows, columns
    ds.BitsAllocated = 16 if bits > 8 else 8
    ds.BitsStored = bits
    ds.HighBit = bits - 1
    ds.PixelRepresentation = 0


def _phantom(rows: int, columns: int, rng: np.random.Generator, slice_index: int) -> np.ndarray:
    """Stored CT values (HU + 1024, 12 bits): a body ellipse, a bone disc, two lungs, noise."""
    yy, xx = np.mgrid[-1.0 : 1.0 : rows * 1j, -1.0 : 1.0 : columns * 1j]
    image = np.where((xx / 0.85) ** 2 + (yy / 0.65) ** 2 <= 1.0, 1064.0, 24.0)
    shrink = 1.0 - 0.1 * slice_index
    for cx, cy, radius, value in ((0.0, 0.35, 0.12, 1724.0), (-0.4, -0.1, 0.22, 274.0), (0.4, -0.1, 0.2, 274.0)):
        image[(xx - cx) ** 2 + (yy - cy) ** 2 <= (radius * shrink) ** 2] = value
    image += rng.normal(0.0, 12.0, size=(rows, columns))
    return np.clip(np.rint(image), 0, 4095).astype("<u2")


def _ct_slice(job: Job, index: int, sop_uid: str) -> Dataset:
    """One uncompressed CT slice of the kind's series."""
    ds = _base(job, CTImageStorage, sop_uid, "CT", index + 1)
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.BodyPartExamined = "CHEST"
    ds.SliceThickness = "5"
    ds.KVP = "120"
    ds.PatientPosition = "HFS"
    ds.AcquisitionNumber = 1
    ds.ImagePositionPatient = ["-175", "-175", str(-5 * index)]
    ds.ImageOrientationPatient = ["1", "0", "0", "0", "1", "0"]
    ds.FrameOfReferenceUID = make_uid(job.seed, "frame-of-reference", job.entity.study_uid)
    ds.PositionReferenceIndicator = ""
    ds.SliceLocation = str(-5 * index)
    _image_pixels(ds, job.rows, job.columns, 1, 12)
    ds.PixelSpacing = ["0.7", "0.7"]
    ds.WindowCenter, ds.WindowWidth = "40", "400"
    ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = "-1024", "1", "HU"
    # The same pixels in every CT kind (seeded by the slice, not the series): a lossless
    # encoding must decode to exactly the Explicit VR Little Endian kind's pixels.
    ds.PixelData = _phantom(job.rows, job.columns, np.random.default_rng([job.seed, _CT_STREAM, index]), index).tobytes()
    return ds


def _rgb_image(rows: int, columns: int, frames: int, rng: np.random.Generator) -> np.ndarray:
    """8-bit RGB frames: colour gradients with a moving disc and a little noise."""
    yy, xx = np.mgrid[0:rows, 0:columns]
    out = np.empty((frames, rows, columns, 3), dtype=np.uint8)
    for f in range(frames):
        cx, cy = columns * (0.3 + 0.4 * f / max(frames, 1)), rows * 0.5
        disc = (xx - cx) ** 2 + (yy - cy) ** 2 <= (min(rows, columns) * 0.15) ** 2
        out[f, ..., 0] = (xx * 255 // max(columns - 1, 1)).astype(np.uint8)
        out[f, ..., 1] = (yy * 255 // max(rows - 1, 1)).astype(np.uint8)
        out[f, ..., 2] = np.where(disc, 230, 40)
    noise = rng.integers(0, 8, size=out.shape, dtype=np.uint8)
    return np.minimum(out.astype(np.uint16) + noise, 255).astype(np.uint8)


# --------------------------------------------------------------------------------------------
# Builders: each writes its kind's files into the work folder and returns their paths.


def _save(job: Job, ds: Dataset, name: str) -> Path:
    """Write ``ds`` as a Part 10 file in the work folder (a source for a tool, or a finished file)."""
    path = job.temp(name)
    ds.save_as(path, enforce_file_format=True)
    return path


def _ct_sources(job: Job) -> Iterator[tuple[Path, str]]:
    """The series' uncompressed CT slices, written, with their SOP Instance UIDs."""
    for index in range(job.ct_slices):
        sop_uid = job.uid("ct", index)
        yield _save(job, _ct_slice(job, index, sop_uid), f"source-{index}.dcm"), sop_uid


def ct_converted(*command: str, restore_uids: bool = False) -> Callable[[Job], list[Path]]:
    """A builder running ``command <source> <output>`` on every CT slice of the series.

    ``restore_uids``: the tool invents a new SOP Instance UID (gdcmconv does for lossy
    compression, with no option to keep it); put back the deterministic one.
    """

    def build(job: Job) -> list[Path]:
        outputs = []
        for source, sop_uid in _ct_sources(job):
            output = source.with_name(source.name.replace("source", "out"))
            run_tool(*command, str(source), str(output))
            if restore_uids:
                _set_sop_instance_uid(output, sop_uid)
            outputs.append(output)
        return outputs

    return build


def ct_as_written(job: Job) -> list[Path]:
    """The CT slices as pydicom writes them: the Explicit VR Little Endian kind."""
    return [path for path, _ in _ct_sources(job)]


def _set_sop_instance_uid(path: Path, sop_uid: str) -> None:
    """Rewrite a file with another SOP Instance UID (pydicom keeps every other byte's encoding)."""
    ds = dcmread(path)
    ds.SOPInstanceUID = sop_uid
    ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
    ds.save_as(path)


def _header_template(job: Job) -> Path:
    """A pixel-less file holding the patient/study/series attributes, for the tools' ``--series-from``."""
    ds = _base(job, SecondaryCaptureImageStorage, job.uid("template"), "OT", 1)
    return _save(job, ds, "template.dcm")


def _tool_keys(job: Job, sop_uid: str) -> list[str]:
    """``-k`` options that pin what DCMTK's converters would otherwise invent (UID, times)."""
    values = {
        "SOPInstanceUID": sop_uid,
        "InstanceCreationDate": "20240304",
        "InstanceCreationTime": "120000",
        "ContentDate": "20240304",
        "ContentTime": "120000",
        "SeriesNumber": str(job.series_number),
        "InstanceNumber": "1",
        "SeriesDescription": job.kind,
    }
    return [arg for key, value in values.items() for arg in ("-k", f"{key}={value}")]


def pdf(job: Job) -> list[Path]:
    """A hand-made PDF wrapped by ``pdf2dcm``: a document, not an image, no pixel data at all."""
    document = job.temp("report.pdf")
    document.write_bytes(minimal_pdf(f"Synthetic report {job.entity.patient_id} (seed {job.seed})"))
    output = job.temp("pdf.dcm")
    run_tool("pdf2dcm", "+se", str(_header_template(job)), "+t", "Synthetic report", *_tool_keys(job, job.uid("pdf")),
             str(document), str(output))  # fmt: skip
    return [output]


def text_sr(job: Job) -> list[Path]:
    """A Basic Text SR: nested sequences and UTF-8 text, the kind a retriever meets as reports."""
    ds = _base(job, "1.2.840.10008.5.1.4.1.1.88.11", job.uid("sr"), "SR", 1)  # Basic Text SR
    ds.ValueType = "CONTAINER"
    ds.ConceptNameCodeSequence = DicomSequence([_code("18782-3", "LN", "Radiology Study observation")])
    ds.ContinuityOfContent = "SEPARATE"
    ds.CompletionFlag = "COMPLETE"
    ds.VerificationFlag = "UNVERIFIED"
    findings = ("Kein Nachweis einer Raumforderung.", "Lungen beidseits belüftet, kein Erguss.", "Odd-length text.")
    items = []
    for text in findings:
        item = Dataset()
        item.RelationshipType = "CONTAINS"
        item.ValueType = "TEXT"
        item.ConceptNameCodeSequence = DicomSequence([_code("121071", "DCM", "Finding")])
        item.TextValue = text
        items.append(item)
    ds.ContentSequence = DicomSequence(items)
    return [_save(job, ds, "sr.dcm")]


def _code(value: str, scheme: str, meaning: str) -> Dataset:
    code = Dataset()
    code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning = value, scheme, meaning
    return code


def _rgb_capture(job: Job, sop_uid: str, name: str) -> Path:
    """An uncompressed RGB secondary capture (the source of the RLE and the JPEG kinds)."""
    ds = _base(job, SecondaryCaptureImageStorage, sop_uid, "OT", 1)
    ds.ConversionType = "WSD"
    _image_pixels(ds, job.rows * 2, job.columns * 2, 3, 8)
    ds.PixelData = _rgb_image(job.rows * 2, job.columns * 2, 1, job.rng(0)).tobytes()
    return _save(job, ds, name)


def rgb_rle(job: Job) -> list[Path]:
    """An RGB capture compressed by ``dcmcrle``: RLE with three samples per pixel."""
    source = _rgb_capture(job, job.uid("rgb"), "rgb-source.dcm")
    output = job.temp("rgb-rle.dcm")
    run_tool("dcmcrle", str(source), str(output))
    return [output]


def capture_from_jpeg(job: Job) -> list[Path]:
    """A JPEG file (DCMTK renders one from an RGB capture) wrapped by ``img2dcm`` as it is."""
    source = _rgb_capture(job, job.uid("jpeg-source"), "jpeg-source.dcm")
    picture = job.temp("picture.jpg")
    run_tool("dcmj2pnm", "+oj", "+Jq", "85", str(source), str(picture))
    output = job.temp("capture.dcm")
    run_tool("img2dcm", "-i", "JPEG", "-sef", str(_header_template(job)), *_tool_keys(job, job.uid("capture")),
             str(picture), str(output))  # fmt: skip
    return [output]


def us_cine(job: Job) -> list[Path]:
    """An 8-frame RGB ultrasound cine compressed by ``dcmcjpeg`` (baseline, YBR_FULL_422, lossy)."""
    frames = 8
    ds = _base(job, UltrasoundMultiFrameImageStorage, job.uid("us"), "US", 1)
    ds.ImageType = ["ORIGINAL", "PRIMARY", "ABDOMINAL", "0001"]
    _image_pixels(ds, job.rows, job.columns, 3, 8, frames=frames)
    ds.FrameTime = "33.3"
    ds.CineRate = 30
    ds.FrameIncrementPointer = Tag("FrameTime")
    ds.PixelData = _rgb_image(job.rows, job.columns, frames, job.rng(1)).tobytes()
    source = _save(job, ds, "us-source.dcm")
    output = job.temp("us.dcm")
    run_tool("dcmcjpeg", "+eb", "+un", str(source), str(output))
    return [output]


def enhanced_ct(job: Job) -> list[Path]:
    """A 4-frame Enhanced CT: shared and per-frame functional groups (deep sequences)."""
    frames = 4
    ds = _base(job, EnhancedCTImageStorage, job.uid("enhanced"), "CT", 1)
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL", "NONE"]
    ds.AcquisitionDateTime = ds.ContentDate + "101500"
    ds.FrameOfReferenceUID = make_uid(job.seed, "frame-of-reference", job.entity.study_uid)
    ds.PositionReferenceIndicator = ""
    ds.ContentQualification = "PRODUCT"
    ds.BurnedInAnnotation = "NO"
    _image_pixels(ds, job.rows, job.columns, 1, 12, frames=frames)
    dimension_uid = job.uid("dimensions")
    ds.DimensionOrganizationSequence = DicomSequence([Dataset()])
    ds.DimensionOrganizationSequence[0].DimensionOrganizationUID = dimension_uid
    index = Dataset()
    index.DimensionOrganizationUID = dimension_uid
    index.DimensionIndexPointer = Tag("InStackPositionNumber")
    index.FunctionalGroupPointer = Tag("FrameContentSequence")
    ds.DimensionIndexSequence = DicomSequence([index])
    ds.SharedFunctionalGroupsSequence = DicomSequence([_shared_groups()])
    ds.PerFrameFunctionalGroupsSequence = DicomSequence([_frame_groups(k) for k in range(frames)])
    rng = job.rng(2)
    ds.PixelData = b"".join(_phantom(job.rows, job.columns, rng, k).tobytes() for k in range(frames))
    return [_save(job, ds, "enhanced.dcm")]


def _shared_groups() -> Dataset:
    measures, orientation, frame_type, transform = Dataset(), Dataset(), Dataset(), Dataset()
    measures.PixelSpacing, measures.SliceThickness = ["0.7", "0.7"], "5"
    orientation.ImageOrientationPatient = ["1", "0", "0", "0", "1", "0"]
    frame_type.FrameType = ["ORIGINAL", "PRIMARY", "AXIAL", "NONE"]
    transform.RescaleIntercept, transform.RescaleSlope, transform.RescaleType = "-1024", "1", "HU"
    shared = Dataset()
    shared.PixelMeasuresSequence = DicomSequence([measures])
    shared.PlaneOrientationSequence = DicomSequence([orientation])
    shared.CTImageFrameTypeSequence = DicomSequence([frame_type])
    shared.PixelValueTransformationSequence = DicomSequence([transform])
    return shared


def _frame_groups(k: int) -> Dataset:
    content, position = Dataset(), Dataset()
    content.StackID = "1"
    content.InStackPositionNumber = k + 1
    content.DimensionIndexValues = k + 1
    position.ImagePositionPatient = ["-175", "-175", str(-5 * k)]
    groups = Dataset()
    groups.FrameContentSequence = DicomSequence([content])
    groups.PlanePositionSequence = DicomSequence([position])
    return groups


def large_multiframe(job: Job) -> list[Path]:
    """Multi-frame 16-bit secondary capture of about ``large_bytes``, pixel data streamed."""
    side = _LARGE_FRAME_SIDE
    frame_bytes = side * side * 2
    frames = max(1, -(-job.large_bytes // frame_bytes))
    ds = _base(job, MultiFrameGrayscaleWordSecondaryCaptureImageStorage, job.uid("large"), "OT", 1)
    ds.ImageType = ["DERIVED", "SECONDARY"]
    ds.ConversionType = "WSD"
    ds.BurnedInAnnotation = "NO"
    _image_pixels(ds, side, side, 1, 12, frames=frames)
    ds.FrameTime = "100"
    ds.FrameIncrementPointer = Tag("FrameTime")
    ds.RescaleIntercept, ds.RescaleSlope = "0", "1"
    path = job.temp("large.dcm")
    chunks = (frame.tobytes() for frame in _frames_of_noise(job.rng(3), frames, side))
    write_streamed(path, ds, _PIXEL_DATA, "OW", frames * frame_bytes, chunks)
    return [path]


def _frames_of_noise(rng: np.random.Generator, frames: int, side: int) -> Iterator[np.ndarray]:
    """12-bit noise frames, one at a time: incompressible, like the worst case for a zip."""
    for _ in range(frames):
        yield rng.integers(0, 4096, size=(side, side), dtype="<u2")


def private_blob(job: Job) -> list[Path]:
    """A CT slice carrying a private block with a ``private_ob_bytes`` OB, streamed to disk."""
    sop_uid = job.uid("private")
    ds = _ct_slice(job, 0, sop_uid)
    ds.add_new(Tag(_PRIVATE_GROUP, 0x0010), "LO", _PRIVATE_CREATOR)
    ds.add_new(Tag(_PRIVATE_GROUP, 0x1001), "LO", "synthetic vendor blob")
    length = job.private_ob_bytes + job.private_ob_bytes % 2
    path = job.temp("private.dcm")
    write_streamed(path, ds, _PRIVATE_BLOB, "OB", length, random_chunks(job.rng(4), length))
    return [path]
