"""The parallel ZIP writer's output is an ordinary ZIP: Python's reader and Info-ZIP's unzip agree."""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import subprocess
import zipfile
from pathlib import Path

import pytest

from dicom_assets.zipwriter import write_zip


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
