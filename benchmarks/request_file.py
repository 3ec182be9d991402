"""Request file: the PACS requests and seconds a 1,000-row request file costs (issue 11).

:func:`benchmark_request_file` serves the bulk request cohort (``patients + 10`` patients x 1 CT
study x 1 series x 1 slice, PatientIDs with leading zeros; cached under the work directory, see
:func:`cached_request_cohort`) with the bundled PACS on loopback, and runs discovery the way a
sync does in request mode: :func:`~dicom_assets.request_resolution.discover_requested` (one
STUDY-level C-FIND per new or changed row, plus the date window on an incremental pass), then
per run of 200 patients the series step (one SERIES-level C-FIND per new study, then the series
selection with the request file's hook). Requests are counted by the PACS itself. Four passes
over one fresh state DB:

* ``first``: the ``patients``-row file (one PatientID row per patient), a full pass;
* ``second``: the same file again, unchanged (an incremental pass);
* ``added``: the file with 10 rows added, naming patients of the cohort not in the first file;
* ``full``: that file once more as a forced full pass (``--full-discovery``, weekly by default),
  which asks about every row again.

It returns, and ``python -m benchmarks.request_file`` prints as JSON::

    {"rows", "patients", "studies", "series", "first_requests", "first_seconds", "first_cfinds",
     "second_requests", ..., "added_requests", ..., "full_requests", ..., "passes": [...]}

where ``passes`` holds one dict per pass (see :meth:`PassFigures.as_dict`).
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

from benchmarks.measure import section_main
from dicom_assets.config import Settings, settings_from_dict
from dicom_assets.devpacs import DevPacs
from dicom_assets.devpacs.request_cohort import bulk_request_cohort, request_file_csv
from dicom_assets.discovery import discover_series
from dicom_assets.pacs.client import PacsClient
from dicom_assets.request_file import read_request_file
from dicom_assets.request_resolution import discover_requested, request_series_skip
from dicom_assets.series_filter import SeriesFilter
from dicom_assets.series_selection import apply_series_selection
from dicom_assets.store import StateStore

PATIENTS_PER_RUN = 200  # dicom_assets.defs.patient_runs.PATIENTS_PER_RUN
ADDED_ROWS = 10
#: Bump when the cohort's generator changes in a way that makes a cached copy wrong.
CACHE_VERSION = 1
SUMMARY_FILE = "summary.json"
NO_RULE = "the selection (every patient)"  # what dicom_assets.config.selection_rule_name says without a rule


@dataclass(frozen=True)
class RequestCohort:
    """The bulk request cohort on disk: one CT study of one series per patient, in plan order."""

    dicom_dir: Path
    patient_ids: tuple[str, ...]
    instances: int
    generated_now: bool


def cached_request_cohort(work_dir: Path, patients: int) -> RequestCohort:
    """:func:`bulk_request_cohort` of ``patients`` patients under ``work_dir``, reused when complete.

    ``summary.json`` is written last, so an interrupted generation is redone, never half used.
    The plan is deterministic (same UIDs on every machine), so a cached copy is the same data.
    """
    directory = Path(work_dir) / f"request-cohort-{patients}-v{CACHE_VERSION}"
    summary = directory / SUMMARY_FILE
    if summary.is_file():
        data = json.loads(summary.read_text())
        return RequestCohort(directory / "dicom", tuple(data["patient_ids"]), data["instances"], generated_now=False)
    if directory.exists():
        shutil.rmtree(directory)
    written = bulk_request_cohort(directory / "dicom", patients)
    summary.write_text(json.dumps({"patient_ids": list(written.patients), "instances": written.instances}))
    return RequestCohort(directory / "dicom", written.patients, written.instances, generated_now=True)


def write_request_csv(path: Path, patient_ids: Sequence[str]) -> Path:
    """One PatientID row per patient with a free ``Subject`` column, as
    :func:`~dicom_assets.devpacs.request_cohort.bulk_request_csv` writes it. Subjects follow the
    patients' order, so a longer list keeps the earlier rows identical (only its tail is new)."""
    rows = ({"PatientID": pid, "Subject": f"B{i:05d}"} for i, pid in enumerate(patient_ids, start=1))
    path.write_text(request_file_csv(("PatientID", "Subject"), rows), encoding="utf-8")
    return path


@dataclass
class PassFigures:
    """One discovery pass in request mode: what it asked the PACS and how long it took."""

    name: str
    full_pass: bool
    rows: int
    rows_asked: int  # rows resolved by a STUDY-level C-FIND in this pass
    patients: int  # patients the file's found rows name
    studies_asked: int  # studies asked for their series (SERIES-level C-FINDs)
    associations: int
    cfinds: int
    requests: int  # associations + C-FINDs (+ anything else the PACS served)
    resolve_seconds: float
    series_seconds: float
    kinds: dict[str, int]

    @property
    def seconds(self) -> float:
        return self.resolve_seconds + self.series_seconds

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "seconds": round(self.seconds, 3),
                "resolve_seconds": round(self.resolve_seconds, 3), "series_seconds": round(self.series_seconds, 3)}  # fmt: skip


def _kinds_since(pacs: DevPacs, before: dict[str, int]) -> dict[str, int]:
    """Requests the PACS served since ``before``, by kind (only the kinds that moved)."""
    after = pacs.requests_by_kind()
    return {kind: n - before.get(kind, 0) for kind, n in after.items() if n != before.get(kind, 0)}


def _series_step(client: PacsClient, store: StateStore, settings: Settings, patient_ids: Sequence[str]) -> int:
    """The ``series`` asset over every patient, in runs of 200; returns the studies asked about."""
    asked = 0
    series_filter = SeriesFilter(settings.selection.series)
    for i in range(0, len(patient_ids), PATIENTS_PER_RUN):
        run = patient_ids[i : i + PATIENTS_PER_RUN]
        asked += discover_series(client, store, run).studies_queried
        apply_series_selection(store, client, run, series_filter, request_skip=request_series_skip(store, run))
    return asked


def one_pass(name: str, client: PacsClient, store: StateStore, settings: Settings, pacs: DevPacs, request_csv: Path,
             force_full: bool = False) -> PassFigures:  # fmt: skip
    """What a sync's discovery does in request mode (the ``studies`` step asks nothing there)."""
    before = pacs.requests_by_kind()
    started = time.monotonic()
    request = read_request_file(request_csv)
    keys, stats = discover_requested(client, store, request, lambda identifier: True, NO_RULE, settings.discovery, force_full)
    resolved = time.monotonic()
    patient_ids = sorted(store.patient_ids_for_keys(keys).values())
    studies_asked = _series_step(client, store, settings, patient_ids)
    finished = time.monotonic()
    kinds = _kinds_since(pacs, before)
    return PassFigures(
        name=name, full_pass=stats.full_pass, rows=stats.rows, rows_asked=stats.rows_resolved, patients=len(patient_ids),
        studies_asked=studies_asked, associations=kinds.get("ASSOCIATION", 0),
        cfinds=sum(n for kind, n in kinds.items() if "FIND" in kind.upper()), requests=sum(kinds.values()),
        resolve_seconds=resolved - started, series_seconds=finished - resolved, kinds=kinds,
    )  # fmt: skip


def _fresh_sqlite(work_dir: Path) -> str:
    for stale in work_dir.glob("request-file-state.sqlite*"):
        stale.unlink()
    return f"sqlite:///{work_dir / 'request-file-state.sqlite'}"


def _settings(pacs: DevPacs, work_dir: Path) -> Settings:
    unused = str(work_dir / "unused")
    return settings_from_dict({
        "pacs": {"host": "127.0.0.1", "port": pacs.port, "called_ae_title": pacs.ae_title, "timeout_s": 60},
        "paths": {"download_dir": unused, "archive_dir": unused, "report_dir": unused},
    })  # fmt: skip


def _check(store: StateStore, passes: list[PassFigures], patients: int) -> None:
    """Refuse figures of a pipeline that did not work: every row found, every series wanted."""
    expected = {"first": patients, "second": patients, "added": patients + ADDED_ROWS, "full": patients + ADDED_ROWS}
    for p in passes:
        if p.patients != expected[p.name]:
            raise RuntimeError(f"request-file pass {p.name!r}: {p.patients} patients found, expected {expected[p.name]}")
    counts = store.status_counts()
    if counts.get("skipped") or sum(counts.values()) != patients + ADDED_ROWS:
        raise RuntimeError(f"request-file benchmark: series by status {counts}, expected {patients + ADDED_ROWS} wanted series")


def _run_passes(work_dir: Path, cohort: RequestCohort, store: StateStore, patients: int) -> list[PassFigures]:
    first_file = write_request_csv(work_dir / "request-first.csv", cohort.patient_ids[:patients])
    added_file = write_request_csv(work_dir / "request-added.csv", cohort.patient_ids[: patients + ADDED_ROWS])
    with DevPacs(cohort.dicom_dir, rescan_interval_s=3600) as pacs:  # the cohort does not change meanwhile
        settings = _settings(pacs, work_dir)
        client = PacsClient(settings.pacs)
        return [
            one_pass("first", client, store, settings, pacs, first_file),
            one_pass("second", client, store, settings, pacs, first_file),
            one_pass("added", client, store, settings, pacs, added_file),
            one_pass("full", client, store, settings, pacs, added_file, force_full=True),
        ]


def benchmark_request_file(work_dir: Path, patients: int = 1000, database_url: str | None = None) -> dict[str, Any]:
    """Measure the four passes against a fresh state DB (SQLite under ``work_dir`` unless an
    empty database's ``database_url`` is given); see the module doc for the returned keys."""
    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    cohort = cached_request_cohort(work_dir, patients + ADDED_ROWS)
    store = StateStore(database_url or _fresh_sqlite(work_dir))
    store.create_schema()
    try:
        passes = _run_passes(work_dir, cohort, store, patients)
        _check(store, passes, patients)
    finally:
        store.dispose()
    for p in passes:
        print(f"request file, {p.name} pass: {p.rows} rows, {p.rows_asked} asked, {p.kinds}, {p.seconds:.2f} s", file=sys.stderr)
    figures: dict[str, Any] = {"rows": patients, "added_rows": ADDED_ROWS, "patients": patients, "studies": patients,
                               "series": patients, "cohort_patients": len(cohort.patient_ids)}  # fmt: skip
    for p in passes:
        figures.update({f"{p.name}_requests": p.requests, f"{p.name}_cfinds": p.cfinds, f"{p.name}_seconds": round(p.seconds, 3)})
    figures["passes"] = [p.as_dict() for p in passes]
    return figures


def main(argv: list[str] | None = None) -> int:
    return section_main(argv, (__doc__ or "").splitlines()[0], 1000, "bench-request-file-", benchmark_request_file)


if __name__ == "__main__":
    sys.exit(main())
