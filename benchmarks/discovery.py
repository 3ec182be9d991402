"""Discovery: PACS requests and seconds of a first (full) pass, and of a second pass over the
unchanged PACS (issue 5).

:func:`benchmark_discovery` serves a cohort of tiny images (cached under the work directory,
see :mod:`benchmarks.cohorts`) with the bundled PACS on loopback and runs discovery the way a
sync does: the discovery pass (the patient query and the date windows), then the studies and
series steps over every patient, in runs of 200 patients (``PATIENTS_PER_RUN`` of the
retrieval schedule). Requests are counted by the PACS itself: associations plus C-FINDs.
It returns, and ``python -m benchmarks.discovery`` prints as JSON::

    {"first_requests", "first_seconds", "second_requests", "second_seconds", "studies", "patients"}
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.cohorts import cached_cohort
from benchmarks.measure import section_main
from dicom_assets.config import DiscoverySettings, settings_from_dict
from dicom_assets.devpacs import CohortSpec, DevPacs
from dicom_assets.discovery import discover_pass, discover_series, discover_studies
from dicom_assets.pacs.client import PacsClient
from dicom_assets.store import StateStore

PATIENTS_PER_RUN = 200  # dicom_assets.defs.patient_runs.PATIENTS_PER_RUN


def discovery_spec(patients: int, studies_per_patient: int = 2, series_per_study: int = 2) -> CohortSpec:
    """``patients`` x 2 studies x 2 series x 1 slice of 16x16: discovery never reads pixels."""
    return CohortSpec(
        patients=patients, studies_per_patient=studies_per_patient, series_per_study=series_per_study,
        slices_per_series=1, rows=16, columns=16, patient_id_prefix="DISC", seed=9,
    )  # fmt: skip


def _one_pass(client: PacsClient, store: StateStore, pacs: DevPacs) -> tuple[int, float, dict[str, int], int]:
    """A sync's discovery: the pass, then studies and series per run of patients; returns the
    requests the PACS served, the seconds taken, the requests by kind and the date windows."""
    before = pacs.requests_by_kind()
    started = time.monotonic()
    keys, stats = discover_pass(client, store, lambda identifier: True, DiscoverySettings())
    ids = list(store.patient_ids_for_keys(keys).values())
    for i in range(0, len(ids), PATIENTS_PER_RUN):
        run = ids[i : i + PATIENTS_PER_RUN]
        discover_studies(client, store, run)
        discover_series(client, store, run)
    seconds = time.monotonic() - started
    after = pacs.requests_by_kind()
    by_kind = {kind: after[kind] - before.get(kind, 0) for kind in after if after[kind] != before.get(kind, 0)}
    return sum(by_kind.values()), seconds, by_kind, stats.windows


def benchmark_discovery(work_dir: Path, patients: int = 2000, database_url: str | None = None) -> dict[str, Any]:
    """Measure both passes against a fresh state DB (SQLite under ``work_dir`` unless an empty
    database's ``database_url`` is given); see the module doc for the returned keys."""
    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    cohort = cached_cohort(work_dir, discovery_spec(patients))
    if database_url is None:
        state = work_dir / "discovery-state.sqlite"
        for stale in work_dir.glob("discovery-state.sqlite*"):
            stale.unlink()
        database_url = f"sqlite:///{state}"
    store = StateStore(database_url)
    store.create_schema()
    try:
        with DevPacs(cohort.dicom_dir, rescan_interval_s=3600) as pacs:  # the cohort does not change meanwhile
            settings = settings_from_dict({
                "pacs": {"host": "127.0.0.1", "port": pacs.port, "called_ae_title": pacs.ae_title, "timeout_s": 60},
                "paths": {"download_dir": str(work_dir / "unused"), "archive_dir": str(work_dir / "unused"),
                          "report_dir": str(work_dir / "unused")},
            })  # fmt: skip
            client = PacsClient(settings.pacs)
            first_requests, first_seconds, first_kinds, first_windows = _one_pass(client, store, pacs)
            second_requests, second_seconds, second_kinds, _ = _one_pass(client, store, pacs)
    finally:
        store.dispose()
    studies = len({s.study_instance_uid for s in cohort.series})
    print(f"discovery: first pass {first_kinds}, second pass {second_kinds}", file=sys.stderr)
    return {
        "first_requests": first_requests,
        "first_seconds": round(first_seconds, 3),
        "second_requests": second_requests,
        "second_seconds": round(second_seconds, 3),
        "studies": studies,
        "patients": len(cohort.patient_ids),
        "date_windows": first_windows,
        "first_cfinds": sum(n for kind, n in first_kinds.items() if "FIND" in kind.upper()),
        "first_kinds": first_kinds,
        "second_kinds": second_kinds,
    }


def main(argv: list[str] | None = None) -> int:
    return section_main(argv, (__doc__ or "").splitlines()[0], 2000, "bench-discovery-", benchmark_discovery)


if __name__ == "__main__":
    sys.exit(main())
