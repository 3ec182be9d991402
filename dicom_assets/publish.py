"""Publishing: copy each patient's verified zip to a second site's storage (a mounted directory).

The old scripts rsynced every zip to another site for sharing. Here each zip is copied once to
a hidden temp name at the destination, its SHA-256 there is compared with the one recorded when
the zip was verified, and only then is it renamed into place; superseded copies of that patient
at the destination are removed after that. A failed copy leaves the source untouched and the
archive unpublished, so the next run tries again.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import time
from dataclasses import dataclass
from pathlib import Path

from dicom_assets import layout
from dicom_assets.store import StateStore

_CHUNK = 4 << 20


class PublishError(RuntimeError):
    """The copy at the destination could not be written or does not match the archive."""


@dataclass(frozen=True)
class PublishResult:
    patient_id: str
    file_name: str
    destination: Path
    bytes: int
    seconds: float
    copied: bool  # False: already published there
    removed_superseded: tuple[str, ...]


def _copy_and_hash(source: Path, target: Path) -> str:
    digest = hashlib.sha256()
    with open(source, "rb") as src, open(target, "xb") as dst:
        while chunk := src.read(_CHUNK):
            dst.write(chunk)
            digest.update(chunk)
        dst.flush()
        os.fsync(dst.fileno())
    return digest.hexdigest()


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _remove_superseded(destination: Path, patient_id: str, delimiter: str, current: str) -> tuple[str, ...]:
    pattern = layout.archive_pattern(patient_id, delimiter)
    removed = []
    for entry in destination.iterdir():
        if entry.name != current and pattern.match(entry.name) and entry.is_file():
            entry.unlink()
            removed.append(entry.name)
    return tuple(sorted(removed))


def publish_patient_archive(
    store: StateStore, archive_dir: Path, destination: Path, patient_id: str, delimiter: str = "__seriesCount"
) -> PublishResult | None:
    """Publish the patient's latest archive to ``destination``; None when it has no archive yet."""
    started = time.monotonic()
    record = store.latest_archive(patient_id)
    if record is None or record.archive_id is None:
        return None
    source = layout.ensure_inside(Path(archive_dir), Path(archive_dir) / record.file_name)
    destination = Path(destination)
    final = layout.ensure_inside(destination, destination / record.file_name)
    if record.published_to == str(destination) and final.is_file() and final.stat().st_size == record.bytes:
        removed = _remove_superseded(destination, patient_id, delimiter, record.file_name)
        return PublishResult(patient_id, record.file_name, destination, record.bytes, time.monotonic() - started, False, removed)
    if not destination.is_dir():
        raise PublishError(f"publish.directory {destination} does not exist or is not a directory (is it mounted?)")
    temp = destination / f".{record.file_name}.{secrets.token_hex(6)}.part"
    try:
        if _copy_and_hash(source, temp) != record.sha256 or _sha256(temp) != record.sha256:
            raise PublishError(f"{record.file_name}: the copy at {destination} does not match the verified archive")
        os.replace(temp, final)
    except OSError as exc:
        temp.unlink(missing_ok=True)
        raise PublishError(f"cannot publish {record.file_name} to {destination}: {exc.strerror or exc}") from exc
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    store.mark_archive_published(record.archive_id, str(destination))
    removed = _remove_superseded(destination, patient_id, delimiter, record.file_name)
    return PublishResult(patient_id, record.file_name, destination, record.bytes, time.monotonic() - started, True, removed)
