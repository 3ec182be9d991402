"""Helpers shared by the PACS-facing tests: a small cohort served by the bundled PACS on loopback."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dicom_assets.config import Settings, settings_from_dict
from dicom_assets.devpacs import CohortSpec, CohortSummary, generate_cohort

HOSTILE_PATIENT_IDS = ("PAT-001", "PAT 002/..", "PAT*3 José")


def small_cohort(directory: Path, patient_ids: tuple[str, ...] = HOSTILE_PATIENT_IDS, series: int = 2, slices: int = 4) -> CohortSummary:
    spec = CohortSpec(
        patients=len(patient_ids), studies_per_patient=1, series_per_study=series, slices_per_series=slices,
        rows=32, columns=32, patient_ids=patient_ids, seed=3,
    )
    return generate_cohort(directory, spec)


def make_settings(tmp_path: Path, pacs_port: int, receiver_port: int, db_url: str, **pacs: Any) -> Settings:
    raw = {
        "pacs": {"host": "127.0.0.1", "port": pacs_port, "called_ae_title": "DEVPACS", "calling_ae_title": "DICOM_ASSETS",
                 "timeout_s": 10, "straggler_timeout_s": 1, **pacs},
        "receiver": {"ae_title": "DICOM_ASSETS", "bind_address": "127.0.0.1", "port": receiver_port},
        "paths": {"download_dir": str(tmp_path / "downloads"), "archive_dir": str(tmp_path / "archives"),
                  "report_dir": str(tmp_path / "reports")},
        "database": {"url": db_url},
    }
    return settings_from_dict(raw)
