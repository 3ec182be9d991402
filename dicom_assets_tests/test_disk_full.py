"""Disk full for real: ``download_dir`` and ``archive_dir`` on small tmpfs mounts.

Everything is real: ``dicom-assets sync`` runs as a subprocess, the bundled PACS serves a
generated cohort in-process (counting every instance it hands to a sending association), the
state DB is PostgreSQL, and the tests mount their own tmpfs (root only: under ``CI=true`` a
mount that fails fails the test, elsewhere it is skipped).

1. ``download_dir`` smaller than the cohort (C-MOVE and C-GET): the sync stops with an error
   naming the path and "No space left on device"; no series is complete without all its
   instances on disk, none is left claimed; no partial ``.dcm`` and no temp file remain. With
   room again (remount), the next sync completes and nothing already on disk is sent again.
2. ``archive_dir`` too small for a patient's rebuilt zip while it holds the previous one: the
   archive step fails naming the path and "No space left on device"; no partial zip, no temp
   file; the previous zip is intact and still the latest archive. With room again, the next
   sync builds the new zip and removes the superseded one.
3. An instance arriving when not one page is free: refused with A700 naming the path, no temp
   file, and the association goes on (the next C-STORE is answered too).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Iterator

import pydicom
import pytest
from pynetdicom import AE, StoragePresentationContexts

from dicom_assets.devpacs import CohortSummary, DevPacs, add_series
from dicom_assets.layout import archive_name
from dicom_assets.pacs.receiver import STATUS_OUT_OF_RESOURCES, StorageReceiver
from dicom_assets.store import StateStore
from dicom_assets_tests.conftest import free_port, require_service
from dicom_assets_tests.sync_process import (
    CountingPacs,
    RECEIVER_AE,
    check_archives,
    check_complete,
    check_downloads,
    make_cohort,
    run_sync,
    series_rows,
    write_config,
)

SIZE = 64  # rows and columns: an instance is ~9.5 KB, three tmpfs pages
ROOMY_KB = 8192


# ------------------------------------------------------------------------------------------
# Helpers


def _mount_tool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(args), capture_output=True, text=True, timeout=30)


@pytest.fixture
def tmpfs() -> Iterator[Callable[[Path, int], Callable[[int], None]]]:
    """``mount(directory, size_kb)`` mounts a tmpfs there and returns ``resize(size_kb)``
    (``mount -o remount,size=``); every mount is undone at teardown."""
    mounted: list[Path] = []
    tool = shutil.which("mount")
    why = "mount(8)" if not tool else None if os.geteuid() == 0 else "root (to mount a tmpfs)"

    def mount(directory: Path, size_kb: int) -> Callable[[int], None]:
        require_service(why is None, why or "")
        directory.mkdir(parents=True, exist_ok=True)
        done = _mount_tool("mount", "-t", "tmpfs", "-o", f"size={size_kb}k,mode=0755", "tmpfs", str(directory))
        require_service(done.returncode == 0, f"a tmpfs mount at {directory} ({done.stderr.strip()})")
        mounted.append(directory)

        def resize(new_kb: int) -> None:
            again = _mount_tool("mount", "-o", f"remount,size={new_kb}k", str(directory))
            assert again.returncode == 0, again.stderr

        return resize

    yield mount
    for directory in reversed(mounted):
        if _mount_tool("umount", str(directory)).returncode != 0:
            _mount_tool("umount", "-l", str(directory))  # still busy: detach it lazily


def _cohort(directory: Path, patients: int, series: int, slices: int) -> CohortSummary:
    return make_cohort(directory, patients, series, slices, size=SIZE, seed=29)


def _says_disk_full(output: str, directory: Path) -> bool:
    """A line of the sync's output names a path in ``directory`` and says "no space left"."""
    return any(str(directory) in line and "no space left" in line.lower() for line in output.splitlines())


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _instances(download_dir: Path) -> dict[Path, tuple[int, int]]:
    """Every file under ``download_dir`` (each must be a whole, named instance): path -> (inode, mtime)."""
    found = {}
    for path in download_dir.rglob("*"):
        if path.is_dir():
            continue
        assert not path.name.startswith(".") and path.suffix == ".dcm", f"temp or stray file left: {path}"
        ds = pydicom.dcmread(path)  # whole file: a truncated one raises
        assert ds.SOPInstanceUID == path.stem and len(ds.PixelData) == ds.Rows * ds.Columns * 2, path
        found[path] = (path.stat().st_ino, path.stat().st_mtime_ns)
    return found


# ------------------------------------------------------------------------------------------
# 1. download_dir fills up during a sync


@pytest.mark.parametrize("method", ["c-move", "c-get"])
def test_full_download_dir_stops_the_sync_and_the_next_one_resumes(
    tmp_path: Path, pg_url: str, tmpfs: Any, method: str
) -> None:
    cohort = _cohort(tmp_path / "pacs", patients=2, series=2, slices=10)  # 40 instances, ~480 KB on tmpfs
    downloads = tmp_path / "downloads"
    resize = tmpfs(downloads, 192)  # 16 instances of 3 pages: then not one page is free
    receiver_port = free_port()
    with CountingPacs(tmp_path / "pacs", move_destinations={RECEIVER_AE: ("127.0.0.1", receiver_port)}) as pacs:
        config = write_config(tmp_path, pacs.port, receiver_port, pg_url, retrieve_method=method)
        code1, out1 = run_sync(tmp_path, config, "full")
        sent1, pacs.sent[:] = list(pacs.sent), []
        rows1 = series_rows(pg_url)
        on_disk1 = _instances(downloads)

        resize(ROOMY_KB)
        code2, out2 = run_sync(tmp_path, config, "roomy")
        sent2 = list(pacs.sent)

    # The first sync stopped, saying where and why.
    assert code1 != 0, out1[-3000:]
    assert _says_disk_full(out1, downloads), out1[-4000:]
    assert 0 < len(on_disk1) < cohort.instances
    # Nothing complete that is not whole on disk; nothing left claimed; no temp file (_instances).
    wanted = {s.series_instance_uid: s for s in cohort.series}
    for row in rows1:
        assert row["claimed_by"] is None and row["download_status"] != "in_progress", row
        files = sorted(p.stem for p in on_disk1 if p.parent.name == row["series_instance_uid"])
        if row["download_status"] == "complete":
            assert files == sorted(wanted[row["series_instance_uid"]].sop_instance_uids), row
        assert row["downloaded_instances"] == len(files), row  # recorded as it is on disk
    assert any("no space left" in (r["last_error"] or "").lower() for r in rows1), rows1
    assert max(Counter(sop for _, sop in sent1).values()) == 1, "an instance was sent twice by the first sync"

    # With room again the next sync completes, fetching only what was missing, once.
    assert code2 == 0, out2[-4000:]
    check_complete(pg_url, cohort)
    assert check_downloads(downloads, cohort) == []
    sops_on_disk1 = {p.stem for p in on_disk1}
    again = [sop for _, sop in sent2 if sop in sops_on_disk1]
    assert not again, f"{len(again)} instances already on disk were sent again"
    sent2_counts = Counter(sop for _, sop in sent2)
    assert set(sent2_counts) == {sop for s in cohort.series for sop in s.sop_instance_uids} - sops_on_disk1
    assert max(sent2_counts.values()) == 1
    for path, ident in on_disk1.items():
        assert (path.stat().st_ino, path.stat().st_mtime_ns) == ident, path
    print(
        f"\n[disk full, {method}] first sync: exit {code1}, {len(on_disk1)}/{cohort.instances} instances on disk, "
        f"{len(sent1)} sent; statuses {Counter(r['download_status'] for r in rows1)}; second sync: {len(sent2)} sent"
    )


# ------------------------------------------------------------------------------------------
# 2. archive_dir fills up while a patient's zip is rebuilt


def test_full_archive_dir_keeps_the_previous_zip_and_the_next_sync_replaces_it(
    tmp_path: Path, pg_url: str, tmpfs: Any
) -> None:
    cohort = _cohort(tmp_path / "pacs", patients=1, series=1, slices=4)  # a ~22 KB zip
    pid = cohort.patients[0]
    archives = tmp_path / "archives"
    resize = tmpfs(archives, 96)
    receiver_port = free_port()
    store = StateStore(pg_url)
    try:
        with DevPacs(tmp_path / "pacs", move_destinations={RECEIVER_AE: ("127.0.0.1", receiver_port)}, rescan_interval_s=0) as pacs:
            config = write_config(tmp_path, pacs.port, receiver_port, pg_url)
            code, out = run_sync(tmp_path, config, "first")
            assert code == 0, out[-4000:]
            old = archives / archive_name(pid, "__seriesCount", 1)
            old_sha, old_record = _sha256(old), store.latest_archive(pid)
            assert old_record is not None and (old_record.file_name, old_record.sha256) == (old.name, old_sha)

            # 30 more slices: the new zip (~180 KB) cannot sit beside the old one in 96 KB.
            added = add_series(tmp_path / "pacs", pid, slices=30, rows=SIZE, columns=SIZE, seed=31)
            code, out = run_sync(tmp_path, config, "full")
            assert code != 0, out[-4000:]
            assert _says_disk_full(out, archives), out[-4000:]
            assert sorted(os.listdir(archives)) == [old.name]  # no partial zip, no temp file
            assert _sha256(old) == old_sha
            latest = store.latest_archive(pid)
            assert latest is not None and (latest.file_name, latest.sha256) == (old.name, old_sha)
            assert {r["download_status"] for r in series_rows(pg_url)} == {"complete"}

            resize(ROOMY_KB)
            code, out = run_sync(tmp_path, config, "roomy")
            assert code == 0, out[-4000:]
    finally:
        store.dispose()
    everything = CohortSummary(series=cohort.series + (added,))
    assert check_archives(archives, everything) == []  # the new zip alone: the old one removed
    new = archives / archive_name(pid, "__seriesCount", 2)
    store = StateStore(pg_url)
    try:
        latest = store.latest_archive(pid)
        assert latest is not None and (latest.file_name, latest.sha256) == (new.name, _sha256(new))
        assert store.superseded_archives(pid) == []  # the old one is marked removed
    finally:
        store.dispose()
    print(f"\n[archive full] kept {old.name} ({old_record.bytes} bytes) until {new.name} ({latest.bytes} bytes) fitted")


# ------------------------------------------------------------------------------------------
# 3. Not one free page: the storage SCP refuses each instance and goes on


def test_instance_arriving_on_a_full_disk_is_refused_and_the_association_goes_on(tmp_path: Path, tmpfs: Any) -> None:
    cohort = _cohort(tmp_path / "pacs", patients=1, series=1, slices=2)
    series = cohort.series[0]
    datasets = [pydicom.dcmread(p) for p in sorted((tmp_path / "pacs").rglob("*.dcm"))]
    downloads = tmp_path / "downloads"
    tmpfs(downloads, 64)
    with pytest.raises(OSError, match="No space left"), open(downloads / "filler", "wb") as filler:
        filler.write(b"\0" * (128 << 10))
    receiver = StorageReceiver(RECEIVER_AE, "127.0.0.1", free_port(), downloads, allowed_ae_titles=["DEVPACS"])
    with receiver:
        flight = receiver.sink.expect(series.patient_id, series.study_instance_uid, series.series_instance_uid)
        ae = AE(ae_title="DEVPACS")
        ae.requested_contexts = StoragePresentationContexts
        ae.dimse_timeout = ae.network_timeout = 5  # a dead association fails in seconds, not 30
        assoc = ae.associate("127.0.0.1", receiver.port, ae_title=RECEIVER_AE)
        assert assoc.is_established
        try:
            statuses = [int(assoc.send_c_store(ds).get("Status", -1)) for ds in datasets]
        finally:
            if assoc.is_established:
                assoc.release()
    assert statuses == [STATUS_OUT_OF_RESOURCES] * len(datasets)
    assert flight.received == 0 and flight.last_error is not None
    assert str(downloads) in flight.last_error and "no space left" in flight.last_error.lower(), flight.last_error
    assert [p.name for p in downloads.rglob("*") if p.is_file()] == ["filler"]
