"""One zip per patient: ``<patient key><delimiter><series count>.zip`` in the archive directory.

A patient's archive is built only when every series it holds is ``complete``: series ``skipped``
by the series filters (dicom_assets.series_filter) are not in the zip and not in its series
count ``<N>``, and a patient whose series are all skipped gets no zip. Members are
``<patient key>/<StudyInstanceUID>/<SeriesInstanceUID>/<SOPInstanceUID>.dcm``, read from the
download directory. The zip is written file by file to a hidden temp name, verified (every
member inflated back from its local header and its size and CRC-32 compared with the central
directory; members == the instances on disk), hashed, fsynced
and only then renamed over the final name, so a reader never sees a partial archive and a
failed build leaves the previous archive in place. Superseded archives of the patient are then
deleted unless asked to keep them.
"""

from __future__ import annotations

import hashlib
import os
import re
import struct
import time
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from concurrent.futures import ThreadPoolExecutor
from typing import Any, BinaryIO, Callable, Iterator, Sequence

from dicom_assets import layout, stopping
from dicom_assets.store.records import ArchiveRecord, SeriesState
from dicom_assets.store.state import StateStore
from dicom_assets.zipwriter import write_zip

_READ_CHUNK = 4 << 20

try:
    from isal import isal_zlib as _zlib
except ImportError:  # pragma: no cover - the project depends on isal
    _zlib = zlib  # type: ignore[misc]
_THREADS = max(1, min(4, os.cpu_count() or 1))
_MAX_LISTED = 10
_MAX_NAME_BYTES = 255


class ArchiveNotReady(RuntimeError):
    """The patient cannot be archived yet (no series, a series not complete, files missing)."""


class ArchiveVerificationError(RuntimeError):
    """The freshly written zip failed verification; it was deleted and the previous one kept."""


class ArchiveWriteError(RuntimeError):
    """The new zip could not be written (disk full, quota, read-only, I/O error); its temp file
    was deleted and the previous archive kept. ``errno``/``strerror`` are the OS error's."""

    def __init__(self, message: str, errno: int | None = None, strerror: str | None = None) -> None:
        super().__init__(message)
        self.errno = errno
        self.strerror = strerror


class _NewFile:
    """A new file for ``write_zip``, written straight through (it writes whole members or chunks
    of MBs, so a buffer saves nothing, and a failed buffer flush at close would hide the path): a
    failed create, write or fsync raises ArchiveWriteError naming the file."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.fd = self._checked(os.open, path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)

    def _checked(self, call, *args):  # type: ignore[no-untyped-def]
        try:
            return call(*args)
        except OSError as exc:
            raise ArchiveWriteError(f"cannot write {self.path}: {exc.strerror or exc}", exc.errno, exc.strerror) from exc

    def write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[self._checked(os.write, self.fd, view) :]

    def fsync(self) -> None:
        self._checked(os.fsync, self.fd)

    def close(self) -> None:
        fd, self.fd = self.fd, -1
        if fd >= 0:
            os.close(fd)


@dataclass(frozen=True)
class ArchiveResult:
    patient_id: str
    file_name: str
    path: Path
    series_count: int
    instance_count: int
    bytes: int
    sha256: str
    seconds: float
    up_to_date: bool
    removed_superseded: tuple[str, ...]


@dataclass(frozen=True)
class ArchiveMember:
    """One file of a zip: its name in the zip, where it is, its size."""

    arcname: str
    path: Path
    size: int


def _uid_sort_key(uid: str) -> tuple[int, ...]:
    return tuple(int(part) for part in uid.split("."))


def _listed(items: Sequence[str]) -> str:
    shown = ", ".join(items[:_MAX_LISTED])
    return shown + (f", ... ({len(items) - _MAX_LISTED} more)" if len(items) > _MAX_LISTED else "")


def _scan_members(download_dir: Path, patient_id: str, series: Sequence[SeriesState]) -> list[ArchiveMember]:
    """Every instance file of the patient's series, in series order then SOP UID order."""
    key = layout.patient_key(patient_id)
    members: list[ArchiveMember] = []
    for s in series:
        directory = layout.series_dir(download_dir, patient_id, s.study_instance_uid, s.series_instance_uid)
        on_disk = layout.instances_on_disk(directory)
        for sop in sorted(on_disk, key=_uid_sort_key):
            members.append(
                ArchiveMember(
                    arcname=f"{key}/{s.study_instance_uid}/{s.series_instance_uid}/{sop}.dcm",
                    path=layout.instance_file(directory, sop),
                    size=on_disk[sop],
                )
            )
    return members


def _check_ready(patient_id: str, series: Sequence[SeriesState], members: Sequence[ArchiveMember]) -> None:
    if not series:
        raise ArchiveNotReady(f"patient {patient_id!r} has no series")
    not_complete = [f"{s.series_instance_uid} ({s.download_status})" for s in series if s.download_status != "complete"]
    if not_complete:
        raise ArchiveNotReady(
            f"patient {patient_id!r}: {len(not_complete)} of {len(series)} series not complete: {_listed(not_complete)}"
        )
    per_series: dict[str, int] = {}
    for m in members:
        series_uid = m.arcname.split("/")[2]
        per_series[series_uid] = per_series.get(series_uid, 0) + 1
    short = [
        f"{s.series_instance_uid} ({per_series.get(s.series_instance_uid, 0)} of {s.downloaded_instances} files)"
        for s in series
        if per_series.get(s.series_instance_uid, 0) < s.downloaded_instances
    ]
    if short:
        raise ArchiveNotReady(
            f"patient {patient_id!r}: {len(short)} complete series have fewer instance files on disk than "
            f"downloaded: {_listed(short)}"
        )


def _write_zip(path: Path, members: Sequence[ArchiveMember], compression_level: int) -> str:
    """Write the members into a new zip at ``path`` (parallel deflate), fsync it; returns its
    SHA-256. Raises ArchiveWriteError naming ``path`` when it cannot be written (disk full ...)."""
    out = _NewFile(path)
    try:
        sha256 = write_zip(out, _unless_stopped(members), compression_level, threads=_THREADS)  # type: ignore[arg-type]
        out.fsync()
    finally:
        out.close()
    return sha256


def _unless_stopped(members: Sequence[ArchiveMember]) -> Iterator[tuple[Path, str]]:
    """The members to write; a stop request (SIGTERM) ends the zip between two members (the
    caller removes the temp file, the previous zip stays)."""
    for member in members:
        stopping.PROCESS.check()
        yield member.path, member.arcname


def verify_archive(path: Path, expected: dict[str, int]) -> None:
    """Raise ArchiveVerificationError unless the zip holds exactly ``expected`` (arcname -> size)
    and every member reads back with a correct CRC."""
    try:
        with zipfile.ZipFile(path) as zf:
            infos = zf.infolist()
            names = [i.filename for i in infos]
            if len(names) != len(set(names)):
                raise ArchiveVerificationError(f"{path.name}: duplicate members")
            if set(names) != set(expected):
                missing = sorted(set(expected) - set(names))
                extra = sorted(set(names) - set(expected))
                raise ArchiveVerificationError(
                    f"{path.name}: {len(names)} members but {len(expected)} instance files on disk "
                    f"(missing: {_listed(missing)}; unexpected: {_listed(extra)})"
                )
            for info in infos:
                if info.file_size != expected[info.filename]:
                    raise ArchiveVerificationError(
                        f"{path.name}: {info.filename} is {info.file_size} bytes in the zip, "
                        f"{expected[info.filename]} on disk"
                    )
        # Read every member back: zipfile's directory says where each member starts, its size
        # and CRC; the data is inflated with ISA-L (3x zlib's speed; the read-back was half of
        # an archive's time), in parallel since inflate releases the GIL.
        with ThreadPoolExecutor(max_workers=_THREADS, thread_name_prefix="verify") as pool:
            for future in [pool.submit(_check_members, path, infos[i::_THREADS]) for i in range(_THREADS)]:
                future.result()
    except ArchiveVerificationError:
        raise
    except Exception as exc:  # noqa: BLE001 - BadZipFile, zlib.error, EOFError, OSError...
        raise ArchiveVerificationError(f"{path.name}: {type(exc).__name__}: {exc}") from exc


_LOCAL_HEADER = struct.Struct("<4s22xHH")  # signature, ..., file name length, extra length


def _check_members(path: Path, infos: Sequence[zipfile.ZipInfo]) -> None:
    """Inflate each member from its local header on and compare its size and CRC-32."""
    with open(path, "rb", buffering=0) as f:
        for info in infos:
            f.seek(info.header_offset)
            signature, name_length, extra_length = _LOCAL_HEADER.unpack(f.read(_LOCAL_HEADER.size))
            if signature != b"PK\x03\x04" or f.read(name_length).decode("utf-8", "replace") != info.filename:
                raise ArchiveVerificationError(f"{path.name}: bad local header for {info.filename}")
            f.seek(extra_length, os.SEEK_CUR)
            if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
                raise ArchiveVerificationError(f"{path.name}: {info.filename} uses compression {info.compress_type}")
            inflater = _zlib.decompressobj(-15) if info.compress_type == zipfile.ZIP_DEFLATED else None
            crc, size = 0, 0
            for data in _member_data(f, info, inflater, path.name):
                crc, size = _zlib.crc32(data, crc), size + len(data)
            if inflater is not None and not inflater.eof:
                raise ArchiveVerificationError(f"{path.name}: {info.filename}: deflate stream does not end")
            if size != info.file_size or crc != info.CRC:
                raise ArchiveVerificationError(f"{path.name}: {info.filename} reads back wrong (CRC or size)")


def _member_data(f: BinaryIO, info: zipfile.ZipInfo, inflater: Any, zip_name: str) -> Iterator[bytes]:
    """The member's bytes (inflated when ``inflater``) in pieces of at most ``_READ_CHUNK``,
    read from ``f`` positioned at its data. Output is capped per call too: deflate shrinks
    zeros ~1000:1, so one 4 MiB read could otherwise inflate to 4 GB in memory."""
    left = info.compress_size
    while left:
        chunk = f.read(min(left, _READ_CHUNK))
        if not chunk:
            raise ArchiveVerificationError(f"{zip_name}: {info.filename} is truncated")
        left -= len(chunk)
        if inflater is None:
            yield chunk
            continue
        while chunk:
            data = inflater.decompress(chunk, _READ_CHUNK)
            if not data and len(inflater.unconsumed_tail) == len(chunk):  # no progress: never loop
                raise ArchiveVerificationError(f"{zip_name}: {info.filename}: deflate stream does not end")
            yield data
            chunk = inflater.unconsumed_tail
    if inflater is not None:
        yield inflater.flush()


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def archive_path(archive_dir: Path, file_name: str) -> Path:
    """``archive_dir / file_name`` for a plain file name, checked to stay inside archive_dir."""
    if not file_name or file_name in (".", "..") or "/" in file_name or "\\" in file_name or "\x00" in file_name:
        raise layout.UnsafeNameError(f"{file_name!r} is not a plain archive file name")
    return layout.ensure_inside(archive_dir, archive_dir / file_name)


def _temp_name(name: str) -> str:
    """Hidden ``.<name>.<token>.part``; a digest of the name stands in when that is too long."""
    token = layout.temp_token()
    temp = f".{name}.{token}.part"
    if len(temp.encode("utf-8")) > _MAX_NAME_BYTES:
        temp = f".{hashlib.sha256(name.encode('utf-8')).hexdigest()[:32]}.zip.{token}.part"
    return temp


def remove_superseded(
    store: StateStore, archive_dir: Path, patient_id: str, delimiter: str, current_name: str, scan_strays: bool = True
) -> tuple[str, ...]:
    """Delete the patient's superseded zips and mark them removed; returns the deleted file names.

    Recorded superseded archives are removed by name (a superseded record with the current
    name only gets marked: its file was replaced by the current archive). With ``scan_strays``
    any other file matching exactly this patient's archive pattern (another series count, e.g.
    left by a crash before it was recorded) is deleted too; another patient's zip never matches.
    """
    removed: list[str] = []
    for record in store.superseded_archives(patient_id):
        if record.file_name != current_name:
            path = archive_path(archive_dir, record.file_name)
            try:
                path.unlink()
                removed.append(record.file_name)
            except FileNotFoundError:
                pass
        if record.archive_id is not None:
            store.mark_archive_removed(record.archive_id)
    if scan_strays:
        pattern: re.Pattern[str] = layout.archive_pattern(patient_id, delimiter)
        with os.scandir(archive_dir) as entries:
            strays = sorted(
                e.name
                for e in entries
                if e.name != current_name and pattern.match(e.name) and e.is_file(follow_symlinks=False)
            )
        for name in strays:
            try:
                archive_path(archive_dir, name).unlink()
                if name not in removed:
                    removed.append(name)
            except FileNotFoundError:
                pass
    return tuple(removed)


def write_verified_zip(
    final: Path, members: Sequence[ArchiveMember], compression_level: int, expected: Callable[[], dict[str, int]] | None = None
) -> tuple[int, str]:
    """Write ``members`` into a hidden temp zip beside ``final``, verify it (every member read
    back, CRC and size; exactly ``expected()``, default the members), rename it over ``final``
    and fsync the directory; returns its size and SHA-256. On any failure the temp file is
    removed and whatever ``final`` was stays (ArchiveWriteError, ArchiveVerificationError)."""
    directory = final.parent
    layout.remove_stale_temps(directory)  # zip-sized leftovers of killed archivers
    temp = archive_path(directory, _temp_name(final.name))
    try:
        sha256 = _write_zip(temp, members, compression_level)
        verify_archive(temp, expected() if expected else {m.arcname: m.size for m in members})
        size = temp.stat().st_size
        os.replace(temp, final)
    except BaseException as exc:
        temp.unlink(missing_ok=True)
        if isinstance(exc, ArchiveWriteError):  # say which archive, and that nothing was replaced
            raise ArchiveWriteError(
                f"cannot write the archive {final}: {exc.strerror or exc}; nothing was replaced "
                f"(the patient's previous archive, if any, is kept)", exc.errno, exc.strerror,
            ) from exc  # fmt: skip
        raise
    _fsync_dir(directory)
    return size, sha256


def build_patient_archive(
    store: StateStore,
    download_dir: Path,
    archive_dir: Path,
    patient_id: str,
    delimiter: str = "__seriesCount",
    keep_superseded: bool = False,
    compression_level: int = 6,
) -> ArchiveResult:
    """Build (or confirm up to date) the patient's archive; see the module docstring.

    Raises ArchiveNotReady when the patient holds no series (none, or all skipped), a held
    series is not complete, or a complete series has fewer instance files on disk than the DB
    says were downloaded.
    The archive is up to date (no rebuild) when the latest record has this name, this series
    count and this instance count (instance files now on disk), and the file exists with the
    recorded size. Raises ArchiveVerificationError when the new zip fails verification.
    """
    started = time.monotonic()
    download_dir = Path(download_dir)
    archive_dir = Path(archive_dir)
    known = store.series_of(patient_id)
    series = [s for s in known if s.download_status != "skipped"]  # held: what the zip and its N count
    if known and not series:
        raise ArchiveNotReady(f"patient {patient_id!r}: all {len(known)} of its series are skipped by the series filters")
    members = _scan_members(download_dir, patient_id, series) if series else []
    _check_ready(patient_id, series, members)

    series_count = len(series)
    name = layout.archive_name(patient_id, delimiter, series_count)
    archive_dir.mkdir(parents=True, exist_ok=True)
    final = archive_path(archive_dir, name)

    latest = store.latest_archive(patient_id)
    if (
        latest is not None
        and latest.file_name == name
        and latest.series_count == series_count
        and latest.instance_count == len(members)
        and final.is_file()
        and final.stat().st_size == latest.bytes
    ):
        removed = () if keep_superseded else remove_superseded(
            store, archive_dir, patient_id, delimiter, name, scan_strays=False
        )
        return ArchiveResult(
            patient_id=patient_id,
            file_name=name,
            path=final,
            series_count=series_count,
            instance_count=latest.instance_count,
            bytes=latest.bytes,
            sha256=latest.sha256,
            seconds=time.monotonic() - started,
            up_to_date=True,
            removed_superseded=removed,
        )

    # What must be in the zip: the instance files on disk after writing (catches files that
    # changed or appeared while the zip was written).
    size, sha256 = write_verified_zip(
        final, members, compression_level, lambda: {m.arcname: m.size for m in _scan_members(download_dir, patient_id, series)}
    )

    store.record_archive(
        ArchiveRecord(
            patient_id=patient_id,
            file_name=name,
            series_count=series_count,
            instance_count=len(members),
            bytes=size,
            sha256=sha256,
        )
    )
    removed = () if keep_superseded else remove_superseded(store, archive_dir, patient_id, delimiter, name)
    return ArchiveResult(
        patient_id=patient_id,
        file_name=name,
        path=final,
        series_count=series_count,
        instance_count=len(members),
        bytes=size,
        sha256=sha256,
        seconds=time.monotonic() - started,
        up_to_date=False,
        removed_superseded=removed,
    )


def archive_problems(archive_dir: Path, record: ArchiveRecord) -> list[str]:
    """What is wrong with a recorded archive on disk: missing, another size, another SHA-256.

    The zip was verified member by member before it was renamed into place; an unchanged
    SHA-256 proves it is still that zip, at the cost of one sequential read.
    """
    path = archive_path(Path(archive_dir), record.file_name)
    if not path.is_file():
        return [f"{record.file_name} is missing from {archive_dir}"]
    size = path.stat().st_size
    if size != record.bytes:
        return [f"{record.file_name} is {size} bytes, {record.bytes} when it was written"]
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_READ_CHUNK):
            digest.update(chunk)
    if digest.hexdigest() != record.sha256:
        return [f"{record.file_name} has changed since it was written (SHA-256 differs)"]
    return []
