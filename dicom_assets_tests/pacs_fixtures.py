"""Helpers shared by the PACS-facing tests: a small cohort served by the bundled PACS on loopback."""

from __future__ import annotations

from pathlib import Path
import struct
from typing import Any

import yaml

from dicom_assets.config import Settings, settings_from_dict
from dicom_assets.devpacs import CohortSpec, CohortSummary, generate_cohort
from dicom_assets.pacs import upper_layer as ul

CT = "1.2.840.10008.5.1.4.1.1.2"

HOSTILE_PATIENT_IDS = ("PAT-001", "PAT 002/..", "PAT*3 José")


def small_cohort(directory: Path, patient_ids: tuple[str, ...] = HOSTILE_PATIENT_IDS, series: int = 2, slices: int = 4) -> CohortSummary:
    spec = CohortSpec(
        patients=len(patient_ids), studies_per_patient=1, series_per_study=series, slices_per_series=slices,
        rows=32, columns=32, patient_ids=patient_ids, seed=3,
    )
    return generate_cohort(directory, spec)


def offline_config(path: Path, database_url: str | None = None, report_dir: str = "reports", **sections: Any) -> Path:
    """Write a config whose PACS nobody answers (127.0.0.1:1), for tests of the Dagster layer and
    the CLI that never talk to it; ``sections`` are added as they are (``schedules``, ``heartbeats``)."""
    raw: dict[str, Any] = {
        "pacs": {"host": "127.0.0.1", "port": 1, "called_ae_title": "PACS"},
        "paths": {"download_dir": "dl", "archive_dir": "zips", "report_dir": report_dir},
        **sections,
    }
    if database_url is not None:
        raw["database"] = {"url": database_url}
    path.write_text(yaml.safe_dump(raw))
    return path


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


def send_c_store(assoc: Any, sop_uid: str, body: bytes, fragment: int, stop_after: int | None = None) -> None:
    """A C-STORE-RQ whose dataset goes out in PDUs of ``fragment`` bytes (optionally cut short)."""
    inner = assoc._assoc
    context_id = next(iter(inner.contexts))
    command = ul.encode_command({
        0x00000002: CT, 0x00000100: 0x0001, 0x00000110: 7, 0x00000700: 0, 0x00000800: 0x0000, 0x00001000: sop_uid,
    })  # fmt: skip
    inner.send_command(context_id, command)
    end = len(body) if stop_after is None else stop_after
    for start in range(0, end, fragment):
        piece = body[start : min(start + fragment, end)]
        last = 0x02 if min(start + fragment, end) >= len(body) else 0x00
        inner.sock.sendall(struct.pack(">BxL", 0x04, len(piece) + 6) + struct.pack(">LBB", len(piece) + 2, context_id, last) + piece)
