"""Issue 12's proof: marked instances de-identified, then the BYTES of every output searched for
every marker and every original UID. Plus: pixel data byte for byte, parsing, consistency of
UIDs and pseudonyms, preserved intervals, and what each option changes."""

from __future__ import annotations

import datetime as dt
import re
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian

from dicom_assets.deid import part10, profile
from dicom_assets.deid.deidentify import DeidentifiedInstance, Deidentifier
from dicom_assets.deid.keys import DeidKeys
from dicom_assets.deid.options import ClinicalTrial, DeidOptions
from dicom_assets.devpacs.marked import DEFAULT_SYNTAXES, all_markers, leaked_markers, searchable_bytes, write_marked_series

SECRET = b"marker test secret, not a real one"
PATIENT = "MRKPID01"
SYNTAXES = (*DEFAULT_SYNTAXES, DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian)
FIRST_STUDY, SECOND_STUDY = dt.date(2019, 3, 4), dt.date(2020, 1, 15)
pytestmark = pytest.mark.filterwarnings("ignore:VR lookup failed")


@pytest.fixture(scope="module")
def originals(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    root = tmp_path_factory.mktemp("marked")
    first = write_marked_series(root, PATIENT, study_date=FIRST_STUDY, transfer_syntaxes=SYNTAXES)
    second = write_marked_series(root, PATIENT, study_date=SECOND_STUDY, transfer_syntaxes=DEFAULT_SYNTAXES[:1], seed=1)
    return first + second


@pytest.fixture(scope="module")
def keys() -> DeidKeys:
    return DeidKeys(SECRET)


def deidentify(files: list[Path], out: Path, options: DeidOptions, keys: DeidKeys) -> list[Path]:
    deidentifier = Deidentifier(options, keys)
    outputs = []
    for i, src in enumerate(files):
        made = deidentifier.deidentify_file(src, out / f"{i}.dcm", keys.pseudonym(PATIENT), keys.date_shift_days(PATIENT))
        assert isinstance(made, DeidentifiedInstance) and made.bytes == (out / f"{i}.dcm").stat().st_size
        outputs.append(out / f"{i}.dcm")
    return outputs


@pytest.fixture(scope="module")
def outputs(originals: list[Path], keys: DeidKeys, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return deidentify(originals, tmp_path_factory.mktemp("deid"), DeidOptions(), keys)


def _markers(originals: list[Path]) -> dict[str, str]:
    markers = all_markers(originals)
    markers[PATIENT] = "PatientID"
    return markers


def test_no_marker_and_no_original_uid_survives(originals: list[Path], outputs: list[Path], keys: DeidKeys) -> None:
    markers = _markers(originals)
    assert sum(1 for m in markers if m.startswith("MRK")) > 500
    assert sum(1 for m in markers if m.startswith("1.2.826.")) > 500  # original UIDs
    assert sum(1 for m in markers if m.isdigit()) >= 3  # dates
    for original, output in zip(originals, outputs):
        assert leaked_markers(searchable_bytes(original), markers)  # the search does find them in the originals
        leaks = leaked_markers(searchable_bytes(output), markers, keys.date_shift_days(PATIENT))
        assert leaks == [], [(leak, markers[leak]) for leak in leaks[:20]]


def test_pixel_data_is_byte_identical_and_files_parse(originals: list[Path], outputs: list[Path]) -> None:
    for original, output in zip(originals, outputs):
        a, b = dcmread(original), dcmread(output)
        assert b.file_meta.TransferSyntaxUID == a.file_meta.TransferSyntaxUID
        assert b["PixelData"].VR == a["PixelData"].VR and b.PixelData == a.PixelData
        with open(original, "rb") as f, open(output, "rb") as g:
            src, dst = part10.read_header(f, original.stat().st_size), part10.read_header(g, output.stat().st_size)
            if src.pixel_start is not None and dst.pixel_start is not None:  # the element itself, header included
                f.seek(src.pixel_start)
                g.seek(dst.pixel_start)
                assert f.read() == g.read()
        assert b.file_meta.MediaStorageSOPInstanceUID == b.SOPInstanceUID
        assert b.file_meta.MediaStorageSOPClassUID == a.SOPClassUID


def test_what_the_output_says_about_itself(originals: list[Path], outputs: list[Path], keys: DeidKeys) -> None:
    ds = dcmread(outputs[0])
    assert ds.PatientName == keys.pseudonym(PATIENT) == ds.PatientID
    assert ds.PatientIdentityRemoved == "YES"
    assert ds.LongitudinalTemporalInformationModified == "MODIFIED"
    assert list(ds.DeidentificationMethod) == ["Basic Application Confidentiality Profile (PS3.15 2026c)",
                                               "Retain Longitudinal Temporal Information Modified Dates Option"]  # fmt: skip
    assert [(c.CodeValue, c.CodingSchemeDesignator) for c in ds.DeidentificationMethodCodeSequence] == [("113100", "DCM"), ("113107", "DCM")]
    assert "DigitalSignaturesSequence" not in ds and "DataSetTrailingPadding" not in ds  # after the pixel data: removed too
    assert not any(elem.tag.is_private for elem in ds.iterall())
    assert not any(elem.tag.group & 0xFF00 in (0x5000, 0x6000) for elem in ds)  # overlays and curves
    original = dcmread(originals[0])
    assert ds.ReferencedSOPInstanceUID == keys.uid(original.ReferencedSOPInstanceUID)


def _pn_values(ds: Dataset, top: bool = True) -> list[tuple[str, str]]:
    found = []
    for elem in ds:
        if elem.VR == "SQ":
            for item in elem.value:
                found += _pn_values(item, top=False)
        elif elem.VR == "PN" and not (top and elem.keyword == "PatientName"):
            found.append((elem.keyword, str(elem.value)))
    return found


def test_no_name_survives_anywhere(outputs: list[Path]) -> None:
    for output in outputs:
        assert {value for _, value in _pn_values(dcmread(output))} <= {"", "ANONYMIZED"}


def test_removed_attributes_are_gone(originals: list[Path], outputs: list[Path]) -> None:
    a, b = dcmread(originals[1]), dcmread(outputs[1])
    removed = [t for t, rule in profile.TABLE.items() if rule.basic == "X" and not rule.options and t in a and a[t].VR != "SQ"]
    assert len(removed) > 100
    assert [t for t in removed if t in b] == []


def test_uids_are_consistent_within_and_across_instances(originals: list[Path], outputs: list[Path], keys: DeidKeys) -> None:
    series = [dcmread(p) for p in outputs[: len(SYNTAXES)]]
    assert len({ds.StudyInstanceUID for ds in series}) == 1 and len({ds.SeriesInstanceUID for ds in series}) == 1
    assert len({ds.SOPInstanceUID for ds in series}) == len(series)
    for i, ds in enumerate(series):  # every item refers to the next instance of the series, by its NEW UID
        expected = series[(i + 1) % len(series)].SOPInstanceUID
        assert ds.ReferencedImageSequence[0].ReferencedSOPInstanceUID == expected
        assert ds.ContentSequence[0].ReferencedImageSequence[0].ReferencedSOPInstanceUID == expected
        original = dcmread(originals[i])
        assert ds.SOPInstanceUID == keys.uid(original.SOPInstanceUID) and ds.FrameOfReferenceUID == keys.uid(original.FrameOfReferenceUID)
        assert re.fullmatch(r"2\.25\.\d+", ds.SOPInstanceUID)


def test_same_secret_same_bytes_other_secret_other_identity(originals: list[Path], outputs: list[Path], tmp_path: Path) -> None:
    again = deidentify(originals[:1], tmp_path / "again", DeidOptions(), DeidKeys(SECRET))  # new Deidentifier, new keys
    assert again[0].read_bytes() == outputs[0].read_bytes()
    other_keys = DeidKeys(b"a different secret of enough length")
    other = dcmread(deidentify(originals[:1], tmp_path / "other", DeidOptions(), other_keys)[0])
    same = dcmread(outputs[0])
    assert other.PatientID != same.PatientID and other.SOPInstanceUID != same.SOPInstanceUID
    assert other.StudyInstanceUID != same.StudyInstanceUID
    assert other_keys.date_shift_days(PATIENT) != DeidKeys(SECRET).date_shift_days(PATIENT)
    assert other.StudyDate != same.StudyDate


def test_intervals_between_studies_are_kept(originals: list[Path], outputs: list[Path], keys: DeidKeys) -> None:
    first, second = dcmread(outputs[0]), dcmread(outputs[-1])

    def day(text: str) -> dt.date:
        return dt.datetime.strptime(text, "%Y%m%d").date()

    shift = dt.timedelta(days=keys.date_shift_days(PATIENT))
    assert day(first.StudyDate) == FIRST_STUDY + shift and day(second.StudyDate) == SECOND_STUDY + shift
    assert day(second.StudyDate) - day(first.StudyDate) == SECOND_STUDY - FIRST_STUDY
    assert first.StudyTime == dcmread(originals[0]).StudyTime  # times are kept with modified dates
    assert first.StudyInstanceUID != second.StudyInstanceUID


def _leak_paths(originals: list[Path], outputs: list[Path], shift: int) -> list[list[int]]:
    """For each marker found in the outputs: the tags of where it was put, outermost first."""
    markers = _markers(originals)
    paths = []
    for output in outputs:
        for leak in leaked_markers(searchable_bytes(output), markers, shift):
            found = re.findall(r"\(([0-9A-F]{4}),([0-9A-Fx]{4})\)", markers[leak])
            assert found, f"{leak} from {markers[leak]} survived"
            paths.append([int(group, 16) << 16 | int(element.replace("xx", "10"), 16) for group, element in found])
    return paths


def test_retain_options_keep_what_they_say_and_nothing_else(originals: list[Path], keys: DeidKeys, tmp_path: Path) -> None:
    options = DeidOptions(clean_descriptors=True, retain_patient_characteristics=True, retain_device_identity=True,
                          retain_institution_identity=True, retain_safe_private=True, safe_private=(("MRK SAFE", 0x0011, 0x01),))  # fmt: skip
    outputs = deidentify(originals[:4], tmp_path, options, keys)
    chosen = options.profile_options()
    leaks = _leak_paths(originals[:4], outputs, keys.date_shift_days(PATIENT))
    assert leaks  # the options do keep markers...
    for path in leaks:  # ...but only in (or inside) attributes an option chosen keeps or cleans
        rules = [profile.rule_for(tag) for tag in path]
        kept = any(rule is not None and any(rule.option(name) in ("K", "C") for name in chosen) for rule in rules)
        assert kept, f"{[f'{t:08X}' for t in path]} leaked"
    a, b = dcmread(originals[0]), dcmread(outputs[0])
    assert b.DeviceSerialNumber == a.DeviceSerialNumber and b.StationName == a.StationName
    assert b.DeviceUID == a.DeviceUID  # Retain Device Identity keeps the device's UID too
    assert (b.PatientSex, b.PatientAge, b.PatientWeight) == ("F", "045Y", a.PatientWeight)
    assert b.InstitutionName == a.InstitutionName
    assert b.private_block(0x0011, "MRK SAFE")[0x01].value == a.private_block(0x0011, "MRK SAFE")[0x01].value
    assert not any(elem.tag.group == 0x0009 for elem in b)
    assert [c.CodeValue for c in b.DeidentificationMethodCodeSequence] == ["113100", "113105", "113107", "113108", "113109", "113111", "113112"]


def test_default_options_drop_characteristics_devices_and_private(outputs: list[Path]) -> None:
    ds = dcmread(outputs[0])
    assert ds.PatientSex == "" and "PatientAge" not in ds and "PatientWeight" not in ds
    assert ds.DeviceSerialNumber == "ANONYMIZED" and ds.InstitutionName == "ANONYMIZED"
    assert "StudyDescription" not in ds and "SeriesDescription" not in ds


def test_safe_private_without_a_list_keeps_no_private(originals: list[Path], keys: DeidKeys, tmp_path: Path) -> None:
    ds = dcmread(deidentify(originals[:1], tmp_path, DeidOptions(retain_safe_private=True), keys)[0])
    assert not any(elem.tag.is_private for elem in ds.iterall())


def test_without_modified_dates_dates_are_removed(originals: list[Path], keys: DeidKeys, tmp_path: Path) -> None:
    options = DeidOptions(retain_longitudinal_modified_dates=False)
    outputs = deidentify(originals[:3], tmp_path, options, keys)
    markers = _markers(originals[:3])
    for output in outputs:
        assert leaked_markers(searchable_bytes(output), markers) == []
    ds = dcmread(outputs[0])
    assert ds.LongitudinalTemporalInformationModified == "REMOVED"
    assert ds.StudyDate == "" and ds.StudyTime == "" and ds.SeriesDate == "19000101"
    assert [c.CodeValue for c in ds.DeidentificationMethodCodeSequence] == ["113100"]


def test_clinical_trial_attributes(originals: list[Path], keys: DeidKeys, tmp_path: Path) -> None:
    trial = ClinicalTrial(sponsor_name="Sponsor", protocol_id="P-1", protocol_name="Protocol", site_id="S1", site_name=None)
    ds = dcmread(deidentify(originals[:1], tmp_path, DeidOptions(trial=trial), keys)[0])
    assert (ds.ClinicalTrialSponsorName, ds.ClinicalTrialProtocolID, ds.ClinicalTrialProtocolName) == ("Sponsor", "P-1", "Protocol")
    assert (ds.ClinicalTrialSiteID, ds.ClinicalTrialSiteName) == ("S1", "")
    assert ds.ClinicalTrialSubjectID == keys.pseudonym(PATIENT)


def test_a_bad_source_leaves_no_output(tmp_path: Path, keys: DeidKeys) -> None:
    src = tmp_path / "not-dicom.dcm"
    src.write_bytes(b"not a DICOM file at all" * 10)
    dst = tmp_path / "out" / "x.dcm"
    with pytest.raises(Exception):
        Deidentifier(DeidOptions(), keys).deidentify_file(src, dst, "ANON1", -3)
    assert not dst.exists()
