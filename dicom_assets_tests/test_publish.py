"""Publishing verified zips to a second site: a mounted directory, and rsync over SSH.

The SSH tests start a throwaway OpenSSH server on a free 127.0.0.1 port (generated host and
client keys, known_hosts in the test's temp directory), so the "remote" directory is a local
one the test can inspect, and every byte still goes through rsync, ssh and sshd.
"""

from __future__ import annotations

import hashlib
import os
import pwd
import re
import shlex
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pytest

from dicom_assets import layout
from dicom_assets.archive import build_patient_archive
from dicom_assets.config import ConfigError, settings_from_dict
from dicom_assets.publish import (
    DirectoryDestination,
    PublishError,
    RsyncDestination,
    destination_from_settings,
    publish_patient_archive,
)
from dicom_assets.store import StateStore
from dicom_assets_tests.conftest import free_port, require_service
from dicom_assets_tests.test_archive import _add_series, _patient

SSHD = "/usr/sbin/sshd"


def _killed_copies(directory: Path, file_name: str, other_patients_zip: str) -> tuple[list[str], list[str]]:
    """Temp copies as a publish leaves them: (killed midway on this host, still being written or
    another patient's). The first must go at the patient's next publish, the others stay."""
    finished = subprocess.Popen(["true"])
    finished.wait()  # reaped: its pid names a dead writer
    dead_pid = finished.pid
    host = layout.temp_token().split("~")[0]
    killed = [f".{file_name}.{host}~{dead_pid}~0badc0de.part"]
    kept = [f".{file_name}.{host}~{os.getpid()}~0badc0de.part", f".{other_patients_zip}.{host}~{dead_pid}~0badc0de.part"]
    for name in killed + kept:
        (directory / name).write_bytes(b"partial")
    return killed, kept


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --- a mounted directory ------------------------------------------------------------------------


def test_publish_copy_verify_supersede_and_retry(store: StateStore, tmp_path: Path) -> None:
    downloads, archives, site = tmp_path / "dl", tmp_path / "zips", tmp_path / "partner"
    study = _patient(store, downloads, "P/1")
    first = build_patient_archive(store, downloads, archives, "P/1")
    share = DirectoryDestination(site)

    with pytest.raises(PublishError, match="does not exist or is not a directory"):
        publish_patient_archive(store, archives, share, "P/1")  # the share is not mounted
    assert first.path.exists() and store.latest_archive("P/1").published_at is None  # source untouched, retried later

    site.mkdir()
    done = publish_patient_archive(store, archives, share, "P/1")
    assert done.copied and _sha(site / first.file_name) == first.sha256
    record = store.latest_archive("P/1")
    assert record.published_to == str(site) and record.published_at is not None
    assert [p.name for p in site.iterdir()] == [first.file_name]  # no temp file left

    again = publish_patient_archive(store, archives, share, "P/1")
    assert not again.copied  # published once, not again

    _add_series(store, downloads, "P/1", study, f"{study}.9", 2)
    second = build_patient_archive(store, downloads, archives, "P/1")
    killed, kept = _killed_copies(site, second.file_name, "P2__seriesCount1.zip")
    newer = publish_patient_archive(store, archives, share, "P/1")
    assert newer.copied and newer.removed_superseded == (first.file_name,)
    assert sorted(p.name for p in site.iterdir()) == sorted([second.file_name, *kept])  # killed copy gone


def _flip_last_byte(path: Path) -> bytes:
    """Corrupt ``path`` in place (same size); returns the original bytes."""
    original = path.read_bytes()
    path.write_bytes(original[:-1] + bytes([original[-1] ^ 0xFF]))
    return original


def test_a_corrupted_copy_is_never_renamed_into_place(store: StateStore, tmp_path: Path) -> None:
    downloads, archives, site = tmp_path / "dl", tmp_path / "zips", tmp_path / "partner"
    site.mkdir()
    _patient(store, downloads, "P2")
    built = build_patient_archive(store, downloads, archives, "P2")
    original = _flip_last_byte(built.path)  # the bytes on disk are no longer the verified ones
    with pytest.raises(PublishError, match="does not match"):
        publish_patient_archive(store, archives, DirectoryDestination(site), "P2")
    assert list(site.iterdir()) == []
    assert built.path.exists() and store.latest_archive("P2").published_at is None

    built.path.write_bytes(original)
    assert publish_patient_archive(store, archives, DirectoryDestination(site), "P2").copied


def test_nothing_to_publish_without_an_archive(store: StateStore, tmp_path: Path) -> None:
    (tmp_path / "site").mkdir()
    assert publish_patient_archive(store, tmp_path / "zips", DirectoryDestination(tmp_path / "site"), "nobody") is None


# --- configuration ------------------------------------------------------------------------------

_BASE = {"pacs": {"host": "127.0.0.1", "port": 104, "called_ae_title": "PACS"},
         "paths": {"download_dir": "dl", "archive_dir": "zips", "report_dir": "reports"}}


def test_config_takes_one_destination_and_a_well_formed_rsync_target(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"publish\.directory or publish\.rsync_target, not both"):
        settings_from_dict({**_BASE, "publish": {"directory": "/mnt/x", "rsync_target": "u@h:/srv/x"}})
    for bad in ("h:relative/dir", "rsync://h/x", "h::module", "-oProxyCommand=x:/p", "u@:/x"):
        with pytest.raises(ConfigError, match=r"publish\.rsync_target: must look like"):
            settings_from_dict({**_BASE, "publish": {"rsync_target": bad}})
    with pytest.raises(ConfigError, match=r"publish\.ssh_command: cannot be split"):
        settings_from_dict({**_BASE, "publish": {"rsync_target": "h:/x", "ssh_command": "ssh -o 'unclosed"}})

    settings = settings_from_dict({**_BASE, "publish": {
        "rsync_target": "dicom@[::1]:/srv/share", "ssh_command": "ssh -p 2222", "ssh_key": "keys/id"}}, base_dir=tmp_path)
    destination = destination_from_settings(settings.publish)
    assert isinstance(destination, RsyncDestination) and destination.name == "dicom@[::1]:/srv/share"
    assert settings.publish.ssh_key == tmp_path / "keys" / "id"  # relative to the config file
    assert destination_from_settings(settings_from_dict(_BASE).publish) is None  # publishing is off


# --- rsync over SSH, against a real sshd on loopback --------------------------------------------


@dataclass(frozen=True)
class SshSite:
    directory: Path  # the "remote" directory (on this machine)
    login: str  # user@127.0.0.1
    ssh_command: str
    ssh_key: Path

    def destination(self, directory: Path | None = None) -> RsyncDestination:
        return RsyncDestination(f"{self.login}:{directory or self.directory}", self.ssh_command, self.ssh_key)


def _keygen(path: Path) -> None:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "dicom_assets test", "-f", str(path)], check=True)


def _wait_for_listener(proc: subprocess.Popen[bytes], port: int, log: Path) -> None:
    """Until sshd accepts connections; a server that exits instead fails the test with its log."""
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"sshd exited with {proc.returncode}: {log.read_text()}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    pytest.fail(f"sshd did not listen on 127.0.0.1:{port}: {log.read_text()}")


@pytest.fixture
def ssh_site(tmp_path: Path) -> Iterator[SshSite]:
    """A throwaway sshd on 127.0.0.1 that lets this user in with a generated key (root or not)."""
    tools = [SSHD, shutil.which("ssh"), shutil.which("ssh-keygen"), shutil.which("rsync")]
    require_service(all(t and os.access(t, os.X_OK) for t in tools),
                    "OpenSSH server/client and rsync (apt-get install openssh-server rsync)")
    keys = tmp_path / "ssh"
    keys.mkdir()
    _keygen(keys / "host_key")
    _keygen(keys / "client_key")
    (keys / "authorized_keys").write_text((keys / "client_key.pub").read_text())
    user = pwd.getpwuid(os.getuid()).pw_name
    if os.geteuid() == 0:  # sshd as root wants its privilege separation directory (systemd makes it)
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
    port = free_port()
    # UsePAM no and StrictModes no let it run as a normal user, with keys under /tmp.
    (keys / "sshd_config").write_text(f"""\
Port {port}
ListenAddress 127.0.0.1
HostKey {keys / 'host_key'}
PidFile {keys / 'sshd.pid'}
AuthorizedKeysFile {keys / 'authorized_keys'}
AllowUsers {user}
PermitRootLogin prohibit-password
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
""")
    host_key = (keys / "host_key.pub").read_text().split()
    (keys / "known_hosts").write_text(f"[127.0.0.1]:{port} {host_key[0]} {host_key[1]}\n")
    log = keys / "sshd.log"
    with open(log, "wb") as log_file:
        proc = subprocess.Popen([SSHD, "-D", "-e", "-f", str(keys / "sshd_config")], stdout=log_file, stderr=log_file)
    try:
        _wait_for_listener(proc, port, log)
        ssh = ["ssh", "-F", "/dev/null", "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=yes",
               "-o", f"UserKnownHostsFile={keys / 'known_hosts'}", "-p", str(port)]
        site = tmp_path / "partner site"  # a space: every remote path must be quoted
        site.mkdir()
        yield SshSite(site, f"{user}@127.0.0.1", shlex.join(ssh), keys / "client_key")
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def _listing(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def test_publish_over_ssh_copy_verify_supersede(pg_store: StateStore, tmp_path: Path, ssh_site: SshSite) -> None:
    store, downloads, archives = pg_store, tmp_path / "dl", tmp_path / "zips"
    settings = settings_from_dict({**_BASE, "publish": {
        "rsync_target": f"{ssh_site.login}:{ssh_site.directory}", "ssh_command": ssh_site.ssh_command,
        "ssh_key": str(ssh_site.ssh_key)}})
    site = destination_from_settings(settings.publish)
    assert isinstance(site, RsyncDestination)
    study = _patient(store, downloads, "P%1")  # key "P%251": a % in every remote path
    first = build_patient_archive(store, downloads, archives, "P%1")
    _patient(store, downloads, "P2")
    other = build_patient_archive(store, downloads, archives, "P2")

    for pid, built in (("P%1", first), ("P2", other)):
        done = publish_patient_archive(store, archives, site, pid)
        assert done.copied and done.destination == site.name
        assert _sha(ssh_site.directory / built.file_name) == built.sha256
        assert store.latest_archive(pid).published_to == site.name
    assert _listing(ssh_site.directory) == sorted([first.file_name, other.file_name])  # no temp left

    assert not publish_patient_archive(store, archives, site, "P%1").copied  # once, not again

    _add_series(store, downloads, "P%1", study, f"{study}.9", 2)
    second = build_patient_archive(store, downloads, archives, "P%1")
    killed, kept = _killed_copies(ssh_site.directory, second.file_name, other.file_name)
    newer = publish_patient_archive(store, archives, site, "P%1")
    assert newer.copied and newer.removed_superseded == (first.file_name,)
    assert _listing(ssh_site.directory) == sorted([second.file_name, other.file_name, *kept])  # P2's copy kept
    assert _sha(ssh_site.directory / second.file_name) == second.sha256


def test_publish_over_ssh_failures_leave_the_source_and_are_retried(pg_store: StateStore, tmp_path: Path,
                                                                    ssh_site: SshSite) -> None:
    store, downloads, archives = pg_store, tmp_path / "dl", tmp_path / "zips"
    _patient(store, downloads, "P3")
    built = build_patient_archive(store, downloads, archives, "P3")

    missing = ssh_site.destination(tmp_path / "not there")  # the remote directory does not exist
    expected = rf"cannot publish {re.escape(built.file_name)} to {re.escape(missing.name)}: rsync failed"
    with pytest.raises(PublishError, match=expected):
        publish_patient_archive(store, archives, missing, "P3")
    assert not (tmp_path / "not there").exists()

    closed = RsyncDestination(f"{ssh_site.login}:{ssh_site.directory}", f"ssh -F /dev/null -o BatchMode=yes -p {free_port()}")
    with pytest.raises(PublishError, match=rf"to {re.escape(closed.name)}: rsync failed .*(refused|Connection)"):
        publish_patient_archive(store, archives, closed, "P3")  # the partner site is down

    original = _flip_last_byte(built.path)  # what arrives there is not the verified archive
    with pytest.raises(PublishError, match="does not match the verified archive"):
        publish_patient_archive(store, archives, ssh_site.destination(), "P3")
    assert _listing(ssh_site.directory) == []  # the temp copy was removed, nothing renamed into place

    assert built.path.exists() and store.latest_archive("P3").published_at is None  # retried next run
    built.path.write_bytes(original)
    done = publish_patient_archive(store, archives, ssh_site.destination(), "P3")
    assert done.copied and _listing(ssh_site.directory) == [built.file_name]
    assert _sha(ssh_site.directory / built.file_name) == built.sha256
