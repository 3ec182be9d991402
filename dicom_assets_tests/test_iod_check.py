"""The IOD check the de-identification tests rely on (dicom_assets_tests/iod_check.py).

It must (1) find nothing wrong with the generator's CT, so any error in a de-identified copy shows,
(2) find a deliberately broken file's error, and (3) not call an error "new" only because
de-identification changed a value the message quotes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from dicom_assets.devpacs.cohort import CohortSpec, generate_cohort
from dicom_assets_tests.iod_check import iod_errors, iod_report, new_iod_errors, new_messages, normalise_message, require_dciodvfy

Edit = Callable[[Dataset], None]
#: The broken files are broken on purpose; pydicom need not say so.
pytestmark = pytest.mark.filterwarnings("ignore:Invalid value for VR")


@pytest.fixture(scope="module")
def generated_cts(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """One slice for each of 3 patients (names with and without non-ASCII characters)."""
    out = tmp_path_factory.mktemp("iod-cohort")
    generate_cohort(out, CohortSpec(patients=3, series_per_study=1, slices_per_series=1, rows=32, columns=32, seed=3))
    return sorted(out.rglob("*.dcm"))


@pytest.fixture
def clean_ct(generated_cts: list[Path]) -> Path:
    return generated_cts[0]


def _edited(src: Path, dst: Path, *edits: Edit) -> Path:
    """A copy of ``src`` with ``edits`` applied, written as is (no fixing up by pydicom)."""
    ds = pydicom.dcmread(src)
    for edit in edits:
        edit(ds)
    ds.save_as(dst, enforce_file_format=False)
    return dst


def _pseudonymise(ds: Dataset) -> None:
    """What a de-identifier does to a CT's values: new UIDs, dates, name, IDs; the flags it adds."""
    uid = generate_uid(prefix="2.25.")
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = uid
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = (generate_uid(prefix="2.25.") for _ in range(3))
    ds.PatientName, ds.PatientID, ds.AccessionNumber, ds.StudyID = "ANON00001234", "ANON00001234", "", ""
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = "20170311"
    ds.PatientBirthDate, ds.InstitutionName = "", None
    ds.PatientIdentityRemoved, ds.DeidentificationMethod = "YES", "test"


# -- normalisation (no dciodvfy needed) ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("before", "after"),
    [
        ("Error - Value invalid for this VR - (0x0008,0x0020) DA Study Date  DA [1] = <2024x1> - Length invalid for this VR = 6, expected == 8 or 10",
         "Error - Value invalid for this VR - (0x0008,0x0020) DA Study Date DA [1] = <value> - Length invalid for this VR = <n>, expected == 8 or 10"),
        ("Error - Unrecognized enumerated value <Q> for value 1 of attribute <Patient's Sex>",
         "Error - Unrecognized enumerated value <value> for value 1 of attribute <Patient's Sex>"),
        ("Error - Value invalid for this VR - (0x0008,0x0060) CS Modality  CS [1] = <ct> - Character invalid for this VR = 'c' (0x63)",
         "Error - Value invalid for this VR - (0x0008,0x0060) CS Modality CS [1] = <value> - Character invalid for this VR = '<char>'"),
        ("Error - Referenced SOP 1.2.840.113619.2.55.3 not found on 20240504",
         "Error - Referenced SOP <uid> not found on <date>"),
        # attribute and module names in brackets are the error's kind: they stay
        ("Error - Missing attribute Type 1C Conditional Element=<Modality> Module=<GeneralSeries>",
         "Error - Missing attribute Type 1C Conditional Element=<Modality> Module=<GeneralSeries>"),
        ("Error - Bad attribute value - Bits Stored = 20 exceeds High Bit 11 + 1",
         "Error - Bad attribute value - Bits Stored = 20 exceeds High Bit 11 + 1"),
    ],
)  # fmt: skip
def test_normalise_message_keeps_the_kind_and_drops_the_value(before: str, after: str) -> None:
    assert normalise_message(before) == after


def test_new_messages_counts_repeats() -> None:
    assert new_messages(["a", "b"], ["b", "a"]) == []
    assert new_messages(["a"], ["a", "a", "c"]) == ["a", "c"]
    assert new_messages(["a", "c"], []) == []


# -- dciodvfy on real files -----------------------------------------------------------------------------


def test_generated_ct_has_no_iod_error(generated_cts: list[Path]) -> None:
    require_dciodvfy()
    for path in generated_cts:
        report = iod_report(path)
        assert report.iod == "CTImage", report.raw
        assert report.errors == (), report.raw


@pytest.mark.parametrize(
    ("name", "edit", "expected"),
    [
        ("no-modality", lambda ds: delattr(ds, "Modality"), "Element=<Modality>"),
        ("no-sop-class", lambda ds: delattr(ds, "SOPClassUID"), "Information Object Not found"),
        ("no-rows", lambda ds: delattr(ds, "Rows"), "Element=<Rows>"),
        ("bad-date", lambda ds: setattr(ds, "StudyDate", "2024x1"), "Study Date"),
    ],
)
def test_a_broken_file_has_a_new_error(clean_ct: Path, tmp_path: Path, name: str, edit: Edit, expected: str) -> None:
    require_dciodvfy()
    broken = _edited(clean_ct, tmp_path / f"{name}.dcm", edit)
    new = new_iod_errors(clean_ct, broken)
    assert any(expected in message for message in new), new


def test_changed_values_are_not_new_errors(clean_ct: Path, tmp_path: Path) -> None:
    require_dciodvfy()
    copy = _edited(clean_ct, tmp_path / "pseudonymised.dcm", _pseudonymise)
    assert iod_errors(copy) == []
    assert new_iod_errors(clean_ct, copy) == []


def test_an_error_the_original_had_is_not_new_with_another_value(clean_ct: Path, tmp_path: Path) -> None:
    """An original with a bad date and a bad sex; its copy has other bad values in the same places."""
    require_dciodvfy()
    original = _edited(clean_ct, tmp_path / "original.dcm", lambda ds: setattr(ds, "StudyDate", "2024x1"), lambda ds: setattr(ds, "PatientSex", "Q"))
    copy = _edited(original, tmp_path / "copy.dcm", _pseudonymise, lambda ds: setattr(ds, "StudyDate", "2017y3"), lambda ds: setattr(ds, "PatientSex", "X"))
    assert len(iod_errors(original)) >= 2
    assert new_iod_errors(original, copy) == []
    worse = _edited(copy, tmp_path / "worse.dcm", lambda ds: delattr(ds, "Modality"))
    assert [m for m in new_iod_errors(original, worse) if "Modality" in m], iod_errors(worse)


def test_project_deidentifier_adds_no_iod_error(generated_cts: list[Path], tmp_path: Path) -> None:
    """The done-when of issue 12 on the generator's CT, once dicom_assets.deid exists."""
    require_dciodvfy()
    options = pytest.importorskip("dicom_assets.deid.options", reason="dicom_assets.deid not available")
    keys = pytest.importorskip("dicom_assets.deid.keys", reason="dicom_assets.deid not available")
    deidentify = pytest.importorskip("dicom_assets.deid.deidentify", reason="dicom_assets.deid not available")
    key = keys.DeidKeys(b"iod-check test secret")
    deidentifier = deidentify.Deidentifier(options.DeidOptions(), key)
    for index, path in enumerate(generated_cts):
        patient_id = str(pydicom.dcmread(path, stop_before_pixels=True).PatientID)
        out = tmp_path / f"{index}.dcm"
        deidentifier.deidentify_file(path, out, key.pseudonym(patient_id), key.date_shift_days(patient_id))
        assert new_iod_errors(path, out) == [], iod_report(out).raw
