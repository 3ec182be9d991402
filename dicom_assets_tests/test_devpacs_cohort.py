"""The synthetic cohort generator: hierarchy, headers, pixels, determinism, hostile IDs, add_series."""

from __future__ import annotations

import re
from collections import defaultdict
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian

from dicom_assets.devpacs import CohortSpec, CohortSummary, add_series, generate_cohort

UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")
LONG_ID = "a long id/" + "x" * 54  # 64 characters, the LO maximum
HOSTILE_IDS = ("a b/c", "..", "*", "José/Ñ", LONG_ID)
SMALL = dict(rows=32, columns=32)


def _files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


def _read_all(root: Path) -> list[pydicom.Dataset]:
    return [pydicom.dcmread(p) for p in _files(root)]


@pytest.fixture
def cohort(tmp_path: Path) -> tuple[Path, CohortSummary]:
    out = tmp_path / "cohort"
    spec = CohortSpec(patients=2, studies_per_patient=2, series_per_study=3, slices_per_series=4, seed=7, **SMALL)
    return out, generate_cohort(out, spec)


def test_summary_matches_files_on_disk(cohort: tuple[Path, CohortSummary]) -> None:
    out, summary = cohort
    files = _files(out)
    assert summary.patients == ("DEMO0001", "DEMO0002")
    assert summary.studies == 4
    assert len(summary.series) == 12
    assert summary.instances == 48 == len(files)
    assert summary.bytes == sum(p.stat().st_size for p in files)
    assert {p.stem for p in files} == {uid for s in summary.series for uid in s.sop_instance_uids}
    assert not [p for p in out.rglob(".*")], "no temporary files left behind"


def test_uid_hierarchy_and_layout(cohort: tuple[Path, CohortSummary]) -> None:
    out, summary = cohort
    by_series = {s.series_instance_uid: s for s in summary.series}
    frames: dict[str, set[str]] = defaultdict(set)
    for path in _files(out):
        ds = pydicom.dcmread(path)
        series = by_series[ds.SeriesInstanceUID]
        # <out>/<StudyInstanceUID>/<SeriesInstanceUID>/<SOPInstanceUID>.dcm
        assert path.relative_to(out).parts == (ds.StudyInstanceUID, ds.SeriesInstanceUID, f"{ds.SOPInstanceUID}.dcm")
        assert ds.StudyInstanceUID == series.study_instance_uid
        assert ds.PatientID == series.patient_id
        assert ds.SeriesNumber == series.series_number
        assert ds.SOPClassUID == CTImageStorage == ds.file_meta.MediaStorageSOPClassUID
        assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
        assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
        for uid in (ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID, ds.FrameOfReferenceUID):
            assert UID.match(uid) and len(uid) <= 64
        frames[ds.StudyInstanceUID].add(ds.FrameOfReferenceUID)
    assert all(len(f) == 1 for f in frames.values()), "one frame of reference per study"
    all_uids = [uid for s in summary.series for uid in (s.series_instance_uid, *s.sop_instance_uids)]
    assert len(all_uids) == len(set(all_uids))


def test_ct_headers_are_realistic(cohort: tuple[Path, CohortSummary]) -> None:
    out, summary = cohort
    datasets = _read_all(out)
    for ds in datasets:
        assert ds.Modality == "CT"
        assert ds.BitsAllocated == 16 and ds.BitsStored in (12, 16) and ds.HighBit == ds.BitsStored - 1
        assert ds.RescaleIntercept == -1024 and ds.RescaleSlope == 1
        assert list(ds.ImageOrientationPatient) == [1, 0, 0, 0, 1, 0]
        assert len(ds.PixelSpacing) == 2 and ds.PixelSpacing[0] > 0
        assert "2019" <= ds.StudyDate[:4] <= "2024" and ds.SeriesDate == ds.StudyDate
        assert ds.PatientSex in ("M", "F") and len(ds.PatientBirthDate) == 8
        for keyword in ("AccessionNumber", "StudyID", "StudyTime", "SeriesTime", "SeriesDescription",
                        "BodyPartExamined", "InstitutionName", "PatientName"):  # fmt: skip
            assert str(ds.get(keyword, "")), keyword
    # ImagePositionPatient steps by SliceThickness, InstanceNumber 1..n, within every series.
    by_series: dict[str, list[pydicom.Dataset]] = defaultdict(list)
    for ds in datasets:
        by_series[ds.SeriesInstanceUID].append(ds)
    for members in by_series.values():
        members.sort(key=lambda d: d.InstanceNumber)
        assert [d.InstanceNumber for d in members] == [1, 2, 3, 4]
        z = [float(d.ImagePositionPatient[2]) for d in members]
        assert np.allclose(np.abs(np.diff(z)), float(members[0].SliceThickness))
    # Studies of a patient fall on different dates; two series of a study share a description.
    dates = {(ds.PatientID, ds.StudyInstanceUID): ds.StudyDate for ds in datasets}
    for patient in summary.patients:
        assert len({d for (p, _), d in dates.items() if p == patient}) == 2
    descriptions = defaultdict(list)
    for members in by_series.values():
        descriptions[members[0].StudyInstanceUID].append(members[0].SeriesDescription)
    assert all(len(set(d)) < len(d) for d in descriptions.values())


def test_pixels_are_a_noisy_phantom(cohort: tuple[Path, CohortSummary]) -> None:
    out, _ = cohort
    representations = set()
    for ds in _read_all(out):
        pixels = ds.pixel_array
        assert pixels.shape == (32, 32)
        assert pixels.dtype == (np.int16 if ds.PixelRepresentation else np.uint16)
        assert pixels.max() < 2 ** ds.BitsStored
        hu = pixels.astype(np.float64) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
        assert hu[0, 0] < -900 and hu[-1, -1] < -900, "air in the corners"
        assert hu.max() > 400, "a dense disc"
        assert -200 < np.median(hu[12:20, 12:20]) < 200 or np.median(hu[12:20, 12:20]) < -500  # tissue or lung
        assert hu[hu > -900].std() > 5, "noise"
        representations.add(int(ds.PixelRepresentation))
    assert representations == {0, 1}, "both unsigned 12-bit and signed 16-bit series"


def test_same_seed_same_images_new_uids(tmp_path: Path) -> None:
    spec = CohortSpec(patients=1, series_per_study=2, slices_per_series=3, seed=3, **SMALL)
    first, second = generate_cohort(tmp_path / "a", spec), generate_cohort(tmp_path / "b", spec)
    other = generate_cohort(tmp_path / "c", CohortSpec(patients=1, series_per_study=2, slices_per_series=3, seed=4, **SMALL))

    def stacks(root: Path, summary: CohortSummary) -> list[np.ndarray]:
        out = []
        for series in summary.series:
            files = [next(root.rglob(f"{uid}.dcm")) for uid in series.sop_instance_uids]
            out.append(np.stack([pydicom.dcmread(f).pixel_array for f in files]))
        return out

    a, b, c = stacks(tmp_path / "a", first), stacks(tmp_path / "b", second), stacks(tmp_path / "c", other)
    assert all(x.shape == (3, 32, 32) for x in a)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c))
    assert not np.array_equal(a[0][0], a[0][1]), "slices differ"
    uids_a = {u for s in first.series for u in (s.study_instance_uid, s.series_instance_uid, *s.sop_instance_uids)}
    uids_b = {u for s in second.series for u in (s.study_instance_uid, s.series_instance_uid, *s.sop_instance_uids)}
    assert not uids_a & uids_b
    name = lambda root: pydicom.dcmread(next(root.rglob("*.dcm"))).PatientName  # noqa: E731
    assert name(tmp_path / "a") == name(tmp_path / "b")


def test_hostile_patient_ids_stay_inside_and_round_trip(tmp_path: Path) -> None:
    out = tmp_path / "hostile"
    summary = generate_cohort(out, CohortSpec(patient_ids=HOSTILE_IDS, series_per_study=1, slices_per_series=1, **SMALL))
    assert summary.patients == tuple(sorted(HOSTILE_IDS))
    found = {}
    for path in _files(out):
        assert out.resolve() in path.resolve().parents
        assert all(UID.match(part) for part in path.relative_to(out).parts[:-1])
        ds = pydicom.dcmread(path)
        found[ds.PatientID] = ds.get("SpecificCharacterSet")
    assert set(found) == set(HOSTILE_IDS)
    assert len(LONG_ID) == 64
    assert found["José/Ñ"] == "ISO_IR 192"
    assert found["a b/c"] is None and found[LONG_ID] is None, "plain ASCII needs no character set"
    assert not (tmp_path / "a b").exists() and not (out.parent / "c").exists()


def test_add_series_joins_the_patients_first_study(cohort: tuple[Path, CohortSummary]) -> None:
    out, summary = cohort
    added = add_series(out, "DEMO0002", slices=2, seed=1, **SMALL)
    studies = [s for s in summary.series if s.patient_id == "DEMO0002"]
    first_study = min(
        {s.study_instance_uid for s in studies},
        key=lambda uid: pydicom.dcmread(next((out / uid).rglob("*.dcm"))).StudyDate,
    )
    assert added.study_instance_uid == first_study
    assert added.series_number == 4 and added.instances == 2
    assert added.series_instance_uid not in {s.series_instance_uid for s in summary.series}
    new = pydicom.dcmread(next((out / first_study / added.series_instance_uid).glob("*.dcm")))
    old = pydicom.dcmread(next((out / first_study).rglob("*.dcm")))
    for keyword in ("PatientName", "PatientBirthDate", "PatientSex", "StudyDate", "AccessionNumber", "StudyID"):
        assert new.get(keyword) == old.get(keyword), keyword
    assert new.Rows == 32 and len(_files(out)) == 50


def test_add_series_with_explicit_study_and_new_patient(cohort: tuple[Path, CohortSummary]) -> None:
    out, summary = cohort
    target = summary.series[-1].study_instance_uid
    explicit = add_series(out, summary.series[-1].patient_id, study_instance_uid=target, slices=1, series_number=42, **SMALL)
    assert explicit.study_instance_uid == target and explicit.series_number == 42
    fresh = add_series(out, "NEW/ID", slices=1, **SMALL)
    assert fresh.patient_id == "NEW/ID" and fresh.series_number == 1
    assert fresh.study_instance_uid not in {s.study_instance_uid for s in summary.series}
    assert pydicom.dcmread(next((out / fresh.study_instance_uid).rglob("*.dcm"))).PatientID == "NEW/ID"
