"""The parallel ZIP writer's output is an ordinary ZIP: Python's reader and Info-ZIP's unzip agree."""

from __future__ import annotations

import hashlib
import io
import os
import random
import shutil
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from isal import isal_zlib

from dicom_assets.zipwriter import CHUNK_SIZE, write_zip


def _members(tmp_path: Path) -> list[tuple[Path, str]]:
    rng = __import__("random").Random(5)
    out = []
    for i in range(40):
        path = tmp_path / f"f{i}.dcm"
        # compressible, random-ish, empty and incompressible members
        data = bytes(rng.getrandbits(8) for _ in range(5000)) if i % 7 == 0 else (b"CT" * (i * 300))
        path.write_bytes(data)
        out.append((path, f"PAT%2F1/1.2.{i}/é{i}.dcm"))
    return out


@pytest.mark.parametrize("level", [0, 1, 6, 9])
def test_every_member_round_trips_with_zipfile(tmp_path: Path, level: int) -> None:
    members = _members(tmp_path)
    buffer = io.BytesIO()
    sha = write_zip(buffer, members, level=level, threads=2)
    assert sha == hashlib.sha256(buffer.getvalue()).hexdigest()
    with zipfile.ZipFile(io.BytesIO(buffer.getvalue())) as zf:
        assert zf.testzip() is None
        assert [i.filename for i in zf.infolist()] == [name for _, name in members]
        for path, name in members:
            assert zf.read(name) == path.read_bytes()
        methods = {i.compress_type for i in zf.infolist()}
    assert methods == ({zipfile.ZIP_STORED} if level == 0 else {zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED})


def test_info_zip_unzip_accepts_it(tmp_path: Path) -> None:
    unzip = shutil.which("unzip")
    assert unzip, "Info-ZIP unzip is needed (Debian package unzip)"
    target = tmp_path / "a.zip"
    members = _members(tmp_path)
    with open(target, "wb") as handle:
        write_zip(handle, members, level=6)
    done = subprocess.run([unzip, "-tq", str(target)], capture_output=True, text=True)
    assert done.returncode == 0 and "No errors" in done.stdout
    out = tmp_path / "out"
    subprocess.run([unzip, "-q", str(target), "-d", str(out)], check=True)
    assert (out / "PAT%2F1" / "1.2.3" / "é3.dcm").read_bytes() == members[3][0].read_bytes()


def test_compresses_like_zlib_level_6(tmp_path: Path) -> None:
    members = _members(tmp_path)
    ours, theirs = io.BytesIO(), io.BytesIO()
    write_zip(ours, members, level=6)
    with zipfile.ZipFile(theirs, "w", zipfile.ZIP_DEFLATED, compresslevel=6) as zf:
        for path, name in members:
            zf.write(path, name)
    assert len(ours.getvalue()) <= len(theirs.getvalue()) * 1.03
    assert os.path.getsize(members[1][0]) > 0


# -- members larger than a chunk: streamed, with a data descriptor ---------------------------------

MiB = 1 << 20
_DESCRIPTOR_FLAG = 0x08


def _unzip() -> str:
    unzip = shutil.which("unzip")
    assert unzip, "Info-ZIP unzip is needed (Debian package unzip)"
    return unzip


def _unzip_test(archive: Path) -> None:
    done = subprocess.run([_unzip(), "-tq", str(archive)], capture_output=True, text=True)
    assert done.returncode == 0 and "No errors" in done.stdout, done.stdout + done.stderr


def _compressible_file(path: Path, size: int, seed: int = 7) -> Path:
    """``size`` bytes of non-zero data that deflates about 2:1 (16 symbols), written 1 MiB at a time."""
    rng = random.Random(seed)
    table = bytes(65 + (i % 16) for i in range(256))
    with open(path, "wb") as f:
        for offset in range(0, size, MiB):
            f.write(rng.randbytes(min(MiB, size - offset)).translate(table))
    return path


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(8 * MiB):
            digest.update(chunk)
    return digest.hexdigest()


def _member_sha256(zf: zipfile.ZipFile, name: str) -> str:
    """Read through zipfile (which checks the member's CRC at its end) and hash."""
    digest = hashlib.sha256()
    with zf.open(name) as member:
        while chunk := member.read(8 * MiB):
            digest.update(chunk)
    return digest.hexdigest()


def _descriptor(archive: Path, info: zipfile.ZipInfo) -> tuple[int, int, int]:
    """(CRC, compressed size, size) from the data descriptor after a bit-3 member's data."""
    with open(archive, "rb") as f:
        f.seek(info.header_offset + 26)
        name_length, extra_length = struct.unpack("<HH", f.read(4))
        f.seek(info.header_offset + 30 + name_length + extra_length + info.compress_size)
        signature = f.read(4)
        assert signature == b"PK\x07\x08"
        wide = info.file_size >= 0xFFFFFFFF or extra_length > 0
        return struct.unpack("<IQQ" if wide else "<III", f.read(20 if wide else 12))


def test_member_above_the_chunk_size_round_trips_through_zipfile_and_unzip(tmp_path: Path) -> None:
    big = _compressible_file(tmp_path / "cine.dcm", 200 * MiB + 12345)
    target = tmp_path / "a.zip"
    with open(target, "wb") as handle:
        sha = write_zip(handle, [(big, "P/1/2/cine.dcm")], level=6, threads=2)
    assert sha == _file_sha256(target)
    assert target.stat().st_size < big.stat().st_size * 0.7  # deflated, not stored
    with zipfile.ZipFile(target) as zf:
        (info,) = zf.infolist()
        assert info.flag_bits & _DESCRIPTOR_FLAG and info.compress_type == zipfile.ZIP_DEFLATED
        assert info.file_size == big.stat().st_size
        assert _member_sha256(zf, info.filename) == _file_sha256(big)
        assert _descriptor(target, info) == (info.CRC, info.compress_size, info.file_size)
    _unzip_test(target)
    unzipped = subprocess.run([_unzip(), "-p", str(target), "P/1/2/cine.dcm"], capture_output=True, check=True).stdout
    assert hashlib.sha256(unzipped).hexdigest() == _file_sha256(big)


@pytest.mark.parametrize("level", [0, 1, 6, 9])
def test_streamed_members_at_chunk_boundaries(tmp_path: Path, level: int) -> None:
    """Sizes around a (small) chunk size, compressible and incompressible, every level."""
    chunk = 64 * 1024
    sizes = [chunk, chunk + 1, 3 * chunk, 3 * chunk - 1, 10 * chunk + 7]
    members = []
    for i, size in enumerate(sizes):
        path = tmp_path / f"m{i}.dcm"
        if i % 2:
            path.write_bytes(os.urandom(size))
        else:
            _compressible_file(path, size, seed=i)
        members.append((path, f"s/m{i}.dcm"))
    target = tmp_path / "b.zip"
    with open(target, "wb") as handle:
        sha = write_zip(handle, members, level=level, threads=2, chunk_size=chunk)
    assert sha == _file_sha256(target)
    with zipfile.ZipFile(target) as zf:
        assert zf.testzip() is None
        infos = zf.infolist()
        assert [i.filename for i in infos] == [name for _, name in members]
        for (path, name), info in zip(members, infos, strict=True):
            assert zf.read(name) == path.read_bytes()
            streamed = path.stat().st_size > chunk
            assert bool(info.flag_bits & _DESCRIPTOR_FLAG) == streamed
            if level == 0 or streamed:  # a whole member is stored when deflate does not shrink it
                assert info.compress_type == (zipfile.ZIP_DEFLATED if level else zipfile.ZIP_STORED)
            if streamed:
                assert _descriptor(target, info) == (info.CRC, info.compress_size, info.file_size)
        if level:  # incompressible data is not blown up by streaming it deflated
            assert infos[1].compress_size <= infos[1].file_size * 1.01
    _unzip_test(target)


def test_many_small_members_and_a_big_one_keep_their_order(tmp_path: Path) -> None:
    small = _members(tmp_path)
    big = _compressible_file(tmp_path / "tomo.dcm", 20 * MiB + 3)  # > CHUNK_SIZE: streamed
    members = small[:25] + [(big, "PAT%2F1/1.2.99/tomo.dcm")] + small[25:]
    target = tmp_path / "c.zip"
    with open(target, "wb") as handle:
        sha = write_zip(handle, members, level=6, threads=2)
    assert big.stat().st_size > CHUNK_SIZE
    assert sha == _file_sha256(target)
    with zipfile.ZipFile(target) as zf:
        assert zf.testzip() is None
        assert [i.filename for i in zf.infolist()] == [name for _, name in members]
        for path, name in members:
            assert zf.read(name) == path.read_bytes()
        assert zf.getinfo("PAT%2F1/1.2.99/tomo.dcm").flag_bits & _DESCRIPTOR_FLAG
    _unzip_test(target)


def _sparse_file(path: Path, size: int, marks: dict[int, bytes]) -> int:
    """A sparse ``size``-byte file of zeros with ``marks`` written at their offsets (inside it);
    returns its CRC-32, computed from that description, not by reading the file back."""
    with open(path, "wb") as f:
        f.truncate(size)
        for offset, data in marks.items():
            f.seek(offset)
            f.write(data)
    assert path.stat().st_size == size
    zeros, crc = bytes(8 * MiB), 0
    for start in range(0, size, len(zeros)):
        block = zeros[: min(len(zeros), size - start)]
        touched = {o: d for o, d in marks.items() if o < start + len(block) and o + len(d) > start}
        if touched:
            buffer = bytearray(block)
            for o, d in touched.items():
                lo, hi = max(o, start), min(o + len(d), start + len(block))
                buffer[lo - start : hi - start] = d[lo - o : hi - o]
            block = bytes(buffer)
        crc = isal_zlib.crc32(block, crc)  # zlib's would take seconds for 4 GiB
    return crc


_OVER_4_GIB = (1 << 32) + 3 * MiB + 5


@pytest.fixture(scope="module")
def over_4_gib(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, int]:
    """A sparse member just over 4 GiB and its CRC-32, shared by the tests that zip it (its
    first read fills 4 GiB of page cache, the costly part; later ones find it there)."""
    path = tmp_path_factory.mktemp("over-4-gib") / "wsi.dcm"
    marks = {0: b"DICM", (1 << 32) - 2: b"across 4 GiB", _OVER_4_GIB - 4: b"last"}
    return path, _sparse_file(path, _OVER_4_GIB, marks)


@pytest.mark.timeout(180)
@pytest.mark.parametrize("level", [6, 0], ids=["deflated-member-over-4GiB", "stored-archive-over-4GiB"])
def test_member_over_4_gib_makes_a_zip64_archive(tmp_path: Path, over_4_gib: tuple[Path, int], level: int) -> None:
    """Deflated, the > 4 GiB member is ZIP64 in a small zip: zipfile inflates all of it (and
    checks its CRC), ``unzip -tq`` tests the archive. Stored, the archive itself passes 4 GiB, so
    the member after it, the central directory and the end records need ZIP64 too; ``unzip -tq``
    then tests that last member (reached through the ZIP64 records), since testing 4 GiB of
    stored zeros again would only repeat the deflated case at unzip's slow CRC speed."""
    big, crc = over_4_gib
    after = tmp_path / "after.dcm"
    after.write_bytes(b"after the big one" * 100)
    target = tmp_path / "big.zip"
    try:
        with open(target, "wb") as handle:
            sha = write_zip(handle, [(big, "P/big.dcm"), (after, "P/after.dcm")], level=level, threads=2)
        with zipfile.ZipFile(target) as zf:
            info, last = zf.infolist()
            assert (info.filename, info.file_size, info.CRC) == ("P/big.dcm", _OVER_4_GIB, crc)
            assert info.flag_bits & _DESCRIPTOR_FLAG
            assert _descriptor(target, info) == (crc, info.compress_size, _OVER_4_GIB)
            assert zf.read(last) == after.read_bytes()
            with zf.open(info) as member:
                assert member.read(4) == b"DICM"
                if level:  # zipfile checks the CRC when it reaches the end
                    read = 4
                    while chunk := member.read(16 * MiB):
                        read += len(chunk)
                    assert read == _OVER_4_GIB
        if level:
            assert info.compress_type == zipfile.ZIP_DEFLATED and target.stat().st_size < 64 * MiB
            assert sha == _file_sha256(target)
            _unzip_test(target)
        else:
            assert last.header_offset > 0xFFFFFFFF and target.stat().st_size > 0xFFFFFFFF
            done = subprocess.run([_unzip(), "-tq", str(target), "P/after.dcm"], capture_output=True, text=True)
            assert done.returncode == 0 and "No errors" in done.stdout, done.stdout + done.stderr
            listed = subprocess.run([_unzip(), "-Z1", str(target)], capture_output=True, text=True, check=True)
            assert listed.stdout.split() == ["P/big.dcm", "P/after.dcm"]
    finally:
        target.unlink(missing_ok=True)  # pytest keeps the last runs' tmp dirs: drop the 4 GiB zip


_PEAK_RSS_CHILD = """
import sys
from pathlib import Path
from dicom_assets.zipwriter import write_zip

def status(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))

before = status("VmRSS")  # the package imports Dagster: ~120 MB before any zip
with open(sys.argv[2], "wb") as out:
    write_zip(out, [(Path(sys.argv[1]), "big.dcm")], level=6, threads=2)
print(before, status("VmHWM"))
"""


def test_streaming_a_1_gb_member_holds_a_few_chunks_not_the_member(tmp_path: Path) -> None:
    """Bounded memory is what streaming is for (a correctness property, not a speed target):
    a child archiving a 1 GiB member grows far less than the member's size (the whole-read
    writer grew by twice it). VmHWM is the child's own high-water mark, reset at exec."""
    big, target = tmp_path / "big.dcm", tmp_path / "big.zip"
    try:
        _compressible_file(big, 1 << 30)
        done = subprocess.run(
            [sys.executable, "-c", _PEAK_RSS_CHILD, str(big), str(target)],
            capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1], check=False,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        before, peak = map(int, done.stdout.split()[-2:])
        with zipfile.ZipFile(target) as zf:
            (info,) = zf.infolist()
            assert info.file_size == 1 << 30 and info.compress_size < (1 << 30) * 0.7
        assert peak - before < (1 << 30) // 4, f"RSS grew by {(peak - before) / MiB:.0f} MiB archiving a 1 GiB member"
    finally:  # pytest keeps the last runs' tmp dirs: do not leave 1.6 GB behind
        big.unlink(missing_ok=True)
        target.unlink(missing_ok=True)
