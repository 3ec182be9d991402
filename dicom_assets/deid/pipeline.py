"""A patient's de-identified zip: ``<pseudonym><delimiter><N>.zip`` in ``paths.deidentified_dir``.

Made from the files of the patient's identifiable archive (the same complete, held series, read
from the download directory) after that archive was built and verified, so a de-identified zip
never holds what the identifiable one does not. Each instance goes through the confidentiality
profile (:class:`~dicom_assets.deid.deidentify.Deidentifier`) into a private work directory,
then the zip is written, verified (CRC and member count) and renamed into place exactly like the
identifiable archive (:func:`dicom_assets.archive.write_verified_zip`). Members are
``<pseudonym>/<new StudyInstanceUID>/<new SeriesInstanceUID>/<new SOPInstanceUID>.dcm``.

Series that may carry burned-in identifiers (BurnedInAnnotation YES; the configured modalities
and SOP classes: ultrasound, secondary captures, screen saves ...) are left out unless the site
opts in, with the reason stored on the series (the inventory shows it); ``<N>`` counts the
series the zip holds. A patient with nothing left to share gets a record and no zip.

The zip is rebuilt when the patient's identifiable archive is (a new series), with the same
pseudonym and date shift: both come from the secret and the crosswalk in the state DB.
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from pydicom import dcmread

from dicom_assets import layout, stopping
from dicom_assets.archive import ArchiveMember, archive_path, write_verified_zip
from dicom_assets.config import Settings
from dicom_assets.deid.deidentify import Deidentifier, burned_in_reason
from dicom_assets.deid.keys import DeidKeys
from dicom_assets.deid.options import ClinicalTrial, DeidOptions
from dicom_assets.store import StateStore
from dicom_assets.store.deid import DeidentifiedArchive, Pseudonym
from dicom_assets.store.records import SeriesState


class DeidNotReady(RuntimeError):
    """The patient has no identifiable archive yet: the de-identified copy is made after it."""


class DeidSecretMissing(RuntimeError):
    """deidentify.secret resolved to nothing usable (the message never holds the value)."""


@dataclass(frozen=True)
class DeidResult:
    """What one patient's de-identification did, for the asset's metadata."""

    patient_id: str
    pseudonym: str
    file_name: str | None  # None: nothing left to share (every series excluded)
    series_count: int
    excluded_series: int
    instance_count: int
    bytes_in: int
    bytes: int
    seconds: float
    up_to_date: bool
    excluded: dict[str, str]  # SeriesInstanceUID -> why it is not shared

    @property
    def instances_per_s(self) -> float:
        return self.instance_count / self.seconds if self.seconds > 0 and not self.up_to_date else 0.0


def deid_options(settings: Settings) -> DeidOptions:
    """The profile options of the ``deidentify:`` section."""
    d = settings.deidentify
    assert d is not None
    trial = None
    if d.trial is not None and any(vars(d.trial).values()):
        trial = ClinicalTrial(**d.trial.model_dump())
    extra = {"burned_in_modalities": tuple(d.burned_in_modalities)} if d.burned_in_modalities is not None else {}
    return DeidOptions(
        retain_longitudinal_modified_dates=d.retain_longitudinal_modified_dates,
        clean_descriptors=d.clean_descriptors,
        retain_patient_characteristics=d.retain_patient_characteristics,
        retain_device_identity=d.retain_device_identity,
        retain_safe_private=d.retain_safe_private,
        keep_burned_in=d.keep_burned_in,
        trial=trial,
        **extra,
    )


def deid_keys(settings: Settings) -> DeidKeys:
    """The HMAC keys from ``deidentify.secret`` (an environment reference, checked at load)."""
    d = settings.deidentify
    assert d is not None
    secret = d.secret.get_secret_value().encode("utf-8")
    if not secret.strip():
        raise DeidSecretMissing("deidentify.secret is empty: export the variable it references with a long random value")
    return DeidKeys(secret, d.pseudonym_prefix, d.pseudonym_digits, d.max_shift_days)


def _first_instance(directory: Path) -> Path | None:
    on_disk = layout.instances_on_disk(directory)
    return layout.instance_file(directory, min(on_disk)) if on_disk else None


def exclusions(download_dir: Path, patient_id: str, series: Sequence[SeriesState], options: DeidOptions) -> dict[str, str]:
    """SeriesInstanceUID -> why it is left out, judged on the series' first instance header."""
    out: dict[str, str] = {}
    for s in series:
        first = _first_instance(layout.series_dir(download_dir, patient_id, s.study_instance_uid, s.series_instance_uid))
        if first is None:
            continue
        reason = burned_in_reason(dcmread(first, stop_before_pixels=True), options)
        if reason:
            out[s.series_instance_uid] = reason
    return out


def _deidentify_series(
    deidentifier: Deidentifier, download_dir: Path, work: Path, pid: str, pseudo: Pseudonym, series: Sequence[SeriesState]
) -> tuple[list[ArchiveMember], int]:
    """Every instance of these series through the profile into ``work``; the zip's members and
    the bytes read."""
    members: list[ArchiveMember] = []
    bytes_in = 0
    for s in series:
        directory = layout.series_dir(download_dir, pid, s.study_instance_uid, s.series_instance_uid)
        for sop, size in sorted(layout.instances_on_disk(directory).items()):
            stopping.PROCESS.check()
            dst = work / f"{len(members):08d}.dcm"
            made = deidentifier.deidentify_file(layout.instance_file(directory, sop), dst, pseudo.pseudonym, pseudo.date_shift_days)
            members.append(ArchiveMember(
                f"{pseudo.pseudonym}/{made.study_instance_uid}/{made.series_instance_uid}/{made.sop_instance_uid}.dcm",
                dst, made.bytes,
            ))  # fmt: skip
            bytes_in += size
    return members, bytes_in


def remove_superseded_deidentified(store: StateStore, out_dir: Path, patient_id: str, current: str | None) -> None:
    """Delete the patient's superseded de-identified zips (by record) and mark them removed."""
    for record in store.superseded_deidentified_archives(patient_id):
        if record.file_name and record.file_name != current:
            archive_path(out_dir, record.file_name).unlink(missing_ok=True)
        if record.archive_id is not None:
            store.mark_deidentified_removed(record.archive_id)


def build_deidentified_archive(store: StateStore, settings: Settings, patient_id: str, deidentifier: Deidentifier | None = None) -> DeidResult:
    """Make (or confirm up to date) the patient's de-identified zip; see the module doc."""
    started = time.monotonic()
    assert settings.deidentify is not None and settings.paths.deidentified_dir is not None
    out_dir = settings.paths.deidentified_dir
    keys = deid_keys(settings)
    options = deid_options(settings)
    deidentifier = deidentifier or Deidentifier(options, keys)
    source = store.latest_archive(patient_id)
    if source is None or source.archive_id is None:
        raise DeidNotReady(f"patient {patient_id!r} has no verified archive yet; the de-identified copy is made from it")
    pseudo = store.pseudonym_for(patient_id, lambda attempt: keys.pseudonym(patient_id, attempt), keys.date_shift_days(patient_id))
    latest = store.latest_deidentified_archive(patient_id)
    if latest is not None and latest.source_archive_id == source.archive_id and _still_there(out_dir, latest):
        return DeidResult(patient_id, pseudo.pseudonym, latest.file_name or None, latest.series_count, latest.excluded_series,
                          latest.instance_count, 0, latest.bytes, time.monotonic() - started, True, {})  # fmt: skip
    held = [s for s in store.series_of(patient_id) if s.download_status == "complete"]
    download_dir = settings.paths.download_dir
    excluded = exclusions(download_dir, patient_id, held, options)
    shared = [s for s in held if s.series_instance_uid not in excluded]
    store.set_deid_exclusions({s.series_instance_uid: excluded.get(s.series_instance_uid) for s in held})
    out_dir.mkdir(parents=True, exist_ok=True)
    name = layout.archive_name(pseudo.pseudonym, settings.archive.delimiter, len(shared)) if shared else None
    size = instances = bytes_in = 0
    sha256 = ""
    if shared:
        work = out_dir / f".work-{layout.temp_token()}"
        work.mkdir()
        try:
            members, bytes_in = _deidentify_series(deidentifier, download_dir, work, patient_id, pseudo, shared)
            size, sha256 = write_verified_zip(archive_path(out_dir, name), members, settings.archive.compression_level)
            instances = len(members)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    store.record_deidentified_archive(DeidentifiedArchive(
        patient_id=patient_id, source_archive_id=source.archive_id, file_name=name or "", series_count=len(shared),
        excluded_series=len(excluded), instance_count=instances, bytes=size, sha256=sha256,
    ))  # fmt: skip
    remove_superseded_deidentified(store, out_dir, patient_id, name)
    return DeidResult(patient_id, pseudo.pseudonym, name, len(shared), len(excluded), instances, bytes_in, size,
                      time.monotonic() - started, False, excluded)  # fmt: skip


def _still_there(out_dir: Path, record: DeidentifiedArchive) -> bool:
    if not record.file_name:
        return True  # nothing was shared, nothing to find
    path = out_dir / record.file_name
    return path.is_file() and os.stat(path).st_size == record.bytes
