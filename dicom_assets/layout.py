"""The storage layout: safe, reversible names derived from DICOM identifiers, and where files go.

A PatientID may hold almost anything (spaces, ``/``, ``.``, ``..``, ``*``, ``%``, non-ASCII, up to
64 characters), and it becomes a Dagster partition key, a directory name and part of a zip name.
One encoding, :func:`patient_key`, serves all three:

* ASCII letters and digits, ``-`` and ``_``, and printable non-ASCII characters other than
  spaces are kept as they are;
* every other character is written as ``%XX`` per UTF-8 byte (so ``/`` -> ``%2F``, ``.`` -> ``%2E``,
  space -> ``%20``, ``%`` -> ``%25``, ``*`` -> ``%2A``);
* the empty PatientID becomes ``%EMPTY`` (no real ID can encode to it: ``%`` is always ``%25``).

:func:`patient_id_from_key` reverses it exactly. The result never contains ``/``, NUL, ``.`` or
``..``, so it can never leave the directory it is joined to. A key longer than 200 bytes (only
possible for a 64-character ID made of 4-byte characters) is replaced by ``%SHA-`` and a hash,
so the zip name stays under the 255-byte limit; the patients table stores every key, so even
then the key maps back to its PatientID through the state DB.

UIDs are checked, not encoded: a valid UID (digits and dots, at most 64) is already safe as a file
name apart from the pure-dot names, which the check refuses.
"""

from __future__ import annotations

import hashlib
import os
import re
import secrets
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any, Iterator

MAX_KEY_BYTES = 200
_UID = re.compile(r"^(?!\.)(?!.*\.\.)[0-9.]{1,64}(?<!\.)$")
EMPTY_KEY = "%EMPTY"
MAX_PATIENT_ID_CHARS = 64


class UnsafeNameError(ValueError):
    """An identifier cannot be turned into a safe path component."""


def patient_key(patient_id: str) -> str:
    """Encode a PatientID as a partition key / directory name / zip prefix (see module doc)."""
    if patient_id == "":
        return EMPTY_KEY
    if "\x00" in patient_id:
        raise UnsafeNameError(f"PatientID {patient_id!r} contains a NUL character")
    if len(patient_id) > MAX_PATIENT_ID_CHARS:
        raise UnsafeNameError(f"PatientID {patient_id[:80]!r}... is longer than {MAX_PATIENT_ID_CHARS} characters")
    out: list[str] = []
    for char in patient_id:
        if _keep(char):
            out.append(char)
        else:
            out.extend(f"%{b:02X}" for b in char.encode("utf-8"))
    key = "".join(out)
    if len(key.encode("utf-8")) > MAX_KEY_BYTES:
        key = "%SHA-" + hashlib.sha256(patient_id.encode("utf-8")).hexdigest()[:40]
    return key


def _keep(char: str) -> bool:
    if char.isascii():
        return char.isalnum() or char in "-_"
    return char.isprintable() and not char.isspace()


def patient_id_from_key(key: str) -> str:
    """Decode a key made by :func:`patient_key` back to the PatientID."""
    if key == EMPTY_KEY:
        return ""
    if key.startswith("%SHA-"):
        raise UnsafeNameError(f"{key!r} is a hashed key: look the PatientID up in the patients table")
    raw = bytearray()
    i = 0
    while i < len(key):
        if key[i] == "%":
            try:
                raw.append(int(key[i + 1 : i + 3], 16))
            except ValueError:
                raise UnsafeNameError(f"{key!r} is not a patient key: bad escape at {i}") from None
            i += 3
        else:
            raw.extend(key[i].encode("utf-8"))
            i += 1
    return raw.decode("utf-8")


def check_uid(uid: str, what: str = "UID") -> str:
    """Return ``uid`` if it is a well-formed DICOM UID usable as a path component, else raise."""
    if not isinstance(uid, str) or not _UID.match(uid):
        raise UnsafeNameError(f"{what} {uid!r} is not a valid DICOM UID (digits and dots, max 64)")
    return uid


def archive_name(patient_id: str, delimiter: str, series_count: int) -> str:
    """``<patient key><delimiter><N>.zip``: the name of a patient's archive."""
    return f"{patient_key(patient_id)}{delimiter}{series_count}.zip"


def archive_pattern(patient_id: str, delimiter: str) -> re.Pattern[str]:
    """Matches exactly this patient's archive names (not those of a patient whose key is longer)."""
    return re.compile(rf"^{re.escape(patient_key(patient_id))}{re.escape(delimiter)}(\d+)\.zip$")


def series_dir(download_dir: Path, patient_id: str, study_uid: str, series_uid: str) -> Path:
    """``<download_dir>/<patient key>/<StudyInstanceUID>/<SeriesInstanceUID>``, checked to stay inside."""
    path = download_dir / patient_key(patient_id) / check_uid(study_uid, "StudyInstanceUID") / check_uid(
        series_uid, "SeriesInstanceUID"
    )
    return ensure_inside(download_dir, path)


def instance_file(series_directory: Path, sop_uid: str) -> Path:
    """``<series dir>/<SOPInstanceUID>.dcm``."""
    return series_directory / f"{check_uid(sop_uid, 'SOPInstanceUID')}.dcm"


def ensure_inside(root: Path, path: Path) -> Path:
    """Raise unless ``path`` resolves to a location under ``root`` (defence in depth)."""
    root_resolved = root.resolve()
    resolved = path.resolve()
    if resolved != root_resolved and root_resolved not in resolved.parents:
        raise UnsafeNameError(f"{path} would be outside {root}")
    return path


_INSTANCE_FILE = re.compile(r"^[0-9.]{1,64}\.dcm$")


def instances_on_disk(series_directory: Path) -> dict[str, int]:
    """SOPInstanceUID -> size in bytes of every finished instance file in a series directory.

    In-flight temp files (``.<sop>.dcm.<token>.part``) are not counted: only a renamed file is
    a received instance.
    """
    found: dict[str, int] = {}
    try:
        entries = list(os.scandir(series_directory))
    except FileNotFoundError:
        return found
    for entry in entries:
        if _INSTANCE_FILE.match(entry.name) and entry.is_file(follow_symlinks=False):
            found[entry.name[:-4]] = entry.stat(follow_symlinks=False).st_size
    return found


_HOST = re.sub(r"[^A-Za-z0-9-]", "-", __import__("socket").gethostname()) or "host"
_STALE_TEMP = re.compile(r"^\..+\.(?P<host>[A-Za-z0-9-]+)~(?P<pid>\d+)~[0-9a-f]+\.part$")


def temp_token() -> str:
    """``<host>~<pid>~<random>``: lets a later process tell a dead writer's temp file from a live one's."""
    return f"{_HOST}~{os.getpid()}~{secrets.token_hex(4)}"


def pid_alive(pid: int) -> bool:
    """Whether a process with this PID exists on this host."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def is_stale_temp(name: str) -> bool:
    """A hidden ``.part`` file named by :func:`temp_token` whose writer, a process on this host,
    is dead (another host's temp files cannot be judged from here)."""
    match = _STALE_TEMP.match(name)
    return bool(match) and match["host"] == _HOST and not pid_alive(int(match["pid"]))


def remove_stale_temps(directory: Path) -> int:
    """Delete hidden ``.part`` files left in ``directory`` by dead writers on this host.

    A process killed mid-write leaves its temp file behind (never a truncated final file);
    without this, every ``kill -9`` during archiving would leak a zip-sized file.
    """
    removed = 0
    try:
        entries = list(os.scandir(directory))
    except (FileNotFoundError, NotADirectoryError):
        return 0
    for entry in entries:
        if is_stale_temp(entry.name):
            try:
                os.unlink(entry.path)
                removed += 1
            except FileNotFoundError:
                pass
    return removed


def temp_name(final: Path, token: str) -> Path:
    """The hidden temp file an instance is written to before its atomic rename to ``final``."""
    return final.with_name(f".{final.name}.{token}.part")


@contextmanager
def atomic_file(path: Path, mode: str = "w", **open_kwargs: Any) -> Iterator[IO[Any]]:
    """Write ``path`` all at once: a hidden temp file beside it, fsynced, then renamed over it.

    A reader never sees a half-written report; on any error the temp file is removed and the
    previous ``path`` (if any) stays.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(f".{path.name}.{temp_token()}.part")
    try:
        with open(temp, mode.replace("w", "x"), **open_kwargs) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
