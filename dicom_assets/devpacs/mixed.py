"""Mixed content: one series of every kind of object a hospital archive holds, each as stored.

A retriever that handles a CT cohort in Explicit VR Little Endian can still lose or alter what a
real archive holds: compressed images a PACS transcodes when the requester leaves it the choice
(lossy JPEG decompressed, JPEG 2000 refused), big-endian and deflated files a PACS re-encodes,
documents and reports that are not images at all, multi-frame objects of hundreds of MB, private
blobs. :func:`generate_mixed_set` writes that material, so the bundled PACS, Orthanc, the tests
and the benchmarks can check that every object arrives byte for byte as stored.

* **Kinds** (:data:`MIXED_KINDS`): a CT series in each transfer syntax an archive meets (implicit,
  explicit, big-endian and deflated Little Endian; JPEG baseline, extended 12-bit, lossless SV1;
  JPEG-LS lossless and near-lossless; RLE; JPEG 2000 lossless and lossy), then an encapsulated
  PDF, a text SR, a secondary capture made from a JPEG file, an RLE RGB capture, an ultrasound
  cine in JPEG baseline, an Enhanced CT (functional groups), a large multi-frame instance and a
  CT with a big private OB element. Each kind is one series, so per-series results read as a
  table of kinds.
* **Tools**: the compressed syntaxes come from the codecs the archives themselves use: Debian's
  DCMTK (``dcmconv``, ``dcmcjpeg``, ``dcmcjpls``, ``dcmcrle``, ``pdf2dcm``, ``img2dcm``,
  ``dcmj2pnm``) and GDCM's ``gdcmconv`` (package ``libgdcm-tools``) for JPEG 2000, run as
  subprocesses; pydicom writes the uncompressed sources and the objects no tool makes.
  :func:`missing_tools` says what is not installed; generating a kind without its tool raises
  :class:`MixedToolMissing`.
* **Deterministic**: UIDs, dates and pixels derive from ``seed``; the same seed and tools give the
  same bytes (tools that invent UIDs or times are told, or corrected, which to use).
* **Bounded memory**: the large multi-frame and the private OB are streamed to disk chunk by chunk
  (:func:`~dicom_assets.devpacs.mixed_files.write_streamed`), so their size is only bounded by the
  disk (and by DICOM's 4 GiB element length). How each kind is made:
  :mod:`dicom_assets.devpacs.mixed_builders`.
* **Layout** as the cohort generator's: ``<dir>/<StudyInstanceUID>/<SeriesInstanceUID>/<SOP>.dcm``,
  written under hidden names and renamed; tool work files live in a hidden folder, removed at the end.
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence

from pydicom.uid import (
    JPEG2000,
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)

from dicom_assets.devpacs.mixed_builders import (
    Entity,
    Job,
    capture_from_jpeg,
    ct_as_written,
    ct_converted,
    enhanced_ct,
    large_multiframe,
    make_uid,
    pdf,
    private_blob,
    rgb_rle,
    text_sr,
    us_cine,
)
from dicom_assets.devpacs.mixed_files import (
    TOOL_PACKAGES,
    MixedToolMissing,
    identify,
    install_file,
)

__all__ = [
    "MIXED_KINDS",
    "MixedInstance",
    "MixedToolMissing",
    "TOOL_PACKAGES",
    "generate_mixed_set",
    "missing_tools",
]


@dataclass(frozen=True)
class MixedInstance:
    """One file written by :func:`generate_mixed_set`: what it is and how it is stored."""

    kind: str
    path: Path
    sop_class_uid: str
    transfer_syntax_uid: str
    size: int
    lossy: bool
    patient_id: str
    study_instance_uid: str
    series_instance_uid: str
    sop_instance_uid: str

    @property
    def transfer_syntax_name(self) -> str:
        return UID(self.transfer_syntax_uid).name


@dataclass(frozen=True)
class _Kind:
    """One kind of object: its name (the series description), where it goes and how it is made."""

    name: str
    syntax: str
    lossy: bool
    tools: tuple[str, ...]
    build: Callable[[Job], list[Path]]
    patient: int = 1  # 0: the CT-encodings patient; 1: the other objects (one patient: all there)


# --------------------------------------------------------------------------------------------
# The kinds, in series order.

_KINDS: tuple[_Kind, ...] = (
    _Kind("ct-implicit-le", ImplicitVRLittleEndian, False, ("dcmconv",), ct_converted("dcmconv", "+ti"), 0),
    _Kind("ct-explicit-le", ExplicitVRLittleEndian, False, (), ct_as_written, 0),
    _Kind("ct-explicit-be", ExplicitVRBigEndian, False, ("dcmconv",), ct_converted("dcmconv", "+tb"), 0),
    _Kind("ct-deflated-le", DeflatedExplicitVRLittleEndian, False, ("dcmconv",), ct_converted("dcmconv", "+td"), 0),
    _Kind("ct-jpeg-baseline", JPEGBaseline8Bit, True, ("dcmcjpeg",), ct_converted("dcmcjpeg", "+eb", "+un"), 0),
    _Kind("ct-jpeg-extended", JPEGExtended12Bit, True, ("dcmcjpeg",), ct_converted("dcmcjpeg", "+ee", "+un"), 0),
    _Kind("ct-jpeg-lossless-sv1", JPEGLosslessSV1, False, ("dcmcjpeg",), ct_converted("dcmcjpeg", "+e1", "+un"), 0),
    _Kind("ct-jpegls-lossless", JPEGLSLossless, False, ("dcmcjpls",), ct_converted("dcmcjpls", "+el", "+un"), 0),
    _Kind("ct-jpegls-near-lossless", JPEGLSNearLossless, True, ("dcmcjpls",), ct_converted("dcmcjpls", "+en", "+un"), 0),
    _Kind("ct-rle", RLELossless, False, ("dcmcrle",), ct_converted("dcmcrle"), 0),
    _Kind("ct-j2k-lossless", JPEG2000Lossless, False, ("gdcmconv",), ct_converted("gdcmconv", "--quiet", "--j2k"), 0),
    _Kind("ct-j2k-lossy", JPEG2000, True, ("gdcmconv",),
          ct_converted("gdcmconv", "--quiet", "--j2k", "--lossy", "-r", "10", restore_uids=True), 0),  # fmt: skip
    _Kind("pdf", ExplicitVRLittleEndian, False, ("pdf2dcm",), pdf),
    _Kind("sr-text", ExplicitVRLittleEndian, False, (), text_sr),
    _Kind("sc-from-jpeg", JPEGBaseline8Bit, True, ("dcmj2pnm", "img2dcm"), capture_from_jpeg),
    _Kind("sc-rgb-rle", RLELossless, False, ("dcmcrle",), rgb_rle),
    _Kind("us-cine-jpeg", JPEGBaseline8Bit, True, ("dcmcjpeg",), us_cine),
    _Kind("enhanced-ct", ExplicitVRLittleEndian, False, (), enhanced_ct),
    _Kind("large-multiframe", ExplicitVRLittleEndian, False, (), large_multiframe),
    _Kind("private-big-ob", ExplicitVRLittleEndian, False, (), private_blob),
)
_BY_NAME = {kind.name: kind for kind in _KINDS}
#: Every kind :func:`generate_mixed_set` can write, in series order.
MIXED_KINDS: tuple[str, ...] = tuple(_BY_NAME)


def missing_tools(kinds: Iterable[str] | None = None) -> dict[str, str]:
    """``program -> Debian package`` for every program the kinds need that is not on PATH."""
    needed = sorted({tool for kind in _select(kinds) for tool in kind.tools})
    return {tool: TOOL_PACKAGES[tool] for tool in needed if shutil.which(tool) is None}


def _select(kinds: Iterable[str] | None) -> list[_Kind]:
    if kinds is None:
        return list(_KINDS)
    names = list(kinds)
    unknown = [name for name in names if name not in _BY_NAME]
    if unknown:
        raise ValueError(f"unknown kinds {unknown}; known: {', '.join(MIXED_KINDS)}")
    return [kind for kind in _KINDS if kind.name in names]


def _entities(seed: int, patient_ids: Sequence[str]) -> list[Entity]:
    descriptions = ("CT encodings", "Documents, captures and multi-frame objects")
    return [
        Entity(
            patient_id=pid,
            patient_name=f"Mixed^Patient{i + 1}",
            sex="FM"[i % 2],
            birth_date=f"19{50 + (seed + i) % 40}0{1 + i % 9}15",
            study_uid=make_uid(seed, "study", pid),
            study_description=descriptions[i % 2] if len(patient_ids) > 1 else "Mixed content",
            accession=f"MIX{seed % 10**6:06d}{i:02d}",
        )
        for i, pid in enumerate(patient_ids)
    ]


def generate_mixed_set(
    directory: Path,
    *,
    seed: int = 0,
    kinds: Iterable[str] | None = None,
    patient_ids: Sequence[str] = ("MIXED0001", "MIXED0002"),
    ct_slices: int = 2,
    rows: int = 128,
    columns: int = 128,
    large_bytes: int = 20 * 1024 * 1024,
    private_ob_bytes: int = 4 * 1024 * 1024,
) -> list[MixedInstance]:
    """Write the mixed set (every kind, or ``kinds``) under ``directory``; one series per kind.

    With two ``patient_ids`` the CT encodings go to the first patient's study and the other
    kinds to the second's; with one, everything is in one study. ``ct_slices`` is the number of
    instances of each CT kind; ``large_bytes`` the pixel data size of the large multi-frame
    (rounded up to whole 512x512 16-bit frames); ``private_ob_bytes`` the private OB's length.
    Raises :class:`MixedToolMissing` (before writing anything) when a needed program is absent.
    """
    if not 1 <= len(patient_ids) <= 2:
        raise ValueError("one or two patient_ids")
    if min(ct_slices, rows, columns, large_bytes, private_ob_bytes) < 1:
        raise ValueError("ct_slices, rows, columns and the sizes must be positive")
    selected = _select(kinds)
    missing = missing_tools(kind.name for kind in selected)
    if missing:
        raise MixedToolMissing(missing)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    entities = _entities(seed, patient_ids)
    written: list[MixedInstance] = []
    with tempfile.TemporaryDirectory(prefix=".mixed-work-", dir=directory) as work:
        for kind in selected:
            job = Job(
                kind=kind.name, work=Path(work), entity=entities[kind.patient % len(entities)],
                series_uid=make_uid(seed, "series", kind.name), series_number=_KINDS.index(kind) + 1, seed=seed,
                ct_slices=ct_slices, rows=rows, columns=columns, large_bytes=large_bytes, private_ob_bytes=private_ob_bytes,
            )  # fmt: skip
            written += [_install(kind, job, directory, path) for path in kind.build(job)]
    return written


def _install(kind: _Kind, job: Job, root: Path, made: Path) -> MixedInstance:
    """Check a built file has its kind's syntax and UIDs, move it into place, describe it."""
    meta = identify(made)
    if meta.transfer_syntax != kind.syntax:
        raise RuntimeError(f"{kind.name}: {made.name} is in {meta.transfer_syntax}, expected {kind.syntax}")
    if (meta.study_instance_uid, meta.series_instance_uid) != (job.entity.study_uid, job.series_uid):
        raise RuntimeError(f"{kind.name}: {made.name} is not in its series (the tool changed its UIDs)")
    final = install_file(made, root, job.entity.study_uid, job.series_uid, meta.sop_instance_uid)
    return MixedInstance(
        kind=kind.name,
        path=final,
        sop_class_uid=meta.sop_class_uid,
        transfer_syntax_uid=meta.transfer_syntax,
        size=final.stat().st_size,
        lossy=kind.lossy,
        patient_id=job.entity.patient_id,
        study_instance_uid=job.entity.study_uid,
        series_instance_uid=job.series_uid,
        sop_instance_uid=meta.sop_instance_uid,
    )
