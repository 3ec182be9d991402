"""build_patient_archive with real files and a real state DB (PostgreSQL and SQLite)."""

from __future__ import annotations

import hashlib
import io
import itertools
import os
import random
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian

from dicom_assets import archive, layout
from dicom_assets.archive import ArchiveNotReady, ArchiveVerificationError, build_patient_archive, verify_archive
from dicom_assets.store import PatientRecord, SeriesRecord, StateStore, StudyRecord
from dicom_assets.zipwriter import CHUNK_SIZE, write_zip

_study_numbers = itertools.count(1)
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
MULTIFRAME_WORD = "1.2.840.10008.5.1.4.1.1.7.3"  # Multi-frame Grayscale Word Secondary Capture


def _write_instance(series_directory: Path, sop_uid: str, patient_id: str, size: int = 300) -> Path:
    series_directory.mkdir(parents=True, exist_ok=True)
    path = layout.instance_file(series_directory, sop_uid)
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = SECONDARY_CAPTURE
    ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
    ds.SOPClassUID = SECONDARY_CAPTURE
    ds.SOPInstanceUID = sop_uid
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.PatientID = patient_id
    ds.ImageComments = os.urandom(size).hex()
    ds.save_as(path, enforce_file_format=True)
    return path


def _add_series(store: StateStore, download_dir: Path, patient_id: str, study: str, series_uid: str,
                instances: int = 3, complete: bool = True) -> None:
    store.upsert_studies([StudyRecord(study, patient_id)])
    store.upsert_series([SeriesRecord(series_uid, study, patient_id, series_number=int(series_uid.rsplit(".", 1)[1]),
                                      expected_instances=instances)])
    directory = layout.series_dir(download_dir, patient_id, study, series_uid)
    for j in range(1, instances + 1):
        _write_instance(directory, f"{series_uid}.{j}", patient_id)
    if complete:
        claimed = store.claim_next_series([patient_id], "test", 60)
        assert claimed is not None and claimed.series_instance_uid == series_uid
        assert store.finish_series(series_uid, "test", "complete", instances, 1000)


def _patient(store: StateStore, download_dir: Path, patient_id: str, series: int = 2, instances: int = 3) -> str:
    """A patient with ``series`` complete series in one study; returns the study UID."""
    study = f"1.2.{next(_study_numbers)}"
    store.upsert_patients([PatientRecord(patient_id)])
    for i in range(1, series + 1):
        _add_series(store, download_dir, patient_id, study, f"{study}.{i}", instances)
    return study


@pytest.fixture
def dirs(tmp_path: Path) -> tuple[Path, Path]:
    return tmp_path / "downloads", tmp_path / "archives"


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _leftover_temps(archive_dir: Path) -> list[str]:
    return [p.name for p in archive_dir.iterdir() if p.name.endswith(".part")]


def test_builds_named_verified_archive(store: StateStore, dirs: tuple[Path, Path]) -> None:
    download_dir, archive_dir = dirs
    study = _patient(store, download_dir, "PAT 1", series=2, instances=3)
    result = build_patient_archive(store, download_dir, archive_dir, "PAT 1")

    assert result.file_name == "PAT%201__seriesCount2.zip" == layout.archive_name("PAT 1", "__seriesCount", 2)
    assert result.path == archive_dir / result.file_name and result.path.is_file()
    assert (result.series_count, result.instance_count, result.up_to_date) == (2, 6, False)
    assert result.bytes == result.path.stat().st_size
    assert result.sha256 == _sha256(result.path)
    assert result.removed_superseded == ()
    assert result.seconds >= 0
    with zipfile.ZipFile(result.path) as zf:
        assert zf.testzip() is None
        names = zf.namelist()
        assert names == [f"PAT%201/{study}/{study}.{i}/{study}.{i}.{j}.dcm" for i in (1, 2) for j in (1, 2, 3)]
        assert {i.compress_type for i in zf.infolist()} == {zipfile.ZIP_DEFLATED}
        ds = pydicom.dcmread(io.BytesIO(zf.read(names[0])))
        assert ds.SOPInstanceUID == f"{study}.1.1" and ds.PatientID == "PAT 1"
    latest = store.latest_archive("PAT 1")
    assert (latest.file_name, latest.series_count, latest.instance_count, latest.bytes, latest.sha256) == (
        result.file_name, 2, 6, result.bytes, result.sha256)
    assert _leftover_temps(archive_dir) == []


def test_compression_level_is_applied(store: StateStore, dirs: tuple[Path, Path], tmp_path: Path) -> None:
    download_dir, archive_dir = dirs
    study = _patient(store, download_dir, "P", series=1, instances=1)
    compressible = layout.instance_file(layout.series_dir(download_dir, "P", study, f"{study}.1"), f"{study}.1.1")
    compressible.write_bytes(b"\0" * 200_000)
    stored = build_patient_archive(store, download_dir, tmp_path / "level0", "P", compression_level=0)
    best = build_patient_archive(store, download_dir, archive_dir, "P", compression_level=9)
    assert best.bytes < 10_000 < 200_000 < stored.bytes


def test_not_ready(store: StateStore, dirs: tuple[Path, Path]) -> None:
    download_dir, archive_dir = dirs
    with pytest.raises(ArchiveNotReady, match="'ghost'.*no series"):
        build_patient_archive(store, download_dir, archive_dir, "ghost")
    store.upsert_patients([PatientRecord("lonely")])
    with pytest.raises(ArchiveNotReady, match="lonely"):
        build_patient_archive(store, download_dir, archive_dir, "lonely")

    study = _patient(store, download_dir, "P", series=1)
    _add_series(store, download_dir, "P", study, f"{study}.2", complete=False)
    with pytest.raises(ArchiveNotReady, match=rf"'P'.*1 of 2 series.*{study}\.2 \(pending\)"):
        build_patient_archive(store, download_dir, archive_dir, "P")
    assert not archive_dir.exists() or list(archive_dir.iterdir()) == []
    assert store.latest_archive("P") is None


def test_missing_instance_files_are_not_archived(store: StateStore, dirs: tuple[Path, Path]) -> None:
    download_dir, archive_dir = dirs
    study = _patient(store, download_dir, "P", series=1, instances=3)
    directory = layout.series_dir(download_dir, "P", study, f"{study}.1")
    layout.instance_file(directory, f"{study}.1.2").unlink()
    with pytest.raises(ArchiveNotReady, match=r"2 of 3 files"):
        build_patient_archive(store, download_dir, archive_dir, "P")


def test_up_to_date_and_rebuild_when_file_is_damaged_or_gone(store: StateStore, dirs: tuple[Path, Path]) -> None:
    download_dir, archive_dir = dirs
    _patient(store, download_dir, "P", series=2)
    first = build_patient_archive(store, download_dir, archive_dir, "P")
    mtime = first.path.stat().st_mtime_ns
    again = build_patient_archive(store, download_dir, archive_dir, "P")
    assert again.up_to_date and again.sha256 == first.sha256 and again.bytes == first.bytes
    assert first.path.stat().st_mtime_ns == mtime
    archive_id = store.latest_archive("P").archive_id

    with open(first.path, "ab") as f:  # size no longer matches the record
        f.write(b"junk")
    rebuilt = build_patient_archive(store, download_dir, archive_dir, "P")
    assert not rebuilt.up_to_date and rebuilt.bytes == rebuilt.path.stat().st_size
    assert store.latest_archive("P").archive_id > archive_id
    assert rebuilt.path.exists()  # the superseded record had the same name: its file is the new one

    rebuilt.path.unlink()
    assert not build_patient_archive(store, download_dir, archive_dir, "P").up_to_date
    assert rebuilt.path.is_file()
    assert store.superseded_archives("P") == []


def test_rebuild_same_name_when_a_series_gained_instances(store: StateStore, dirs: tuple[Path, Path]) -> None:
    download_dir, archive_dir = dirs
    study = _patient(store, download_dir, "P", series=1, instances=2)
    first = build_patient_archive(store, download_dir, archive_dir, "P")
    series_uid = f"{study}.1"
    assert store.upsert_series([SeriesRecord(series_uid, study, "P", 1, expected_instances=3)]).reset_to_pending == 1
    with pytest.raises(ArchiveNotReady):
        build_patient_archive(store, download_dir, archive_dir, "P")
    assert store.claim_next_series(["P"], "w", 60).series_instance_uid == series_uid
    _write_instance(layout.series_dir(download_dir, "P", study, series_uid), f"{series_uid}.3", "P")
    assert store.finish_series(series_uid, "w", "complete", 3, 900)

    second = build_patient_archive(store, download_dir, archive_dir, "P")
    assert not second.up_to_date and second.file_name == first.file_name
    assert second.instance_count == 3 and second.removed_superseded == ()
    with zipfile.ZipFile(second.path) as zf:
        assert len(zf.namelist()) == 3 and zf.testzip() is None
    assert store.superseded_archives("P") == []


def test_superseded_and_stray_archives_are_removed(store: StateStore, dirs: tuple[Path, Path]) -> None:
    download_dir, archive_dir = dirs
    study = _patient(store, download_dir, "P", series=1)
    _patient(store, download_dir, "Q", series=1)
    old = build_patient_archive(store, download_dir, archive_dir, "P")
    q = build_patient_archive(store, download_dir, archive_dir, "Q")
    keep = ["P__seriesCount7.zip.bak", "P__seriesCountX.zip", "P__seriesCount.zip", "PP__seriesCount1.zip", "xP__seriesCount1.zip"]
    for name in ["P__seriesCount7.zip", *keep]:
        (archive_dir / name).write_bytes(b"stray")
    _add_series(store, download_dir, "P", study, f"{study}.2")

    new = build_patient_archive(store, download_dir, archive_dir, "P")
    assert new.file_name == "P__seriesCount2.zip"
    assert set(new.removed_superseded) == {old.file_name, "P__seriesCount7.zip"}
    assert not old.path.exists() and not (archive_dir / "P__seriesCount7.zip").exists()
    assert all((archive_dir / name).exists() for name in keep)
    assert q.path.exists()
    assert store.superseded_archives("P") == []
    assert store.latest_archive("Q").file_name == q.file_name


def test_keep_superseded(store: StateStore, dirs: tuple[Path, Path]) -> None:
    download_dir, archive_dir = dirs
    study = _patient(store, download_dir, "P", series=1)
    old = build_patient_archive(store, download_dir, archive_dir, "P")
    _add_series(store, download_dir, "P", study, f"{study}.2")
    new = build_patient_archive(store, download_dir, archive_dir, "P", keep_superseded=True)
    assert new.removed_superseded == () and old.path.exists() and new.path.exists()
    assert [a.file_name for a in store.superseded_archives("P")] == [old.file_name]
    # A later run without keep_superseded cleans up, even though the archive is up to date.
    later = build_patient_archive(store, download_dir, archive_dir, "P")
    assert later.up_to_date and later.removed_superseded == (old.file_name,)
    assert not old.path.exists() and store.superseded_archives("P") == []


def test_patient_prefix_collision(store: StateStore, dirs: tuple[Path, Path]) -> None:
    """Patient "A" with 3 series and patient "A__seriesCount3" never delete each other's zips."""
    download_dir, archive_dir = dirs
    study_a = _patient(store, download_dir, "A", series=3)
    study_b = _patient(store, download_dir, "A__seriesCount3", series=1)
    a3 = build_patient_archive(store, download_dir, archive_dir, "A")
    b1 = build_patient_archive(store, download_dir, archive_dir, "A__seriesCount3")
    assert (a3.file_name, b1.file_name) == ("A__seriesCount3.zip", "A__seriesCount3__seriesCount1.zip")

    _add_series(store, download_dir, "A", study_a, f"{study_a}.4")
    a4 = build_patient_archive(store, download_dir, archive_dir, "A")
    assert a4.removed_superseded == ("A__seriesCount3.zip",)
    assert b1.path.exists()

    (archive_dir / "A__seriesCount3.zip").write_bytes(b"A's stray")  # looks like A's, belongs to A
    _add_series(store, download_dir, "A__seriesCount3", study_b, f"{study_b}.2")
    b2 = build_patient_archive(store, download_dir, archive_dir, "A__seriesCount3")
    assert b2.removed_superseded == ("A__seriesCount3__seriesCount1.zip",)
    assert a4.path.exists() and (archive_dir / "A__seriesCount3.zip").exists()
    with zipfile.ZipFile(b2.path) as zf:
        assert all(n.startswith("A__seriesCount3/") for n in zf.namelist())


@pytest.mark.parametrize("patient_id", ["../..", "a/b", "*", "José Ñ", "x" * 64, ".", "😀" * 64])
def test_hostile_patient_ids_stay_inside_archive_dir(sqlite_url: str, tmp_path: Path, patient_id: str) -> None:
    store = StateStore(sqlite_url)
    store.create_schema()
    download_dir, archive_dir = tmp_path / "dl" / "inner", tmp_path / "zips" / "inner"
    _patient(store, download_dir, patient_id, series=2, instances=2)
    result = build_patient_archive(store, download_dir, archive_dir, patient_id)
    _patient(store, download_dir, "bystander", series=1)
    bystander = build_patient_archive(store, download_dir, archive_dir, "bystander")
    key = layout.patient_key(patient_id)
    assert result.path.parent == archive_dir and result.path.resolve().parent == archive_dir.resolve()
    assert result.file_name == f"{key}__seriesCount2.zip" and "/" not in result.file_name
    with zipfile.ZipFile(result.path) as zf:
        assert len(zf.namelist()) == 4
        assert all(n.split("/")[0] == key and ".." not in n.split("/") for n in zf.namelist())
    zips = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*.zip"))
    assert zips == sorted([result.path.relative_to(tmp_path), bystander.path.relative_to(tmp_path)])
    # A rebuild with one more series removes only this patient's old zip.
    study = store.series_of(patient_id)[0].study_instance_uid
    _add_series(store, download_dir, patient_id, study, f"{study}.3", instances=1)
    again = build_patient_archive(store, download_dir, archive_dir, patient_id)
    assert again.removed_superseded == (result.file_name,)
    assert sorted(p.name for p in archive_dir.iterdir()) == sorted([again.file_name, bystander.file_name])
    store.dispose()


def _corrupt_first_member(path: Path) -> None:
    with zipfile.ZipFile(path) as zf:
        info = zf.infolist()[0]
    with open(path, "r+b") as f:
        f.seek(info.header_offset + 26)
        name_len, extra_len = struct.unpack("<HH", f.read(4))
        f.seek(info.header_offset + 30 + name_len + extra_len + info.compress_size // 2)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0xFF]))


def test_verify_archive_detects_bad_crc(tmp_path: Path) -> None:
    path = tmp_path / "t.zip"
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as zf:
        zf.writestr("a.dcm", os.urandom(1000))
        zf.writestr("b.dcm", os.urandom(10))
    verify_archive(path, {"a.dcm": 1000, "b.dcm": 10})
    with pytest.raises(ArchiveVerificationError, match="b.dcm"):
        verify_archive(path, {"a.dcm": 1000})
    with pytest.raises(ArchiveVerificationError, match="bytes"):
        verify_archive(path, {"a.dcm": 1000, "b.dcm": 11})
    _corrupt_first_member(path)
    with pytest.raises(ArchiveVerificationError, match="CRC"):
        verify_archive(path, {"a.dcm": 1000, "b.dcm": 10})
    (tmp_path / "not.zip").write_bytes(b"nope")
    with pytest.raises(ArchiveVerificationError):
        verify_archive(tmp_path / "not.zip", {})


def test_failed_verification_keeps_previous_archive(
    store: StateStore, dirs: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    download_dir, archive_dir = dirs
    study = _patient(store, download_dir, "P", series=1)
    previous = build_patient_archive(store, download_dir, archive_dir, "P")
    _add_series(store, download_dir, "P", study, f"{study}.2")
    real_write = archive._write_zip

    def corrupting_write(path: Path, members, level: int) -> None:
        real_write(path, members, level)
        _corrupt_first_member(path)

    monkeypatch.setattr(archive, "_write_zip", corrupting_write)
    with pytest.raises(ArchiveVerificationError):
        build_patient_archive(store, download_dir, archive_dir, "P")
    assert sorted(p.name for p in archive_dir.iterdir()) == [previous.file_name]
    assert _sha256(previous.path) == previous.sha256
    assert store.latest_archive("P").file_name == previous.file_name

    def racing_write(path: Path, members, level: int) -> None:  # a file lands while zipping
        real_write(path, members, level)
        _write_instance(layout.series_dir(download_dir, "P", study, f"{study}.2"), f"{study}.2.99", "P")

    monkeypatch.setattr(archive, "_write_zip", racing_write)
    with pytest.raises(ArchiveVerificationError, match=r"missing: .*\.2\.99\.dcm"):
        build_patient_archive(store, download_dir, archive_dir, "P")
    assert sorted(p.name for p in archive_dir.iterdir()) == [previous.file_name]

    monkeypatch.setattr(archive, "_write_zip", real_write)
    fixed = build_patient_archive(store, download_dir, archive_dir, "P")
    assert fixed.instance_count == 7 and fixed.removed_superseded == (previous.file_name,)


def test_archive_problems_finds_missing_resized_and_altered_zips(store: StateStore, dirs: tuple[Path, Path]) -> None:
    from dicom_assets.archive import archive_problems

    download_dir, archive_dir = dirs
    _patient(store, download_dir, "P-CHECK")
    result = build_patient_archive(store, download_dir, archive_dir, "P-CHECK")
    record = store.latest_archive("P-CHECK")
    assert archive_problems(archive_dir, record) == []
    data = bytearray(result.path.read_bytes())
    data[100] ^= 0xFF  # same size, one byte flipped
    result.path.write_bytes(bytes(data))
    assert archive_problems(archive_dir, record) == [f"{result.file_name} has changed since it was written (SHA-256 differs)"]
    result.path.write_bytes(bytes(data[:-1]))
    assert "bytes" in archive_problems(archive_dir, record)[0]
    result.path.unlink()
    assert "missing" in archive_problems(archive_dir, record)[0]


# -- instances larger than a zip chunk (tomosynthesis, cines, whole-slide images) ------------------

MiB = 1 << 20


def _write_multiframe(path: Path, sop_uid: str, patient_id: str, frames: int, rows: int = 512, columns: int = 512) -> None:
    """A multi-frame 16-bit instance whose pixel data deflates about 2:1 (noise in 12 bits)."""
    rng = random.Random(sop_uid)
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = MULTIFRAME_WORD
    ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
    ds.SOPClassUID = MULTIFRAME_WORD
    ds.SOPInstanceUID = sop_uid
    ds.PatientID = patient_id
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.Rows, ds.Columns, ds.NumberOfFrames = rows, columns, frames
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    table = bytes(i % 16 for i in range(256))  # low byte: 4 bits of noise; high byte: a few levels
    pixels = bytearray(rng.randbytes(rows * columns * 2 * frames).translate(table))
    pixels[1::2] = bytes(b & 0x03 for b in pixels[1::2])
    ds.PixelData = bytes(pixels)
    ds.save_as(path, enforce_file_format=True)


def _sha256_streamed(stream: io.BufferedIOBase) -> str:
    digest = hashlib.sha256()
    while chunk := stream.read(4 * MiB):
        digest.update(chunk)
    return digest.hexdigest()


def test_archives_an_instance_larger_than_a_zip_chunk(store: StateStore, dirs: tuple[Path, Path]) -> None:
    download_dir, archive_dir = dirs
    study = _patient(store, download_dir, "TOMO", series=2, instances=3)
    directory = layout.series_dir(download_dir, "TOMO", study, f"{study}.2")
    big = layout.instance_file(directory, f"{study}.2.2")
    _write_multiframe(big, f"{study}.2.2", "TOMO", frames=48)  # 25 MB: streamed in chunks
    assert big.stat().st_size > CHUNK_SIZE

    result = build_patient_archive(store, download_dir, archive_dir, "TOMO")
    assert result.sha256 == _sha256(result.path) and result.bytes == result.path.stat().st_size
    with zipfile.ZipFile(result.path) as zf:
        names = zf.namelist()
        assert names == [f"TOMO/{study}/{study}.{i}/{study}.{i}.{j}.dcm" for i in (1, 2) for j in (1, 2, 3)]
        info = zf.getinfo(names[4])
        assert info.flag_bits & 0x08 and info.file_size == big.stat().st_size  # bit 3: data descriptor
        with zf.open(info) as member, open(big, "rb") as original:
            assert _sha256_streamed(member) == _sha256_streamed(original)
        ds = pydicom.dcmread(io.BytesIO(zf.read(names[4])), stop_before_pixels=True)
        assert ds.SOPInstanceUID == f"{study}.2.2" and ds.NumberOfFrames == 48
    done = subprocess.run(["unzip", "-tq", str(result.path)], capture_output=True, text=True)
    assert done.returncode == 0 and "No errors" in done.stdout, done.stdout + done.stderr


_VERIFY_CHILD = """
import sys
from pathlib import Path
from dicom_assets.archive import verify_archive

def status(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))

before = status("VmRSS")
verify_archive(Path(sys.argv[1]), {"big.dcm": int(sys.argv[2])})
print(before, status("VmHWM"))
"""


def test_verify_archive_inflates_a_1000_to_1_member_in_bounded_memory(tmp_path: Path) -> None:
    """2 GiB of zeros deflate to ~2 MB: the read-back inflates it piece by piece (one 4 MiB read
    used to inflate to the whole member at once). The child's own RSS growth is the check."""
    size = 2 << 30
    big = tmp_path / "big.dcm"
    with open(big, "wb") as f:  # sparse: costs no disk
        f.truncate(size)
        f.write(b"DICM")
    target = tmp_path / "big.zip"
    with open(target, "wb") as handle:
        write_zip(handle, [(big, "big.dcm")], level=6)
    assert target.stat().st_size < 16 * MiB
    child = [sys.executable, "-c", _VERIFY_CHILD, str(target)]
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run([*child, str(size)], capture_output=True, text=True, cwd=root, check=False)
    assert done.returncode == 0, done.stderr
    before, peak = map(int, done.stdout.split()[-2:])
    assert peak - before < 256 * MiB, f"RSS grew by {(peak - before) / MiB:.0f} MiB verifying a 2 GiB member"
    wrong = subprocess.run([*child, str(size + 1)], capture_output=True, text=True, cwd=root, check=False)
    assert wrong.returncode != 0 and "ArchiveVerificationError" in wrong.stderr
