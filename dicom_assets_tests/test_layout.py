"""Safe, reversible names: hostile PatientIDs and UIDs never leave the configured directory."""

from __future__ import annotations

from pathlib import Path

import pytest

from dicom_assets.layout import (
    UnsafeNameError,
    archive_name,
    archive_pattern,
    check_uid,
    instance_file,
    instances_on_disk,
    patient_id_from_key,
    patient_key,
    series_dir,
    temp_name,
)

HOSTILE_IDS = ["a b/c", "..", ".", "../..", "/etc/passwd", "*", "?", "%41", "José Ñ", "患者" * 32, "x" * 64, "", "a\\b", "%EMPTY", "-rf", "~"]


@pytest.mark.parametrize("pid", HOSTILE_IDS)
def test_patient_key_round_trips_and_is_one_safe_component(pid: str, tmp_path: Path) -> None:
    key = patient_key(pid)
    assert patient_id_from_key(key) == pid
    assert "/" not in key and "\x00" not in key and key not in (".", "..") and "..." not in key
    assert not key.startswith(".")
    directory = series_dir(tmp_path, pid, "1.2.3", "1.2.3.4")
    assert tmp_path.resolve() in directory.resolve().parents
    assert len(archive_name(pid, "__seriesCount", 12345).encode()) < 255


def test_plain_ids_are_kept_as_they_are() -> None:
    assert patient_key("AA-BB-CC") == "AA-BB-CC"
    assert archive_name("AA-BB-CC", "__seriesCount", 7) == "AA-BB-CC__seriesCount7.zip"


def test_distinct_ids_never_share_a_key() -> None:
    ids = HOSTILE_IDS + ["a%20b/c", "a b%2Fc", "A", "a"]
    assert len({patient_key(i) for i in ids}) == len(ids)


def test_overlong_keys_are_hashed_and_still_short() -> None:
    key = patient_key("😀" * 64)
    assert key.startswith("%SHA-") and len(key.encode()) < 100
    with pytest.raises(UnsafeNameError, match="hashed key"):
        patient_id_from_key(key)


def test_ids_dicom_cannot_hold_are_refused() -> None:
    with pytest.raises(UnsafeNameError, match="NUL"):
        patient_key("a\x00b")
    with pytest.raises(UnsafeNameError, match="longer than 64"):
        patient_key("x" * 65)


def test_archive_pattern_matches_only_that_patient() -> None:
    pattern = archive_pattern("A", "__seriesCount")
    assert pattern.match("A__seriesCount3.zip")
    assert not pattern.match("A__seriesCount3__seriesCount2.zip")
    assert not pattern.match("AB__seriesCount3.zip")
    assert not pattern.match("A__seriesCount3.zip.part")


@pytest.mark.parametrize("uid", ["..", ".", "1..2", "../1", "1.2/3", "1.2.3.", ".1.2", "a.b", "1" * 65, "", "1.2\x00"])
def test_bad_uids_are_refused(uid: str, tmp_path: Path) -> None:
    with pytest.raises(UnsafeNameError):
        check_uid(uid)
    with pytest.raises(UnsafeNameError):
        series_dir(tmp_path, "P", "1.2", uid)
    with pytest.raises(UnsafeNameError):
        instance_file(tmp_path, uid)


def test_instances_on_disk_ignores_temp_files_and_strangers(tmp_path: Path) -> None:
    final = instance_file(tmp_path, "1.2.3.4")
    final.write_bytes(b"x" * 10)
    temp_name(instance_file(tmp_path, "1.2.3.5"), "tok").write_bytes(b"partial")
    (tmp_path / "notes.txt").write_text("hi")
    (tmp_path / "subdir.dcm").mkdir()
    assert instances_on_disk(tmp_path) == {"1.2.3.4": 10}
    assert instances_on_disk(tmp_path / "missing") == {}


def test_stale_temp_files_of_dead_writers_are_removed(tmp_path: Path) -> None:
    import os
    import subprocess

    from dicom_assets.layout import _HOST, remove_stale_temps, temp_token

    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = tmp_path / f".1.2.3.dcm.{_HOST}~{dead.pid}~abcd.part"
    live = temp_name(tmp_path / "1.2.4.dcm", temp_token())  # this process: alive
    foreign = tmp_path / f".1.2.5.dcm.otherhost~{dead.pid}~abcd.part"  # another machine's: unknowable
    final = tmp_path / "1.2.6.dcm"
    for path in (stale, live, foreign, final):
        path.write_bytes(b"x")
    assert str(os.getpid()) in live.name
    assert remove_stale_temps(tmp_path) == 1
    assert not stale.exists() and live.exists() and foreign.exists() and final.exists()
    assert remove_stale_temps(tmp_path / "missing") == 0
