"""The project's retrieval, measured the way it runs in production: ``dicom-assets sync``.

Each variant gets a fresh PostgreSQL state DB, a fresh Dagster home and an empty download
directory, and runs ``dicom-assets sync --json-summary`` as a child process (without
``TCP_NODELAY`` in its environment: the project's sockets must not depend on it). The sync is a
whole pass (discovery, retrieval, archive (stored, ``compression_level: 0``: the archiving section
measures deflate), validation, inventory); the retrieval figures are the
ones the ``downloaded_series`` asset records (seconds, bytes, instances), which ``--json-summary``
writes out. The CPU of the retrieval phase alone is read off the child's sampled CPU times
between the start and the end of retrieval (end = the newest instance file's mtime, start = end
minus the recorded retrieval seconds). ``wado-rs`` is the same sync with ``pacs.protocol:
dicomweb`` against the same Orthanc's DICOMweb plugin (no storage SCP, no receiver section).
"""

from __future__ import annotations

import json
import os
import sys
import uuid
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import sqlalchemy as sa
import yaml

from benchmarks.measure import ChildUsage, cpu_between, environment, peak_rss_between, run_child
from benchmarks.orthanc_site import PROJECT_AET, Site
from dicom_assets_tests.orthanc import ORTHANC_AET

SYNC_TIMEOUT_S = 1200.0


@dataclass(frozen=True)
class ProjectVariant:
    """One way to run the project: retrieve method and number of concurrent associations
    (for ``wado-rs``: concurrent WADO-RS requests, the same config key)."""

    method: str  # "c-move" | "c-get" | "wado-rs"
    associations: int
    default: bool  # the config's default number of associations
    #: More ``pacs:`` settings, as (key, value) pairs (e.g. the WAN section's adaptive concurrency switch).
    pacs_extra: tuple[tuple[str, object], ...] = ()

    @property
    def label(self) -> str:
        unit = "requests" if self.method == "wado-rs" else "assoc"
        return f"dicom-assets sync {self.method}, {self.associations} {unit}{' (default)' if self.default else ''}"


@dataclass(frozen=True)
class ProjectResult:
    variant: ProjectVariant
    usage: ChildUsage
    summary: dict[str, object]
    files: int
    bytes_on_disk: int
    retrieval_s: float
    bytes_received: int
    instances_received: int
    retrieval_cpu_s: float | None
    retrieval_peak_rss_mb: float | None


@contextmanager
def scratch_database(server_url: str) -> Iterator[str]:
    """A new, empty PostgreSQL database on ``server_url`` for the block; dropped afterwards."""
    name = f"dicom_assets_bench_{uuid.uuid4().hex[:12]}"
    admin = sa.create_engine(server_url, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
        yield sa.engine.make_url(server_url).set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def write_config(directory: Path, site: Site, variant: ProjectVariant, database_url: str, patient_id_regex: str) -> Path:
    """The sync's config: Orthanc on loopback, our receiver on its registered port (DIMSE) or
    Orthanc's DICOMweb root (``wado-rs``), defaults elsewhere."""
    pacs: dict[str, object] = {
        "host": "127.0.0.1", "port": site.dicom_port, "called_ae_title": ORTHANC_AET, "calling_ae_title": PROJECT_AET,
    }  # fmt: skip
    web = variant.method == "wado-rs"
    if web:
        pacs["protocol"] = "dicomweb"
    else:
        pacs["retrieve_method"] = variant.method
    if not variant.default:
        pacs["max_concurrent_associations"] = variant.associations
    pacs.update(variant.pacs_extra)
    config: dict[str, object] = {"pacs": pacs}
    if web:
        config["dicomweb"] = {"url": site.dicomweb_url}
    else:
        config["receiver"] = {"ae_title": PROJECT_AET, "bind_address": "127.0.0.1", "port": site.project_receiver_port}
    config.update({
        "selection": {"patient_id_regex": patient_id_regex},
        # Stored, not deflated: the sync archives every patient after retrieving it, and
        # deflating 1.09 GB cost each variant seconds that none of its figures measure.
        "archive": {"compression_level": 0},
        "paths": {"download_dir": "downloads", "archive_dir": "archives", "report_dir": "reports"},
        "database": {"url": database_url},
    })  # fmt: skip
    path = directory / "config.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def instance_files(download_dir: Path) -> tuple[int, int, float | None]:
    """(count, bytes, newest mtime) of the ``.dcm`` files under ``download_dir`` (temp files excluded)."""
    count = size = 0
    newest: float | None = None
    for root, _, names in os.walk(download_dir):
        for name in names:
            if name.endswith(".dcm") and not name.startswith("."):
                st = os.stat(os.path.join(root, name))
                count += 1
                size += st.st_size
                newest = st.st_mtime if newest is None else max(newest, st.st_mtime)
    return count, size, newest


def dicom_assets_command() -> str:
    """The ``dicom-assets`` script of this interpreter's environment."""
    return str(Path(sys.executable).parent / "dicom-assets")


def run_project_variant(
    site: Site, variant: ProjectVariant, directory: Path, pg_server_url: str, patient_id_regex: str, wrap: Sequence[str] = (),
    watch: Callable[[str], AbstractContextManager[object]] | None = None,
) -> ProjectResult:
    """One ``dicom-assets sync`` pass in ``directory`` (fresh state DB and Dagster home);
    ``wrap``: a command the sync runs under (a profiler); ``watch(database_url)``: a context
    entered just before the sync starts and left after it ended, before its state DB is dropped
    (the WAN section samples the request log with it)."""
    directory.mkdir(parents=True, exist_ok=True)
    dagster_home = directory / "dagster_home"
    dagster_home.mkdir(exist_ok=True)
    (dagster_home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    summary_file = directory / "sync-summary.json"
    with scratch_database(pg_server_url) as database_url:
        config = write_config(directory, site, variant, database_url, patient_id_regex)
        env = environment(TCP_NODELAY=None, DAGSTER_HOME=str(dagster_home), DICOM_ASSETS_CONFIG=None)
        with watch(database_url) if watch is not None else nullcontext():
            usage = run_child(
                [*wrap, dicom_assets_command(), "sync", "--config", str(config), "--no-progress", "--json-summary", str(summary_file)],
                directory / "sync.log", env, cwd=directory, timeout_s=SYNC_TIMEOUT_S,
            )  # fmt: skip
    if not summary_file.is_file():
        raise RuntimeError(f"{variant.label}: sync exited with {usage.returncode} and wrote no summary\n{usage.log_tail()}")
    summary = json.loads(summary_file.read_text())
    files, size, newest = instance_files(directory / "downloads")
    retrieval_s = float(summary.get("retrieval_seconds") or 0.0)
    cpu = rss = None
    if newest is not None and retrieval_s > 0:
        cpu = cpu_between(usage.samples, newest - retrieval_s, newest)
        rss = peak_rss_between(usage.samples, newest - retrieval_s, newest)
    return ProjectResult(
        variant=variant,
        usage=usage,
        summary=summary,
        files=files,
        bytes_on_disk=size,
        retrieval_s=retrieval_s,
        bytes_received=int(summary.get("bytes_received") or 0),
        instances_received=int(summary.get("instances_received") or 0),
        retrieval_cpu_s=cpu,
        retrieval_peak_rss_mb=rss,
    )
