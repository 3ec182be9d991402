"""One multi-GB instance: is archiving it (and retrieving it) bounded in memory?

Breast tomosynthesis, XA/US cines and whole-slide images are single instances of 0.5-4 GB; a
sync whose cohort held one 2.1 GB instance once peaked at 4,272 MiB because the zip writer read
each member whole. This section generates one multi-frame instance (full: 4,000 frames of
512x512 16-bit, 2.1 GB; ``--quick``: 80 frames of 256x256, 10.5 MB, still above one zip chunk),
cached under ``<work-dir>/large-instance-<digest>/`` like the cohorts, and measures:

a. archiving it with ``build_patient_archive`` (write, fsync, read-back verification, state
   DB record) in a child process whose own peak RSS (``VmHWM``, reset at exec) it reports,
   with its throughput next to the small-member archiving figure, and ``unzip -tq`` on the zip;
b. retrieving it: a throwaway Orthanc holding only this instance, and ``dicom-assets sync``
   (C-MOVE, default associations) as in the retrieval section; peak RSS of the whole sync
   (which archives it too) and during retrieval.

The generator writes the header with pydicom and then streams the pixel data frame by frame,
so it never holds more than one frame.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import struct
import sys
import traceback
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
from pydicom import dcmread, dcmwrite
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from benchmarks.archiving import lay_out_as_downloaded, record_as_downloaded
from benchmarks.cohorts import SUMMARY_FILE, Cohort
from benchmarks.measure import environment, run_child
from benchmarks.orthanc_site import post_instance, start_site
from benchmarks.project import ProjectVariant, run_project_variant, scratch_database
from dicom_assets.config import PacsSettings
from dicom_assets.devpacs.cohort import CohortSpec, CohortSummary, GeneratedSeries
from dicom_assets.store import StateStore

CACHE_VERSION = 1
PATIENT_ID = "LARGE0001"
#: Multi-frame Grayscale Word Secondary Capture: the simplest multi-frame 16-bit IOD.
MULTIFRAME_WORD_SC = "1.2.840.10008.5.1.4.1.1.7.3"
RSS_TARGET_MB = 300.0
ARCHIVE_TIMEOUT_S = 900.0
UPLOAD_TIMEOUT_S = 900.0
_REPO_ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class LargeSpec:
    """One multi-frame instance of ``frames`` frames of ``rows`` x ``columns`` 16-bit pixels."""

    frames: int
    rows: int
    columns: int
    seed: int = 11

    @property
    def pixel_bytes(self) -> int:
        return self.frames * self.rows * self.columns * 2

    def describe(self) -> str:
        return f"one multi-frame instance, {self.frames:,} frames of {self.rows}x{self.columns} 16-bit ({self.pixel_bytes / 1e6:,.0f} MB of pixels)"


def large_spec(quick: bool) -> LargeSpec:
    return LargeSpec(80, 256, 256) if quick else LargeSpec(4000, 512, 512)


# -- the instance ---------------------------------------------------------------------------------


def _header(spec: LargeSpec, study: str, series: str, sop: str) -> Dataset:
    """Everything but the pixel data (written after it, streamed)."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = MULTIFRAME_WORD_SC
    ds.file_meta.MediaStorageSOPInstanceUID = sop
    ds.SOPClassUID, ds.SOPInstanceUID = MULTIFRAME_WORD_SC, sop
    ds.StudyDate, ds.StudyTime, ds.AccessionNumber, ds.Modality = "20240601", "120000", "LARGE1", "OT"
    ds.ConversionType, ds.ReferringPhysicianName = "WSD", ""
    ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = "Large^Instance", PATIENT_ID, "19600101", "F"
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.StudyID, ds.SeriesNumber, ds.InstanceNumber = study, series, "1", 1, 1
    ds.StudyDescription, ds.SeriesDescription = "BENCH LARGE INSTANCE", "Multi-frame"
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.NumberOfFrames, ds.Rows, ds.Columns = spec.frames, spec.rows, spec.columns
    ds.FrameIncrementPointer = 0x00181063  # Frame Time
    ds.FrameTime = "33.3"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    return ds


def _frames(spec: LargeSpec) -> Iterator[bytes]:
    """CT-like frames (an ellipse in air plus Gaussian noise, rolled per frame): they deflate
    about 2:1 like the cohorts' slices. One frame in memory at a time."""
    rng = np.random.default_rng(spec.seed)
    yy, xx = np.mgrid[-1.0 : 1.0 : spec.rows * 1j, -1.0 : 1.0 : spec.columns * 1j].astype(np.float32)
    base = np.where((xx / 0.85) ** 2 + (yy / 0.65) ** 2 <= 1.0, np.float32(1064.0), np.float32(24.0))
    noise = rng.normal(0.0, 12.0, size=(spec.rows, spec.columns)).astype(np.float32)
    for k in range(spec.frames):
        frame = base + np.roll(noise, (7 * k % spec.rows, 13 * k % spec.columns), axis=(0, 1))
        yield np.clip(np.rint(frame), 0, 4095).astype("<u2").tobytes()


def write_instance(path: Path, spec: LargeSpec, study: str, series: str, sop: str) -> int:
    """Write the instance (header by pydicom, then OW pixel data streamed); returns its size."""
    with open(path, "wb") as f:
        dcmwrite(f, _header(spec, study, series, sop), enforce_file_format=True)
        f.write(struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OW", 0, spec.pixel_bytes))  # explicit VR LE
        for frame in _frames(spec):
            f.write(frame)
    check = dcmread(path, stop_before_pixels=True)
    if check.SOPInstanceUID != sop or int(check.NumberOfFrames) != spec.frames:
        raise RuntimeError(f"{path} does not read back as written")
    return path.stat().st_size


def _digest(spec: LargeSpec) -> str:
    text = json.dumps({"version": CACHE_VERSION, **dataclasses.asdict(spec)}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def _as_cohort(directory: Path, spec: LargeSpec, series: GeneratedSeries, generated_now: bool) -> Cohort:
    """The instance as a one-series cohort, so the archiving section's layout and state DB
    helpers apply (the CohortSpec only carries the patient ID prefix)."""
    cohort_spec = CohortSpec(patients=1, series_per_study=1, slices_per_series=1, rows=spec.rows, columns=spec.columns,
                             patient_id_prefix="LARGE", seed=spec.seed)  # fmt: skip
    return Cohort(directory, cohort_spec, CohortSummary((series,)), generated_now)


def cached_large_instance(work_dir: Path, spec: LargeSpec) -> Cohort:
    """The instance under ``<work_dir>/large-instance-<digest>/``: reused when its summary.json
    exists (written last), else (re)generated."""
    directory = Path(work_dir) / f"large-instance-{_digest(spec)}"
    summary_file = directory / SUMMARY_FILE
    if summary_file.is_file():
        row = json.loads(summary_file.read_text())
        series = GeneratedSeries(**{**row, "sop_instance_uids": tuple(row["sop_instance_uids"])})
        return _as_cohort(directory, spec, series, generated_now=False)
    if directory.exists():
        shutil.rmtree(directory)  # an interrupted generation
    study, series_uid, sop = generate_uid(), generate_uid(), generate_uid()
    target_dir = directory / "dicom" / study / series_uid
    target_dir.mkdir(parents=True)
    temp = target_dir / f".{sop}.{uuid.uuid4().hex[:8]}.part"
    size = write_instance(temp, spec, study, series_uid, sop)
    os.replace(temp, target_dir / f"{sop}.dcm")
    series = GeneratedSeries(PATIENT_ID, study, series_uid, 1, 1, size, (sop,))
    summary_file.write_text(json.dumps(dataclasses.asdict(series), indent=1))
    return _as_cohort(directory, spec, series, generated_now=True)


# -- a. archiving, in a child process ---------------------------------------------------------------


def _read_through(directory: Path) -> None:
    for path in directory.rglob("*.dcm"):
        with open(path, "rb") as f:
            while f.read(8 << 20):
                pass


def _archive(cohort: Cohort, directory: Path, pg_server_url: str) -> dict[str, Any]:
    """``build_patient_archive`` of the instance in ``benchmarks.archive_child``; its figures."""
    download_dir, archive_dir, result_file = directory / "downloads", directory / "archives", directory / "archive-child.json"
    input_bytes = lay_out_as_downloaded(cohort, download_dir)
    _read_through(download_dir)  # in the page cache, as the archiving section's files are
    with scratch_database(pg_server_url) as url:
        store = StateStore(url)
        try:
            store.create_schema()
            record_as_downloaded(store, cohort)
        finally:
            store.dispose()
        argv = [sys.executable, "-m", "benchmarks.archive_child", url, str(download_dir), str(archive_dir), PATIENT_ID, str(result_file)]
        usage = run_child(argv, directory / "logs" / "archive-child.log", environment(), cwd=_REPO_ROOT, timeout_s=ARCHIVE_TIMEOUT_S)
    if usage.returncode != 0 or not result_file.is_file():
        raise RuntimeError(f"archiving child exited with {usage.returncode}\n{usage.log_tail()}")
    child = json.loads(result_file.read_text())
    unzip = run_child(["unzip", "-tq", child["path"]], directory / "logs" / "unzip-t.log")
    seconds = child["seconds"]
    return {
        "input_bytes": input_bytes, "output_bytes": child["bytes"], "seconds": round(seconds, 2),
        "mb_per_s": round(input_bytes / 1e6 / seconds, 1) if seconds > 0 else 0.0,
        "ratio": round(input_bytes / child["bytes"], 4) if child["bytes"] else 0.0,
        "cpu_s": round(usage.cpu_s, 1), "peak_rss_mb": round(child["vm_hwm_bytes"] / 1e6, 1),
        "rss_before_mb": round(child["rss_before_bytes"] / 1e6, 1), "sampled_peak_rss_mb": round(usage.peak_rss_mb, 1),
        "readable_by_unzip": unzip.returncode == 0,
    }  # fmt: skip


# -- b. retrieval: dicom-assets sync against an Orthanc holding only the instance --------------------


def _retrieve(cohort: Cohort, spec: LargeSpec, directory: Path, pg_server_url: str) -> dict[str, Any]:
    site = start_site(directory / "orthanc")
    try:
        (series,) = cohort.series
        path = cohort.dicom_dir / series.study_instance_uid / series.series_instance_uid / f"{series.sop_instance_uids[0]}.dcm"
        post_instance(site.orthanc.base_url, path, timeout_s=UPLOAD_TIMEOUT_S)
        associations = int(PacsSettings.model_fields["max_concurrent_associations"].default)
        variant = ProjectVariant("c-move", associations, True)
        try:
            result = run_project_variant(site, variant, directory / "sync", pg_server_url, f"^{PATIENT_ID}$")
        finally:
            for bulky in ("downloads", "archives"):
                shutil.rmtree(directory / "sync" / bulky, ignore_errors=True)
    finally:
        site.orthanc.stop()
        for bulky in ("storage", "index"):
            shutil.rmtree(site.orthanc.root / bulky, ignore_errors=True)
    # Orthanc may re-encode the header a little (the file meta): the pixels are what must arrive
    complete = result.files == 1 and result.bytes_on_disk >= spec.pixel_bytes and result.usage.returncode == 0
    return {
        "status": "ok" if complete else "failed",
        "reason": "" if complete else f"sync exited with {result.usage.returncode}; {result.files} file(s), {result.bytes_on_disk} bytes on disk\n{result.usage.log_tail(15)}",
        "label": variant.label, "bytes": result.bytes_received, "seconds": round(result.retrieval_s, 2),
        "mb_per_s": round(result.bytes_received / 1e6 / result.retrieval_s, 1) if result.retrieval_s > 0 else 0.0,
        "peak_rss_mb": round(result.usage.peak_rss_mb, 1),
        "retrieval_peak_rss_mb": round(result.retrieval_peak_rss_mb, 1) if result.retrieval_peak_rss_mb else None,
        "sync_wall_s": round(result.usage.wall_s, 1),
    }  # fmt: skip


# -- the section ----------------------------------------------------------------------------------


def _failed(exc: BaseException) -> dict[str, Any]:
    traceback.print_exc()
    return {"status": "failed", "reason": f"{type(exc).__name__}: {exc}"[:4000]}


def run_large_instance(work_dir: Path, directory: Path, pg_server_url: str, quick: bool) -> dict[str, Any]:
    """The whole section; ``directory`` (a fresh scratch dir) loses its bulky files at the end.
    Archiving and retrieval fail separately: one failing keeps the other's figures."""
    spec = large_spec(quick)
    cohort = cached_large_instance(work_dir, spec)
    (series,) = cohort.series
    out: dict[str, Any] = {"status": "ok", "instance": spec.describe(), "bytes": series.bytes, "frames": spec.frames,
                           "generated_now": cohort.generated_now, "rss_target_mb": RSS_TARGET_MB}  # fmt: skip
    try:
        out["archive"] = {"status": "ok", **_archive(cohort, directory / "archive", pg_server_url)}
    except Exception as exc:  # noqa: BLE001 - a failed part is reported, the section goes on
        out["archive"] = _failed(exc)
    finally:
        for bulky in ("downloads", "archives"):
            shutil.rmtree(directory / "archive" / bulky, ignore_errors=True)
    try:
        out["retrieval"] = _retrieve(cohort, spec, directory / "retrieval", pg_server_url)
    except Exception as exc:  # noqa: BLE001
        out["retrieval"] = _failed(exc)
    if out["archive"]["status"] != "ok" or out["retrieval"]["status"] != "ok":
        out["status"] = "failed"
    return out
