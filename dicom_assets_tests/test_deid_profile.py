"""PS3.15 Table E.1-1 as loaded from the packages, how options resolve it into actions, and what
the rules do on datasets built in memory (unlisted attributes, cleaning, burned-in text)."""

from __future__ import annotations

import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, SecondaryCaptureImageStorage

from dicom_assets.deid import profile
from dicom_assets.deid.clean import TextCleaner
from dicom_assets.deid.deidentify import Deidentifier, burned_in_reason
from dicom_assets.deid.keys import DeidKeys
from dicom_assets.deid.options import DEFAULT_BURNED_IN_MODALITIES, ClinicalTrial, DeidOptions
from dicom_assets.deid.plan import KEEP_UI_TAGS, Act, Plan


def test_table_is_the_2026c_basic_profile_with_option_columns() -> None:
    assert profile.BASIC_EDITION == "2026c" and profile.OPTIONS_EDITION == "2020"
    assert len(profile.TABLE) >= 650
    assert {rule.basic for rule in profile.TABLE.values()} <= profile.ACTIONS
    # every action code of the table occurs
    assert {rule.basic for rule in profile.TABLE.values()} == profile.ACTIONS - {"K", "C"}
    # every option column of the table is represented
    columns = {name for rule in profile.TABLE.values() for name in rule.options} | set(profile.PRIVATE_RULE.options)
    assert columns == set(profile.OPTIONS)


@pytest.mark.parametrize(
    ("tag", "basic", "options"),
    [
        (0x00100010, "Z", {}),  # PatientName
        (0x00100020, "Z/D", {}),  # PatientID (Z in 2020, Z/D in 2026c: the newer edition wins)
        (0x00080050, "Z", {}),  # AccessionNumber
        (0x00080020, "Z", {"retain_full_dates": "K", "retain_modified_dates": "C"}),  # StudyDate
        (0x00081030, "X", {"clean_descriptors": "C"}),  # StudyDescription
        (0x00181000, "X/Z/D", {"retain_device_identity": "K"}),  # DeviceSerialNumber
        (0x00101010, "X", {"retain_patient_characteristics": "K"}),  # PatientAge
        (0x00080018, "U", {"retain_uids": "K"}),  # SOPInstanceUID
        (0x00081140, "X/Z/U*", {"retain_uids": "K"}),  # ReferencedImageSequence
        (0x0040A730, "D", {"clean_structured_content": "C"}),  # ContentSequence
        (0x00080080, "X/Z/D", {"retain_institution_identity": "K"}),  # InstitutionName
    ],
)
def test_known_rows(tag: int, basic: str, options: dict[str, str]) -> None:
    rule = profile.rule_for(tag)
    assert rule is not None and rule.basic == basic and dict(rule.options) == options


def test_repeating_groups_private_and_unlisted() -> None:
    assert profile.rule_for(0x60003000).basic == "X"  # Overlay Data, any overlay group
    assert profile.rule_for(0x601E4000).basic == "X"  # Overlay Comments
    assert profile.rule_for(0x50023000).basic == "X"  # Curve Data
    private = profile.rule_for(0x00291010)
    assert private is profile.PRIVATE_RULE and private.basic == "X" and private.option("retain_safe_private") == "C"
    assert profile.rule_for(0x00280010) is None  # Rows: not listed, kept
    assert profile.rule_for(0x60000010) is None  # Overlay Rows: not listed (the walker drops the whole group)


def test_options_resolve_over_the_basic_action() -> None:
    plain = Plan.build(DeidOptions(retain_longitudinal_modified_dates=False))
    assert plain.acts[0x00080020][0] is Act.EMPTY  # StudyDate Z
    assert plain.acts[0x00081030][0] is Act.REMOVE  # StudyDescription X
    assert plain.acts[0x00181000][0] is Act.DUMMY  # DeviceSerialNumber X/Z/D: present, value gone
    assert plain.acts[0x00081110][1] is Act.REMOVE  # ReferencedStudySequence X/Z: Type 3, removed
    assert plain.acts[0x00400555][1] is Act.EMPTY  # AcquisitionContextSequence X/Z: Type 2 somewhere, emptied
    assert plain.acts[0x00081072][1] is Act.REMOVE  # OperatorIdentificationSequence X/D
    assert plain.acts[0x00081140][1] is Act.RECURSE  # ReferencedImageSequence X/Z/U*: UIDs replaced inside
    assert plain.acts[0x00401101][1] is Act.DUMMY_CODES  # PersonIdentificationCodeSequence D
    assert plain.unlisted["DA"] is Act.EMPTY and plain.unlisted["TM"] is Act.EMPTY and not plain.shift_dates

    every = Plan.build(DeidOptions(clean_descriptors=True, retain_patient_characteristics=True, retain_device_identity=True,
                                   retain_institution_identity=True))  # fmt: skip
    assert every.acts[0x00080020][0] is Act.SHIFT and every.unlisted["DA"] is Act.SHIFT and every.unlisted["TM"] is Act.KEEP
    assert every.acts[0x00081030][0] is Act.CLEAN
    assert every.acts[0x00181000][0] is Act.KEEP
    assert every.acts[0x00101010][0] is Act.KEEP and every.acts[0x00100040][0] is Act.KEEP
    assert every.acts[0x00080080][0] is Act.KEEP
    assert every.acts[0x00102000][0] is Act.CLEAN  # MedicalAlerts: X, C with Clean Descriptors
    assert every.acts[0x00101040][0] is Act.REMOVE  # PatientAddress: no option keeps it


def test_class_and_syntax_uids_are_never_replaced() -> None:
    assert 0x00080016 in KEEP_UI_TAGS and 0x00081150 in KEEP_UI_TAGS and 0x0008010C in KEEP_UI_TAGS
    assert 0x00081167 not in KEEP_UI_TAGS  # MultiFrameSourceSOPInstanceUID: an instance, replaced
    assert 0x00080018 not in KEEP_UI_TAGS  # listed (U)


def test_method_codes_are_cid_7050() -> None:
    assert DeidOptions(retain_longitudinal_modified_dates=False).method_codes() == [
        ("113100", "DCM", "Basic Application Confidentiality Profile")
    ]
    codes = DeidOptions(clean_descriptors=True, retain_patient_characteristics=True, retain_device_identity=True,
                        retain_safe_private=True).method_codes()  # fmt: skip
    assert [c[0] for c in codes] == ["113100", "113105", "113107", "113108", "113109", "113111"]
    assert all(scheme == "DCM" for _, scheme, _ in codes)
    assert dict((v, m) for v, _, m in codes)["113107"] == "Retain Longitudinal Temporal Information Modified Dates Option"


def test_options_normalise_config_values() -> None:
    options = DeidOptions(burned_in_modalities=["us", " sc "], safe_private=[["ACME 1.0", 0x0019, 0x10]])  # type: ignore[arg-type]
    assert options.burned_in_modalities == ("US", "SC")
    assert options.safe_private == (("ACME 1.0", 0x0019, 0x10),)
    assert hash(options) == hash(DeidOptions(burned_in_modalities=("US", "SC"), safe_private=(("ACME 1.0", 0x0019, 0x10),)))
    with pytest.raises(ValueError):
        DeidOptions(safe_private=(("X", 0x0018, 0x10),))  # an even group is not private
    assert DeidOptions().burned_in_modalities == DEFAULT_BURNED_IN_MODALITIES
    assert ClinicalTrial().is_empty() and not ClinicalTrial(sponsor_name="S").is_empty()


# -- datasets in memory: unlisted attributes, cleaning, burned-in text --------------------------------

SECRET = b"profile test secret, long enough"


def _first_unlisted(vr: str) -> int:
    from pydicom.datadict import DicomDictionary

    return next(t for t, e in sorted(DicomDictionary.items()) if e[0] == vr and t not in profile.TABLE and e[3] == "" and t >> 16 > 8)


def _dataset() -> Dataset:
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.PatientName, ds.PatientID, ds.AccessionNumber = "Smith^John", "PID778899", "ACC123"
    ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, "1.2.3.4.5.6"
    ds.StudyInstanceUID, ds.SeriesInstanceUID = "1.2.3.4.5.7", "1.2.3.4.5.8"
    ds.FrameOfReferenceUID = "1.2.840.10008.1.4.1.1"  # a well-known frame of reference (Talairach)
    ds.StudyDate, ds.StudyTime, ds.Modality = "20190304", "101112", "CT"
    ds.StudyDescription = "CT CHEST smith PID778899 04.03.2019 Dr. Who"
    ds.SeriesDescription = "Axial 5.0 mm"
    ds.ImageComments = "John called, see 0612345678"
    return ds


def test_unlisted_attributes_follow_the_vr_rules() -> None:
    pn, lt, ur = _first_unlisted("PN"), _first_unlisted("LT"), _first_unlisted("UR")
    ds = _dataset()
    ds.add_new(pn, "PN", "Doe^Jane")
    ds.add_new(lt, "LT", "free text naming Jane Doe")
    ds.add_new(ur, "UR", "http://pacs.hospital.example/study/1")
    ds.MultiFrameSourceSOPInstanceUID = "1.2.3.4.5.9"  # unlisted instance UID: replaced
    ds.ReferencedSOPClassUID = "1.2.3.4.999"  # a class UID (even a private one): kept
    ds.add_new(0x00291010, "LO", "private")
    ds.add_new(0x60000010, "US", 4)
    keys = DeidKeys(SECRET)
    Deidentifier(DeidOptions(), keys).deidentify_dataset(ds, "ANON0001", -10)
    assert ds[pn].value == "" and ds[lt].value == "ANONYMIZED" and ur not in ds
    assert ds.MultiFrameSourceSOPInstanceUID == keys.uid("1.2.3.4.5.9")
    assert ds.ReferencedSOPClassUID == "1.2.3.4.999" and ds.SOPClassUID == CTImageStorage
    assert ds.FrameOfReferenceUID == "1.2.840.10008.1.4.1.1"
    assert ds.SOPInstanceUID == keys.uid("1.2.3.4.5.6")
    assert 0x00291010 not in ds and 0x60000010 not in ds
    assert ds.StudyDate == "20190222" and ds.StudyTime == "101112"  # shifted by -10 days, time kept
    assert ds.PatientName == "ANON0001" and ds.PatientID == "ANON0001" and ds.AccessionNumber == ""


def test_clean_descriptors_scrubs_identity_and_empties_free_text() -> None:
    ds = _dataset()
    Deidentifier(DeidOptions(clean_descriptors=True), DeidKeys(SECRET)).deidentify_dataset(ds, "ANON0001", -1)
    assert ds.StudyDescription == "CT CHEST"
    assert ds.SeriesDescription == "Axial 5.0 mm"
    assert ds.ImageComments == ""  # free text (LT): not kept even when cleaning
    plain = _dataset()
    Deidentifier(DeidOptions(), DeidKeys(SECRET)).deidentify_dataset(plain, "ANON0001", -1)
    assert "StudyDescription" not in plain and "ImageComments" not in plain


def test_text_cleaner() -> None:
    cleaner = TextCleaner(["Müller", "Anna", "4711"])
    assert cleaner.clean("LO", "MRI knee müller ANNA 4711 2020-01-02") == "MRI knee"
    assert cleaner.clean("LO", "Axial\\Anna 5 mm") == "Axial\\5 mm"
    assert cleaner.clean("SH", "call +41 44 123 45 67") == "call"
    assert cleaner.clean("LO", "Dr. Jones head") == "head"
    assert cleaner.clean("LO", "Annabel study") == "Annabel study"  # whole words only
    assert cleaner.clean("LT", "anything") == "" and cleaner.clean("PN", "Anna") == ""


def test_file_meta_follows_the_dataset() -> None:
    ds = _dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID, ds.file_meta.MediaStorageSOPInstanceUID = CTImageStorage, "1.2.3.4.5.6"
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.SourceApplicationEntityTitle = "HOSPITAL_PACS"
    keys = DeidKeys(SECRET)
    Deidentifier(DeidOptions(), keys).deidentify_dataset(ds, "ANON0001", -1)
    assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID == keys.uid("1.2.3.4.5.6")
    assert "SourceApplicationEntityTitle" not in ds.file_meta


def test_bad_pseudonyms_are_refused() -> None:
    deidentifier = Deidentifier(DeidOptions(), DeidKeys(SECRET))
    for bad in ("", "A^B", "x" * 65):
        with pytest.raises(ValueError):
            deidentifier.deidentify_dataset(_dataset(), bad, -1)


@pytest.mark.parametrize(
    ("attributes", "options", "expected"),
    [
        ({"Modality": "CT"}, DeidOptions(), None),
        ({"Modality": "CT", "BurnedInAnnotation": "YES"}, DeidOptions(), "BurnedInAnnotation is YES"),
        ({"Modality": "CT", "BurnedInAnnotation": "NO"}, DeidOptions(), None),
        ({"Modality": "US"}, DeidOptions(), "modality US may carry burned-in text"),
        ({"Modality": "OT", "SOPClassUID": SecondaryCaptureImageStorage}, DeidOptions(), "modality OT may carry burned-in text"),
        ({"Modality": "CT", "SOPClassUID": SecondaryCaptureImageStorage}, DeidOptions(), "SOP class Secondary Capture Image Storage may carry burned-in text"),
        ({"Modality": "CT", "ImageType": ["DERIVED", "SECONDARY", "SCREEN SAVE"]}, DeidOptions(), "ImageType says screen save"),
        ({"Modality": "US", "BurnedInAnnotation": "YES"}, DeidOptions(keep_burned_in=True), None),
        ({"Modality": "MG"}, DeidOptions(burned_in_modalities=("mg",)), "modality MG may carry burned-in text"),
        ({"Modality": "US"}, DeidOptions(burned_in_modalities=(), burned_in_sop_classes=()), None),
    ],
)
def test_burned_in_reason(attributes: dict[str, object], options: DeidOptions, expected: str | None) -> None:
    ds = Dataset()
    for keyword, value in attributes.items():
        setattr(ds, keyword, value)
    assert burned_in_reason(ds, options) == expected
