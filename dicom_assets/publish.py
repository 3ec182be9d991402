"""Publishing: copy each patient's verified zip to a second site's storage.

The old scripts rsynced every zip to another site for sharing. Here each zip is copied once to
a hidden temp name at the destination, its SHA-256 *there* is compared with the one recorded when
the zip was verified, and only then is it renamed into place; superseded copies of that patient
at the destination are removed after that, and only then is the archive recorded as published.
A failed copy leaves the source untouched, removes the temp copy and leaves the archive
unpublished, so the next run tries again.

Two destinations share that sequence (:class:`Destination`): a mounted directory
(:class:`DirectoryDestination`) and an rsync target over SSH (:class:`RsyncDestination`), where
the checksum, the rename and the clean-up run on the remote host through the same ssh command.
"""

from __future__ import annotations

import hashlib
import os
import posixpath
import re
import shlex
import subprocess
import time
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Callable, Protocol

from dicom_assets import layout
from dicom_assets.config import RSYNC_TARGET, PublishSettings
from dicom_assets.store import StateStore

_CHUNK = 4 << 20


class PublishError(RuntimeError):
    """The copy at the destination could not be written or does not match the archive."""


@dataclass(frozen=True)
class PublishResult:
    patient_id: str
    file_name: str
    destination: str  # as recorded in archives.published_to
    bytes: int
    seconds: float
    copied: bool  # False: already published there
    removed_superseded: tuple[str, ...]


class Destination(Protocol):
    """Where verified zips are published. ``name`` is what ``archives.published_to`` records."""

    @property
    def name(self) -> str: ...

    def holds(self, file_name: str, size: int) -> bool:
        """Whether the copy recorded as published here is still there (as far as is cheap to tell)."""
        ...

    def put(self, source: Path, file_name: str, sha256: str) -> None:
        """Copy to a hidden temp name, check its SHA-256 there, rename into place.

        Raises PublishError (and leaves no temp copy) when any of that fails."""
        ...

    def remove_superseded(self, patient_id: str, delimiter: str, current: str) -> tuple[str, ...]:
        """Remove the patient's other archives (``layout.archive_pattern``); their names, sorted."""
        ...


def _temp_name(file_name: str) -> str:
    """Hidden, unique per attempt, never matching an archive pattern (so never taken as a zip).
    It names this host and process (``layout.temp_token``): the copy of a process killed midway is
    removed by the patient's next publish (``remove_superseded``)."""
    return f".{file_name}.{layout.temp_token()}.part"


# --- a mounted directory ------------------------------------------------------------------------


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


@dataclass(frozen=True)
class DirectoryDestination:
    """A second site's share mounted here (NFS, SMB, ...): ``publish.directory``."""

    directory: Path

    @property
    def name(self) -> str:
        return str(self.directory)

    def holds(self, file_name: str, size: int) -> bool:
        final = layout.ensure_inside(self.directory, self.directory / file_name)
        return final.is_file() and final.stat().st_size == size

    def put(self, source: Path, file_name: str, sha256: str) -> None:
        final = layout.ensure_inside(self.directory, self.directory / file_name)
        if not self.directory.is_dir():
            raise PublishError(f"publish.directory {self.directory} does not exist or is not a directory (is it mounted?)")
        temp = self.directory / _temp_name(file_name)
        try:
            # The bytes read from the source and the bytes read back at the destination must
            # both hash to what was recorded when the zip was verified.
            if _copy_and_hash(source, temp) != sha256 or _sha256(temp) != sha256:
                raise PublishError(f"{file_name}: the copy at {self.directory} does not match the verified archive")
            os.replace(temp, final)
        except OSError as exc:
            temp.unlink(missing_ok=True)
            raise PublishError(f"cannot publish {file_name} to {self.directory}: {exc.strerror or exc}") from exc
        except BaseException:
            temp.unlink(missing_ok=True)
            raise

    def remove_superseded(self, patient_id: str, delimiter: str, current: str) -> tuple[str, ...]:
        pattern = layout.archive_pattern(patient_id, delimiter)
        temps = _temp_prefix(patient_id, delimiter)
        removed = []
        try:
            for entry in self.directory.iterdir():
                if entry.name != current and pattern.match(entry.name) and entry.is_file():
                    entry.unlink()
                    removed.append(entry.name)
                elif entry.name.startswith(temps) and layout.is_stale_temp(entry.name):
                    entry.unlink(missing_ok=True)  # a copy of ours killed midway
        except OSError as exc:
            raise PublishError(f"cannot remove superseded copies at {self.directory}: {exc.strerror or exc}") from exc
        return tuple(sorted(removed))


# --- rsync over SSH -----------------------------------------------------------------------------

#: Appended after ``publish.ssh_command`` (ssh takes the first value given, so the user's win):
#: a partner site that stops answering fails the step within about a minute instead of hanging.
_SSH_LIVENESS = ("-o", "ConnectTimeout=30", "-o", "ServerAliveInterval=15", "-o", "ServerAliveCountMax=4")
_RSYNC_IO_TIMEOUT_S = 300


def _last_lines(text: str, limit: int = 400) -> str:
    """The end of a tool's stderr, for an error message (ssh/rsync put the cause last)."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return " | ".join(lines[-3:])[-limit:] or "no message"


def _run(argv: list[str]) -> subprocess.CompletedProcess[str]:
    """Run a local program (ssh, rsync) without a terminal; a missing program is a PublishError."""
    try:
        return subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True, check=False)
    except OSError as exc:
        raise PublishError(f"cannot run {argv[0]}: {exc.strerror or exc} (is it installed?)") from exc


@dataclass(frozen=True)
class RsyncDestination:
    """``publish.rsync_target`` (``user@host:/path``): rsync for the bytes, ssh for the rest.

    The remote account needs a POSIX shell, rsync, sha256sum, mv, rm and find (any Linux host).
    Every remote word is quoted with :func:`shlex.quote`; the ssh command is never put in
    messages (it may name a key or a jump host).
    """

    target: str
    ssh_command: str = "ssh -o BatchMode=yes"
    ssh_key: Path | None = None

    def __post_init__(self) -> None:
        if "://" in self.target or not RSYNC_TARGET.match(self.target):
            raise PublishError(f"publish.rsync_target {self.target!r} must look like user@host:/absolute/path")

    @property
    def name(self) -> str:
        return self.target

    @cached_property
    def _parts(self) -> re.Match[str]:
        return RSYNC_TARGET.match(self.target)  # type: ignore[return-value]  # checked in __post_init__

    @property
    def _directory(self) -> str:
        return self._parts["path"].rstrip("/") or "/"

    @property
    def _ssh_destination(self) -> str:
        """``user@host`` as ssh wants it (rsync's ``[IPv6]`` brackets removed)."""
        login, host = self._parts["login"], self._parts["host"]
        return login[: len(login) - len(host)] + host.strip("[]")

    def _ssh_argv(self) -> list[str]:
        argv = shlex.split(self.ssh_command)
        if self.ssh_key is not None:
            argv += ["-i", str(self.ssh_key), "-o", "IdentitiesOnly=yes"]
        return argv + list(_SSH_LIVENESS)

    def _remote(self, *command: str) -> str:
        """Run ``command`` on the remote host (each word quoted); its stdout, or PublishError."""
        done = _run([*self._ssh_argv(), self._ssh_destination, shlex.join(command)])
        if done.returncode != 0:
            raise PublishError(f"remote {command[0]} failed (exit {done.returncode}): {_last_lines(done.stderr)}")
        return done.stdout

    def holds(self, file_name: str, size: int) -> bool:
        # Trust the state DB: the hourly pipeline covers every patient, and asking the partner
        # site about each one would open thousands of SSH connections an hour.
        return True

    def put(self, source: Path, file_name: str, sha256: str) -> None:
        temp = posixpath.join(self._directory, _temp_name(file_name))
        try:
            self._rsync(source, f"{self._parts['login']}:{temp}")
            found = self._remote("sha256sum", "--", temp).split(maxsplit=1)
            there = found[0].lstrip("\\") if found else "nothing"
            if there != sha256:
                raise PublishError(f"the copy there does not match the verified archive (sha256 {there})")
            self._remote("mv", "-f", "--", temp, posixpath.join(self._directory, file_name))
        except PublishError as exc:
            self._discard(temp)
            raise PublishError(f"cannot publish {file_name} to {self.target}: {exc}") from exc
        except BaseException:
            self._discard(temp)
            raise

    def _rsync(self, source: Path, remote: str) -> None:
        # -s: the remote path travels inside rsync's protocol, never through the remote shell.
        done = _run(["rsync", "-s", f"--timeout={_RSYNC_IO_TIMEOUT_S}", "-e", shlex.join(self._ssh_argv()),
                     "--", str(source.resolve()), remote])
        if done.returncode != 0:
            raise PublishError(f"rsync failed (exit {done.returncode}): {_last_lines(done.stderr)}")

    def _discard(self, temp: str) -> None:
        """Best effort: when the host is unreachable the temp is left (hidden, never a zip name)."""
        try:
            self._remote("rm", "-f", "--", temp)
        except PublishError:
            pass

    def remove_superseded(self, patient_id: str, delimiter: str, current: str) -> tuple[str, ...]:
        # A glob on the patient's key narrows the listing (a share may hold 100,000 zips); the
        # exact pattern then decides, as for a directory (key "P1" must not take "P1_X"'s zips).
        pattern = layout.archive_pattern(patient_id, delimiter)
        glob = _glob_literal(layout.patient_key(patient_id) + delimiter) + "*.zip"
        temps = _temp_prefix(patient_id, delimiter)
        try:
            found = self._remote(
                "find", self._directory, "-maxdepth", "1", "-type", "f", "(", "-name", glob, "-o", "-name", f".{glob}.*.part", ")"
            )  # fmt: skip
            names = sorted({posixpath.basename(line) for line in found.splitlines() if line})
            stale = [n for n in names if n != current and pattern.match(n)]
            killed = [n for n in names if n.startswith(temps) and layout.is_stale_temp(n)]  # copies of ours killed midway
            if stale or killed:
                self._remote("rm", "-f", "--", *(posixpath.join(self._directory, n) for n in stale + killed))
        except PublishError as exc:
            raise PublishError(f"cannot remove superseded copies at {self.target}: {exc}") from exc
        return tuple(stale)


def _temp_prefix(patient_id: str, delimiter: str) -> str:
    """How the temp names of this patient's archive copies begin (see :func:`_temp_name`)."""
    return "." + layout.patient_key(patient_id) + delimiter


def _glob_literal(text: str) -> str:
    """``text`` matched literally by find -name (patient keys hold no glob characters anyway)."""
    return re.sub(r"([*?\[\]\\])", r"\\\1", text)


# --- the sequence -------------------------------------------------------------------------------


def destination_from_settings(publish: PublishSettings) -> Destination | None:
    """The configured destination, or None when publishing is off."""
    if publish.rsync_target is not None:
        return RsyncDestination(publish.rsync_target, publish.ssh_command, publish.ssh_key)
    if publish.directory is not None:
        return DirectoryDestination(Path(publish.directory))
    return None


def _publish(
    destination: Destination, source_dir: Path, record: Any, key: str, delimiter: str, mark: Callable[[int, str], None]
) -> tuple[bool, tuple[str, ...]]:
    """Copy one recorded zip unless the destination already holds it; remove the superseded
    copies named like ``key``'s zips; record the publication. Returns (copied, removed)."""
    if record.published_to == destination.name and destination.holds(record.file_name, record.bytes):
        return False, ()
    source = layout.ensure_inside(Path(source_dir), Path(source_dir) / record.file_name)
    destination.put(source, record.file_name, record.sha256)
    # Superseded copies go before the record: if removing them fails, the next run publishes
    # (an idempotent re-copy) and removes them again, rather than never looking back.
    removed = destination.remove_superseded(key, delimiter, record.file_name)
    mark(record.archive_id, destination.name)
    return True, removed


def publish_patient_archive(
    store: StateStore, archive_dir: Path, destination: Destination, patient_id: str, delimiter: str = "__seriesCount"
) -> PublishResult | None:
    """Publish the patient's latest archive to ``destination``; None when it has no archive yet."""
    started = time.monotonic()
    record = store.latest_archive(patient_id)
    if record is None or record.archive_id is None:
        return None
    copied, removed = _publish(destination, archive_dir, record, patient_id, delimiter, store.mark_archive_published)
    return PublishResult(patient_id, record.file_name, destination.name, record.bytes, time.monotonic() - started, copied, removed)


def publish_deidentified_archive(
    store: StateStore, deidentified_dir: Path, destination: Destination, patient_id: str, delimiter: str = "__seriesCount"
) -> PublishResult | None:
    """Publish the patient's latest de-identified zip (``publish.ship: deidentified|both``);
    None when there is none yet or nothing was left to share. The copy at the destination is
    named by the pseudonym only, and superseded copies are found by the pseudonym's pattern."""
    started = time.monotonic()
    record = store.latest_deidentified_archive(patient_id)
    stored = store.pseudonym_of(patient_id)  # stored before the zip was made
    if record is None or record.archive_id is None or not record.file_name or stored is None:
        return None
    copied, removed = _publish(destination, deidentified_dir, record, stored.pseudonym, delimiter, store.mark_deidentified_published)
    return PublishResult(stored.pseudonym, record.file_name, destination.name, record.bytes, time.monotonic() - started, copied, removed)
