"""The benchmark's data: synthetic 512x512 16-bit CT with noise, generated once and cached.

Generating 1.4 GB takes a while and the images only depend on the spec, so each cohort lives in
``<work>/cohort-<digest of the spec>/`` with a ``summary.json`` written last: a directory without
it (an interrupted generation) is regenerated, one with it is reused as is.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from dicom_assets.devpacs.cohort import CohortSpec, CohortSummary, GeneratedSeries, generate_cohort

#: Bump when the generator changes in a way that makes cached cohorts wrong.
CACHE_VERSION = 2  # 2: summary.json holds every series' SOP Instance UIDs too
SUMMARY_FILE = "summary.json"


@dataclass(frozen=True)
class Cohort:
    """A generated cohort on disk (``<directory>/dicom/<StudyUID>/<SeriesUID>/<SOPUID>.dcm``)."""

    directory: Path
    spec: CohortSpec
    summary: CohortSummary
    generated_now: bool

    @property
    def dicom_dir(self) -> Path:
        """Where the DICOM files are (``summary.json`` sits next to it, not among them)."""
        return self.directory / "dicom"

    @property
    def series(self) -> tuple[GeneratedSeries, ...]:
        return self.summary.series

    @property
    def instances(self) -> int:
        return self.summary.instances

    @property
    def bytes(self) -> int:
        return self.summary.bytes

    @property
    def patient_ids(self) -> tuple[str, ...]:
        return self.summary.patients

    def describe(self) -> str:
        s = self.spec
        return (
            f"{len(self.patient_ids)} patients x {s.studies_per_patient} study x {s.series_per_study} series x "
            f"{s.slices_per_series} slices of {s.rows}x{s.columns} 16-bit CT with noise: "
            f"{self.instances} instances, {self.bytes / 1e6:.0f} MB"
        )


@dataclass(frozen=True)
class BenchCohorts:
    """What one benchmark run uses: the retrieval cohort and the (separate) archiving patient."""

    retrieval: Cohort
    archive_patient: Cohort


def retrieval_spec(quick: bool) -> CohortSpec:
    """Full: 8 x 1 x 2 x 130 slices of 512x512 = 2,080 instances, 1.09 GB. Quick: ~3 MB."""
    if quick:
        return CohortSpec(patients=3, series_per_study=2, slices_per_series=4, rows=256, columns=256, patient_id_prefix="BENCH", seed=5)
    return CohortSpec(patients=8, series_per_study=2, slices_per_series=130, rows=512, columns=512, patient_id_prefix="BENCH", seed=5)


def archive_patient_spec(quick: bool) -> CohortSpec:
    """Full: one patient, 2 series x 335 slices of 512x512 = 670 instances, 352 MB. Quick: ~1 MB."""
    if quick:
        return CohortSpec(patients=1, series_per_study=2, slices_per_series=4, rows=256, columns=256, patient_id_prefix="ARCH", seed=6)
    return CohortSpec(patients=1, series_per_study=2, slices_per_series=335, rows=512, columns=512, patient_id_prefix="ARCH", seed=6)


def spec_digest(spec: CohortSpec) -> str:
    text = json.dumps({"version": CACHE_VERSION, **dataclasses.asdict(spec)}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def cached_cohort(work_dir: Path, spec: CohortSpec) -> Cohort:
    """The cohort for ``spec`` under ``work_dir``: reused when complete, else (re)generated."""
    directory = Path(work_dir) / f"cohort-{spec_digest(spec)}"
    summary_file = directory / SUMMARY_FILE
    if summary_file.is_file():
        rows = json.loads(summary_file.read_text())
        series = tuple(GeneratedSeries(**{**row, "sop_instance_uids": tuple(row["sop_instance_uids"])}) for row in rows)
        return Cohort(directory, spec, CohortSummary(series), generated_now=False)
    if directory.exists():
        shutil.rmtree(directory)  # an interrupted generation
    summary = generate_cohort(directory / "dicom", spec)
    summary_file.write_text(json.dumps([dataclasses.asdict(s) for s in summary.series], indent=1))
    return Cohort(directory, spec, summary, generated_now=True)


def bench_cohorts(work_dir: Path, quick: bool) -> BenchCohorts:
    return BenchCohorts(cached_cohort(work_dir, retrieval_spec(quick)), cached_cohort(work_dir, archive_patient_spec(quick)))
