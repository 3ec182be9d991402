"""Archiving: the project's ``build_patient_archive`` against Info-ZIP ``zip -r -6`` / ``-1``.

All three read the same files: the archive patient's instances laid out as the retrieval
leaves them (``<download_dir>/<patient key>/<study>/<series>/<sop>.dcm``, hard links into the
cached cohort), recorded as complete in a fresh PostgreSQL state DB, as after a sync. The files
are read once before timing, so every contender starts with them in the page cache. The
project's time is the whole asset step (parallel deflate, fsync, read-back verification of
every CRC, state DB record); ``zip`` only writes. Our zip must pass ``unzip -tq``.
"""

from __future__ import annotations

import os
import resource
import shutil
from dataclasses import dataclass
from pathlib import Path

from benchmarks.cohorts import Cohort
from benchmarks.measure import ChildUsage, run_child
from benchmarks.project import scratch_database
from dicom_assets import layout
from dicom_assets.archive import build_patient_archive
from dicom_assets.store import StateStore
from dicom_assets.store.records import PatientRecord, SeriesRecord, StudyRecord

READ_CHUNK = 4 << 20


@dataclass(frozen=True)
class ZipRun:
    """One way of zipping the patient: seconds, CPU, output size."""

    key: str  # "dicom-assets" | "zip-6" | "zip-1"
    label: str
    input_bytes: int
    output_bytes: int
    seconds: float
    cpu_s: float
    peak_rss_mb: float | None
    readable_by_unzip: bool | None = None

    @property
    def mb_per_s(self) -> float:
        return self.input_bytes / 1e6 / self.seconds if self.seconds > 0 else 0.0

    @property
    def ratio(self) -> float:
        """Compression ratio, input / output (higher is smaller)."""
        return self.input_bytes / self.output_bytes if self.output_bytes else 0.0


@dataclass(frozen=True)
class ArchivingResult:
    patient_id: str
    instances: int
    input_bytes: int
    runs: tuple[ZipRun, ...]


def _link_or_copy(source: Path, target: Path) -> None:
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def lay_out_as_downloaded(cohort: Cohort, download_dir: Path) -> int:
    """Put the cohort's files where the retrieval would have written them; returns their bytes."""
    total = 0
    for s in cohort.series:
        target_dir = layout.series_dir(download_dir, s.patient_id, s.study_instance_uid, s.series_instance_uid)
        target_dir.mkdir(parents=True, exist_ok=True)
        for source in sorted((cohort.dicom_dir / s.study_instance_uid / s.series_instance_uid).glob("*.dcm")):
            _link_or_copy(source, layout.instance_file(target_dir, source.stem))
            total += source.stat().st_size
    return total


def record_as_downloaded(store: StateStore, cohort: Cohort) -> None:
    """Patient, studies and series in the state DB, every series complete: what a sync leaves."""
    store.upsert_patients(PatientRecord(pid) for pid in cohort.patient_ids)
    store.upsert_studies({s.study_instance_uid: StudyRecord(s.study_instance_uid, s.patient_id) for s in cohort.series}.values())
    store.upsert_series(
        SeriesRecord(s.series_instance_uid, s.study_instance_uid, s.patient_id, series_number=s.series_number,
                     modality="CT", expected_instances=s.instances)
        for s in cohort.series
    )  # fmt: skip
    for s in cohort.series:
        claimed = store.claim_next_series([s.patient_id], "benchmark", 600.0, only=[s.series_instance_uid])
        assert claimed is not None, s.series_instance_uid
        store.finish_series(s.series_instance_uid, "benchmark", "complete", s.instances, s.bytes, expected_instances=s.instances)


def _warm_page_cache(directory: Path) -> None:
    for root, _, names in os.walk(directory):
        for name in names:
            with open(os.path.join(root, name), "rb") as f:
                while f.read(READ_CHUNK):
                    pass


def _project_archive(store: StateStore, download_dir: Path, archive_dir: Path, patient_id: str, input_bytes: int) -> ZipRun:
    """``build_patient_archive`` in this process; CPU from this process's rusage (all threads)."""
    before = resource.getrusage(resource.RUSAGE_SELF)
    result = build_patient_archive(store, download_dir, archive_dir, patient_id, compression_level=6)
    after = resource.getrusage(resource.RUSAGE_SELF)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    unzip = run_child(["unzip", "-tq", str(result.path)], archive_dir.parent / "logs" / "unzip-t.log")
    return ZipRun("dicom-assets", "dicom-assets patient_archive (level 6, verified)", input_bytes, result.bytes, result.seconds, cpu, None, unzip.returncode == 0)


def _info_zip(level: int, download_dir: Path, key: str, out: Path, input_bytes: int) -> ZipRun:
    zip_binary = shutil.which("zip")
    if zip_binary is None:
        raise RuntimeError("Info-ZIP zip is not installed (apt-get install zip; see scripts/ensure-services.sh)")
    usage: ChildUsage = run_child([zip_binary, "-r", f"-{level}", "-q", str(out), key], out.parent / "logs" / f"zip-{level}.log", cwd=download_dir)
    if usage.returncode != 0:
        raise RuntimeError(f"zip -{level} exited with {usage.returncode}\n{usage.log_tail()}")
    return ZipRun(f"zip-{level}", f"zip -r -{level}", input_bytes, out.stat().st_size, usage.wall_s, usage.cpu_s, usage.peak_rss_mb)


def run_archiving(cohort: Cohort, directory: Path, pg_server_url: str) -> ArchivingResult:
    """The three contenders on the archive patient, in ``directory`` (must not exist yet)."""
    (patient_id,) = cohort.patient_ids
    download_dir, archive_dir = directory / "downloads", directory / "archives"
    (directory / "logs").mkdir(parents=True)
    input_bytes = lay_out_as_downloaded(cohort, download_dir)
    _warm_page_cache(download_dir)
    key = layout.patient_key(patient_id)
    with scratch_database(pg_server_url) as url:
        store = StateStore(url)
        try:
            store.create_schema()
            record_as_downloaded(store, cohort)
            ours = _project_archive(store, download_dir, archive_dir, patient_id, input_bytes)
        finally:
            store.dispose()
    runs = (ours, *(_info_zip(level, download_dir, key, directory / f"zip-{level}.zip", input_bytes) for level in (6, 1)))
    return ArchivingResult(patient_id, cohort.instances, input_bytes, runs)
