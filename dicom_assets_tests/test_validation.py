"""validate_patient / write_validation_csv with real files and a real state DB."""

from __future__ import annotations

import csv
import dataclasses
from pathlib import Path

import pytest

from dicom_assets import layout
from dicom_assets.store import PatientRecord, SeriesRecord, StateStore, StudyRecord
from dicom_assets.validation import SeriesValidation, validate_patient, write_validation_csv

STUDY = "1.2.3"


def _files(download_dir: Path, patient_id: str, series_uid: str, sops: list[str]) -> Path:
    directory = layout.series_dir(download_dir, patient_id, STUDY, series_uid)
    directory.mkdir(parents=True, exist_ok=True)
    for sop in sops:
        layout.instance_file(directory, sop).write_bytes(b"DICM" + sop.encode())
    return directory


@pytest.fixture
def seeded(store: StateStore, tmp_path: Path) -> tuple[StateStore, Path]:
    """Patient "a/b": series .1 ok, .2 short, .3 unknown count, .4 nothing on disk, .5 extra file."""
    download_dir = tmp_path / "downloads"
    store.upsert_patients([PatientRecord("a/b")])
    store.upsert_studies([StudyRecord(STUDY, "a/b")])
    store.upsert_series(
        [
            SeriesRecord(f"{STUDY}.1", STUDY, "a/b", 1, "CT", expected_instances=2),
            SeriesRecord(f"{STUDY}.2", STUDY, "a/b", 2, "CT", expected_instances=3),
            SeriesRecord(f"{STUDY}.3", STUDY, "a/b", 3, "SR", expected_instances=None),
            SeriesRecord(f"{STUDY}.4", STUDY, "a/b", 4, "MR", expected_instances=1),
            SeriesRecord(f"{STUDY}.5", STUDY, "a/b", 5, "MR", expected_instances=2),
        ]
    )
    # The DB claims 99 downloaded instances for series 1: validation must count files instead.
    claimed = store.claim_next_series(["a/b"], "w", 60)
    assert store.finish_series(claimed.series_instance_uid, "w", "complete", 99, 1)
    directory = _files(download_dir, "a/b", f"{STUDY}.1", [f"{STUDY}.1.1", f"{STUDY}.1.2"])
    (directory / f".{STUDY}.1.3.dcm.abc.part").write_bytes(b"in flight")  # not a received instance
    (directory / "notes.txt").write_text("not an instance")
    _files(download_dir, "a/b", f"{STUDY}.2", [f"{STUDY}.2.1", f"{STUDY}.2.2"])
    _files(download_dir, "a/b", f"{STUDY}.3", [f"{STUDY}.3.1"])
    _files(download_dir, "a/b", f"{STUDY}.5", [f"{STUDY}.5.1", f"{STUDY}.5.9"])
    return store, download_dir


def test_outcomes_from_disk_counts(seeded: tuple[StateStore, Path]) -> None:
    store, download_dir = seeded
    rows = validate_patient(store, download_dir, "a/b")
    summary = [(r.series_instance_uid, r.downloaded_instances, r.expected_instances, r.outcome) for r in rows]
    assert summary == [
        (f"{STUDY}.1", 2, 2, "ok"),
        (f"{STUDY}.2", 2, 3, "mismatch"),
        (f"{STUDY}.3", 1, None, "unknown_expected"),
        (f"{STUDY}.4", 0, 1, "mismatch"),
        (f"{STUDY}.5", 2, 2, "ok"),
    ]
    first = rows[0]
    assert (first.patient_id, first.study_instance_uid, first.series_number, first.modality, first.download_status) == (
        "a/b", STUDY, 1, "CT", "complete")
    assert all(r.missing_sop_uids is None and r.extra_sop_uids is None for r in rows)
    assert validate_patient(store, download_dir, "nobody") == []


def test_expected_sop_uids_give_missing_and_extra(seeded: tuple[StateStore, Path]) -> None:
    store, download_dir = seeded
    expected = {
        f"{STUDY}.2": [f"{STUDY}.2.1", f"{STUDY}.2.2", f"{STUDY}.2.3"],
        f"{STUDY}.3": {f"{STUDY}.3.1"},
        f"{STUDY}.5": (f"{STUDY}.5.1", f"{STUDY}.5.2"),  # same count as on disk, different UIDs
    }
    rows = {r.series_instance_uid: r for r in validate_patient(store, download_dir, "a/b", expected)}
    assert rows[f"{STUDY}.1"].missing_sop_uids is None  # not in the mapping
    assert (rows[f"{STUDY}.2"].missing_sop_uids, rows[f"{STUDY}.2"].extra_sop_uids) == ((f"{STUDY}.2.3",), ())
    assert rows[f"{STUDY}.2"].outcome == "mismatch"
    assert (rows[f"{STUDY}.3"].missing_sop_uids, rows[f"{STUDY}.3"].extra_sop_uids) == ((), ())
    assert rows[f"{STUDY}.3"].outcome == "unknown_expected"
    five = rows[f"{STUDY}.5"]
    assert (five.missing_sop_uids, five.extra_sop_uids, five.outcome) == ((f"{STUDY}.5.2",), (f"{STUDY}.5.9",), "mismatch")


def test_write_validation_csv(seeded: tuple[StateStore, Path], tmp_path: Path) -> None:
    store, download_dir = seeded
    rows = validate_patient(store, download_dir, "a/b", {f"{STUDY}.5": [f"{STUDY}.5.2", f"{STUDY}.5.3"]})
    out = tmp_path / "reports" / "deep" / "validation.csv"
    out.parent.mkdir(parents=True)
    out.write_text("old content\n")
    write_validation_csv(rows, out)
    with open(out, newline="", encoding="utf-8") as f:
        table = list(csv.DictReader(f))
    assert list(table[0]) == [f.name for f in dataclasses.fields(SeriesValidation)]
    assert len(table) == 5
    assert table[0]["series_number"] == "1" and table[0]["outcome"] == "ok"
    assert table[0]["missing_sop_uids"] == "" and table[2]["expected_instances"] == ""
    assert table[4]["missing_sop_uids"] == f"{STUDY}.5.2\\{STUDY}.5.3"
    assert table[4]["extra_sop_uids"] == f"{STUDY}.5.1\\{STUDY}.5.9"
    assert [p.name for p in out.parent.iterdir()] == ["validation.csv"]

    fresh = tmp_path / "new" / "dir" / "v.csv"
    write_validation_csv([], fresh)
    assert fresh.read_text().strip().split(",")[0] == "patient_id"


def test_write_validation_csv_is_atomic(seeded: tuple[StateStore, Path], tmp_path: Path,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    store, download_dir = seeded
    rows = validate_patient(store, download_dir, "a/b")
    out = tmp_path / "validation.csv"
    out.write_text("previous\n")

    def failing_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(layout.os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk full"):
        write_validation_csv(rows, out)
    assert out.read_text() == "previous\n"
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.endswith(".part")) == []


def test_transcoded_series_are_shown_and_lossy_ones_fail(seeded: tuple[StateStore, Path]) -> None:
    """What the PACS sent, as recorded per instance: a lossless transcode is shown, a lossy one
    (from a lossless original) is an outcome of its own that the asset check fails on."""
    store, download_dir = seeded
    ct, explicit, j2k_lossless, jpeg = "1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.50"
    store.record_instances(f"{STUDY}.1", {f"{STUDY}.1.1": (ct, explicit, 6), f"{STUDY}.1.2": (ct, explicit, 6)},
                           {f"{STUDY}.1.1": j2k_lossless})  # fmt: skip
    _files(download_dir, "a/b", f"{STUDY}.4", [f"{STUDY}.4.1"])
    store.record_instances(f"{STUDY}.4", {f"{STUDY}.4.1": (ct, jpeg, 6)}, {f"{STUDY}.4.1": explicit})
    rows = {r.series_instance_uid: r for r in validate_patient(store, download_dir, "a/b")}
    assert (rows[f"{STUDY}.1"].outcome, rows[f"{STUDY}.1"].transcoded_instances, rows[f"{STUDY}.1"].transfer_syntaxes) == (
        "transcoded", 1, explicit)
    assert (rows[f"{STUDY}.4"].outcome, rows[f"{STUDY}.4"].lossy_transcoded_instances) == ("lossy_transcode", 1)
