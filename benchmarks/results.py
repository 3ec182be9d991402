"""The figures of one benchmark run as plain rows (what the report and results.json are made of)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from benchmarks.archiving import ArchivingResult
from benchmarks.dcmtk import DcmtkResult
from benchmarks.project import ProjectResult, ProjectVariant

#: The reference every retrieval variant is compared with (the issue's target).
REFERENCE_KEY = "dcmtk-move-nodelay"


@dataclass
class RetrievalRow:
    """One retrieval variant. ``status``: "ok", or "failed" with ``reason`` (then figures are 0)."""

    key: str
    label: str
    tool: str  # "dicom-assets" | "dcmtk"
    method: str  # "c-move" | "c-get" | "wado-rs"
    associations: str  # wado-rs: concurrent requests
    expected_instances: int
    status: str = "ok"
    reason: str = ""
    instances: int = 0  # files on disk afterwards
    bytes: int = 0  # received (project: as recorded; DCMTK: bytes of the files written)
    seconds: float = 0.0  # retrieval (project: as recorded by downloaded_series; DCMTK: wall)
    cpu_s: float | None = None  # retrieval CPU (user+sys)
    peak_rss_mb: float | None = None  # whole process (project: the whole sync)
    retrieval_peak_rss_mb: float | None = None  # project: sampled RSS during retrieval
    sync_wall_s: float | None = None  # project: the whole pass (discovery ... inventory)
    sync_cpu_s: float | None = None
    best: bool = False  # the fastest of the project's variants for its method
    notes: list[str] = field(default_factory=list)

    @property
    def complete(self) -> bool:
        return self.status == "ok" and self.instances == self.expected_instances

    @property
    def mb_per_s(self) -> float:
        return self.bytes / 1e6 / self.seconds if self.seconds > 0 else 0.0

    @property
    def instances_per_s(self) -> float:
        return self.instances / self.seconds if self.seconds > 0 else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "mb_per_s": round(self.mb_per_s, 2), "instances_per_s": round(self.instances_per_s, 1), "complete": self.complete}


def project_row(key: str, variant: ProjectVariant, expected: int, result: ProjectResult) -> RetrievalRow:
    row = RetrievalRow(
        key=key, label=variant.label, tool="dicom-assets", method=variant.method,
        associations=str(variant.associations), expected_instances=expected,
        instances=result.files, bytes=result.bytes_received, seconds=result.retrieval_s,
        cpu_s=result.retrieval_cpu_s, peak_rss_mb=result.usage.peak_rss_mb,
        retrieval_peak_rss_mb=result.retrieval_peak_rss_mb, sync_wall_s=result.usage.wall_s, sync_cpu_s=result.usage.cpu_s,
    )  # fmt: skip
    if result.usage.returncode != 0:
        row.notes.append(f"sync exited with {result.usage.returncode}")
    counts = result.summary.get("status_counts") or {}
    if isinstance(counts, dict) and counts.get("complete") != sum(counts.values()):
        row.notes.append(f"series status counts {counts}")
    if result.instances_received != result.files:
        row.notes.append(f"recorded {result.instances_received} instances, {result.files} files on disk")
    return row


def dcmtk_row(key: str, label: str, method: str, associations: str, expected: int, result: DcmtkResult) -> RetrievalRow:
    return RetrievalRow(
        key=key, label=label, tool="dcmtk", method=method, associations=associations, expected_instances=expected,
        instances=result.files, bytes=result.bytes, seconds=result.wall_s, cpu_s=result.cpu_s,
        peak_rss_mb=result.peak_rss_mb,
    )  # fmt: skip


def archiving_dict(result: ArchivingResult) -> dict[str, Any]:
    return {
        "patient_id": result.patient_id,
        "instances": result.instances,
        "input_bytes": result.input_bytes,
        "runs": [{**asdict(r), "mb_per_s": round(r.mb_per_s, 2), "ratio": round(r.ratio, 4)} for r in result.runs],
    }
