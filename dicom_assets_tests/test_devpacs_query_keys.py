"""The bundled PACS answers the request-file query keys as Orthanc 1.10.1 does.

Request files are resolved by STUDY-level C-FINDs (AccessionNumber, PatientID with a StudyDate
window, StudyInstanceUID, ModalitiesInStudy) and series filters look at SERIES/IMAGE-level keys
(Modality, SeriesDescription wildcards, SeriesNumber, SOPClassUID). The fast tests run against
the bundled PACS, so it must match what a real PACS matches. Both PACSes here serve the same
files (:func:`~dicom_assets.devpacs.request_cohort.request_test_cohort`); every query goes to
both (pynetdicom, Study Root) and the matches must be equal to each other *and* to the
scenario's expectation, so two PACSes wrong in the same way fail too.

Where Orthanc differs (keys the request-file code must not rely on), both answers are asserted
in :func:`test_documented_differences`; ``dicom_assets/devpacs/query.py`` describes them.
Orthanc missing: skipped, or failed under ``CI=true`` (``require_service``).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.uid import CTImageStorage, MRImageStorage
from pynetdicom import AE
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind as STUDY_FIND  # type: ignore[attr-defined]

from dicom_assets.devpacs import DevPacs
from dicom_assets.devpacs.request_cohort import (
    BASIC_TEXT_SR,
    XRAY_RADIATION_DOSE_SR,
    WrittenCohort,
    WrittenSeries,
    request_test_cohort,
)
from dicom_assets_tests.conftest import free_port
from dicom_assets_tests.orthanc import ORTHANC_AET, RECEIVER_AET, running_orthanc

pytestmark = pytest.mark.timeout(180)

HOST = "127.0.0.1"
#: Orthanc returns only the keys asked for (no unique keys added), so every query asks for them.
UNIQUE = {"STUDY": ("StudyInstanceUID",), "SERIES": ("StudyInstanceUID", "SeriesInstanceUID"),
          "IMAGE": ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")}  # fmt: skip
STUDY_RETURN_KEYS = (
    "PatientID", "PatientName", "PatientSex", "PatientBirthDate", "StudyDate", "AccessionNumber", "StudyDescription",
    "ModalitiesInStudy", "SOPClassesInStudy", "NumberOfStudyRelatedSeries", "NumberOfStudyRelatedInstances",
)  # fmt: skip
SERIES_RETURN_KEYS = ("Modality", "SeriesDescription", "SeriesNumber", "NumberOfSeriesRelatedInstances")

ALL = frozenset({"000123-2019-ct", "000123-2020-mr", "000123-2022-ct", "123-2019-ct", "acc-1001", "dup-1", "dup-2",
                 "by-uid", "late-2021", "late-2023"})  # fmt: skip
P123 = frozenset({"000123-2019-ct", "000123-2020-mr", "000123-2022-ct"})
WITH_CT = ALL - {"000123-2020-mr", "by-uid"}
LOCALIZERS = frozenset({"000123-2019-ct/Localizer", "000123-2020-mr/Localizer"})


@dataclass
class Pacses:
    """Orthanc and the bundled PACS serving the same scenario."""

    cohort: WrittenCohort
    orthanc_port: int
    devpacs_port: int

    def keys(self, keys: dict[str, Any]) -> dict[str, Any]:
        """``@label`` values become that study's StudyInstanceUID (lists too)."""
        def resolve(value: Any) -> Any:
            if isinstance(value, list):
                return [resolve(v) for v in value]
            if isinstance(value, str) and value.startswith("@"):
                return self.cohort.study(value[1:]).study_instance_uid
            return value

        return {keyword: resolve(value) for keyword, value in keys.items()}

    def find(self, pacs: str, level: str, keys: dict[str, Any], returned: tuple[str, ...] = ()) -> list[Dataset]:
        port, called = (self.orthanc_port, ORTHANC_AET) if pacs == "orthanc" else (self.devpacs_port, "DEVPACS")
        query = _identifier(level, {**dict.fromkeys((*UNIQUE[level], *returned), ""), **self.keys(keys)})
        return _find(port, called, query)

    def series_name(self, series: WrittenSeries) -> str:
        """``label/SeriesDescription``: unique in the scenario."""
        label = next(s.label for s in self.cohort.studies if s.study_instance_uid == series.study_instance_uid)
        return f"{label}/{series.series_description}"

    def names(self, level: str, found: list[Dataset]) -> set[str]:
        """Each match as the scenario names it: ``label`` (study), ``label/description`` (series),
        and at IMAGE level the series of the instance (checked separately to be complete)."""
        if level == "STUDY":
            study = {s.study_instance_uid: s.label for s in self.cohort.studies}
            return {study.get(ds.StudyInstanceUID, f"?{ds.StudyInstanceUID}") for ds in found}
        series = {s.series_instance_uid: self.series_name(s) for s in self.cohort.series}
        return {series.get(ds.SeriesInstanceUID, f"?{ds.SeriesInstanceUID}") for ds in found}


def _identifier(level: str, keys: dict[str, Any]) -> Dataset:
    query = Dataset()
    query.QueryRetrieveLevel = level
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # pydicom warns about wildcards in CS values ("C*")
        for keyword, value in keys.items():
            setattr(query, keyword, value)
    return query


def _find(port: int, called: str, query: Dataset) -> list[Dataset]:
    """One C-FIND on its own association; fails on a non-success final status."""
    ae = AE(ae_title=RECEIVER_AET)  # the one AE title the test Orthanc accepts
    ae.add_requested_context(STUDY_FIND)
    assoc = ae.associate(HOST, port, ae_title=called)
    assert assoc.is_established, f"no association with {called} on port {port}"
    found: list[Dataset] = []
    try:
        for status, identifier in assoc.send_c_find(query, STUDY_FIND):
            assert "Status" in status, f"{called} dropped the C-FIND"
            if status.Status in (0xFF00, 0xFF01):
                found.append(identifier)
            else:
                assert status.Status == 0x0000, f"{called} answered 0x{status.Status:04X} to\n{query}"
    finally:
        assoc.release()
    return found


@pytest.fixture(scope="module")
def pacses(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pacses]:
    root = tmp_path_factory.mktemp("query-keys")
    cohort = request_test_cohort(root / "files")
    with running_orthanc(root, free_port(), wait_on_stop=False) as orthanc, DevPacs(root / "files") as devpacs:
        assert orthanc.load(root / "files") == cohort.instances == 39
        yield Pacses(cohort, orthanc.dicom_port, devpacs.port)


# --------------------------------------------------------------------------------------------
# Same matches on both, and the expected ones.

CASES: list[tuple[str, str, dict[str, Any], frozenset[str]]] = [
    # AccessionNumber: exact, ambiguous, absent, wildcards, and case-sensitive as the standard says.
    ("accession", "STUDY", {"AccessionNumber": "ACC-1001"}, frozenset({"acc-1001"})),
    ("accession-ambiguous", "STUDY", {"AccessionNumber": "ACC-DUP"}, frozenset({"dup-1", "dup-2"})),
    ("accession-missing", "STUDY", {"AccessionNumber": "ACC-MISSING"}, frozenset()),
    ("accession-star", "STUDY", {"AccessionNumber": "ACC-1*"}, frozenset({"acc-1001", "123-2019-ct"})),
    ("accession-question-marks", "STUDY", {"AccessionNumber": "ACC-???-2019"}, frozenset({"123-2019-ct"})),
    ("accession-other-case", "STUDY", {"AccessionNumber": "acc-1001"}, frozenset()),
    # PatientID: leading zeros are part of the ID.
    ("patient-leading-zeros", "STUDY", {"PatientID": "000123"}, P123),
    ("patient-without-zeros", "STUDY", {"PatientID": "123"}, frozenset({"123-2019-ct"})),
    ("patient-fewer-zeros", "STUDY", {"PatientID": "0123"}, frozenset()),
    ("patient-missing", "STUDY", {"PatientID": "NOPE-999"}, frozenset()),
    ("patient-other-case", "STUDY", {"PatientID": "p-acc"}, frozenset()),
    # StudyDate: single date, closed range (bounds included), open ranges.
    ("date-single", "STUDY", {"StudyDate": "20190301"}, frozenset({"000123-2019-ct", "123-2019-ct"})),
    ("date-closed", "STUDY", {"PatientID": "000123", "StudyDate": "20190101-20201231"},
     frozenset({"000123-2019-ct", "000123-2020-mr"})),
    ("date-closed-on-the-bounds", "STUDY", {"PatientID": "000123", "StudyDate": "20190301-20200615"},
     frozenset({"000123-2019-ct", "000123-2020-mr"})),
    ("date-until", "STUDY", {"PatientID": "000123", "StudyDate": "-20200615"}, frozenset({"000123-2019-ct", "000123-2020-mr"})),
    ("date-from", "STUDY", {"PatientID": "000123", "StudyDate": "20200615-"}, frozenset({"000123-2020-mr", "000123-2022-ct"})),
    ("date-window-of-a-later-row", "STUDY", {"PatientID": "P-LATE", "StudyDate": "20210101-20211231"}, frozenset({"late-2021"})),
    # ModalitiesInStudy: a study matches when any of its modalities does.
    ("modalities-window-ct", "STUDY", {"PatientID": "000123", "StudyDate": "20190101-20201231", "ModalitiesInStudy": "CT"},
     frozenset({"000123-2019-ct"})),
    ("modalities-mr", "STUDY", {"PatientID": "000123", "ModalitiesInStudy": "MR"}, frozenset({"000123-2020-mr"})),
    ("modalities-any-series", "STUDY", {"ModalitiesInStudy": "SR"}, frozenset({"000123-2019-ct", "000123-2022-ct"})),
    ("modalities-list", "STUDY", {"ModalitiesInStudy": ["MR", "SR"]}, P123 | {"by-uid"}),
    ("modalities-list-everything", "STUDY", {"ModalitiesInStudy": ["CT", "MR"]}, ALL),
    ("modalities-wildcard", "STUDY", {"ModalitiesInStudy": "C*"}, WITH_CT),
    ("modalities-other-case", "STUDY", {"ModalitiesInStudy": "ct"}, frozenset()),
    # StudyInstanceUID (one, or a list) and StudyDescription.
    ("study-uid", "STUDY", {"StudyInstanceUID": "@by-uid"}, frozenset({"by-uid"})),
    ("study-uid-list", "STUDY", {"StudyInstanceUID": ["@dup-1", "@late-2023"]}, frozenset({"dup-1", "late-2023"})),
    ("description", "STUDY", {"StudyDescription": "MR*"}, frozenset({"000123-2020-mr", "by-uid"})),
    ("description-other-case", "STUDY", {"StudyDescription": "*chest*"}, frozenset()),
    # SERIES: SeriesDescription wildcards (case-sensitive), Modality, SeriesNumber, study keys.
    ("series-localizer", "SERIES", {"SeriesDescription": "*Localizer*"}, LOCALIZERS),
    ("series-localizer-other-case", "SERIES", {"SeriesDescription": "*localizer*"}, frozenset()),
    ("series-exact-description", "SERIES", {"SeriesDescription": "Localizer"}, LOCALIZERS),
    ("series-description-in-a-study", "SERIES", {"StudyInstanceUID": "@000123-2019-ct", "SeriesDescription": "Axial*"},
     frozenset({"000123-2019-ct/Axial 5.0 mm"})),
    ("series-description-list-is-literal", "SERIES", {"SeriesDescription": ["Localizer", "T1*"]}, LOCALIZERS),
    ("series-modality-sr", "SERIES", {"Modality": "SR"}, frozenset({"000123-2019-ct/Report", "000123-2022-ct/Dose Report"})),
    ("series-modality-in-a-study", "SERIES", {"StudyInstanceUID": "@000123-2019-ct", "Modality": "CT"},
     frozenset({"000123-2019-ct/Localizer", "000123-2019-ct/Axial 5.0 mm"})),
    ("series-number-and-modality", "SERIES", {"SeriesNumber": "1", "Modality": "MR"},
     frozenset({"000123-2020-mr/Localizer", "by-uid/PD sagittal"})),
    ("series-by-accession", "SERIES", {"AccessionNumber": "ACC-DUP"}, frozenset({"dup-1/Axial 5.0 mm", "dup-2/Axial 5.0 mm"})),
    ("series-by-patient-and-window", "SERIES", {"PatientID": "000123", "StudyDate": "20200101-", "Modality": "SR"},
     frozenset({"000123-2022-ct/Dose Report"})),
    # IMAGE: SOPClassUID (one, or a list).
    ("image-dose-sr", "IMAGE", {"SOPClassUID": XRAY_RADIATION_DOSE_SR}, frozenset({"000123-2022-ct/Dose Report"})),
    ("image-classes-in-a-study", "IMAGE", {"StudyInstanceUID": "@000123-2019-ct", "SOPClassUID": [BASIC_TEXT_SR, MRImageStorage]},
     frozenset({"000123-2019-ct/Report"})),
    ("image-mr", "IMAGE", {"SOPClassUID": MRImageStorage},
     frozenset({"000123-2020-mr/Localizer", "000123-2020-mr/T1 axial", "by-uid/PD sagittal"})),
]  # fmt: skip


@pytest.mark.parametrize(("level", "keys", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_same_matches_as_orthanc(pacses: Pacses, level: str, keys: dict[str, Any], expected: frozenset[str]) -> None:
    orthanc = pacses.find("orthanc", level, keys)
    devpacs = pacses.find("devpacs", level, keys)
    assert pacses.names(level, devpacs) == pacses.names(level, orthanc) == set(expected)
    unique = UNIQUE[level][-1]
    assert sorted(ds[unique].value for ds in devpacs) == sorted(ds[unique].value for ds in orthanc)
    if level == "IMAGE":  # every instance of the expected series, nothing else
        wanted = {uid for s in pacses.cohort.series if pacses.series_name(s) in expected for uid in s.sop_instance_uids}
        assert {ds.SOPInstanceUID for ds in devpacs} == wanted


# --------------------------------------------------------------------------------------------
# Same values for the return keys the request report and the series filters read.


def _values(ds: Dataset, keyword: str) -> tuple[str, ...]:
    """A returned value as strings, multi-valued or not (``CT\\SR`` -> ('CT', 'SR'))."""
    value = ds.get(keyword)
    if value is None or value == "":
        return ()
    if isinstance(value, (MultiValue, list, tuple)):
        return tuple(str(v) for v in value)
    return (str(value),)


def _by_unique(found: list[Dataset], unique: str, keywords: tuple[str, ...]) -> dict[str, dict[str, tuple[str, ...]]]:
    return {ds[unique].value: {k: _values(ds, k) for k in keywords} for ds in found}


def test_study_return_keys_agree(pacses: Pacses) -> None:
    devpacs = _by_unique(pacses.find("devpacs", "STUDY", {}, STUDY_RETURN_KEYS), "StudyInstanceUID", STUDY_RETURN_KEYS)
    orthanc = _by_unique(pacses.find("orthanc", "STUDY", {}, STUDY_RETURN_KEYS), "StudyInstanceUID", STUDY_RETURN_KEYS)
    assert devpacs == orthanc
    for study in pacses.cohort.studies:
        got = devpacs[study.study_instance_uid]
        assert got["PatientID"] == (study.patient_id,) and got["AccessionNumber"] == (study.accession_number,)
        assert got["ModalitiesInStudy"] == study.modalities and got["SOPClassesInStudy"] == study.sop_classes
        assert got["NumberOfStudyRelatedSeries"] == (str(len(study.series)),)
        assert got["NumberOfStudyRelatedInstances"] == (str(study.instances),)
        assert got["PatientName"] and got["PatientSex"] and got["PatientBirthDate"]
    assert devpacs[pacses.cohort.study("000123-2022-ct").study_instance_uid]["SOPClassesInStudy"] == (
        str(CTImageStorage), XRAY_RADIATION_DOSE_SR)  # fmt: skip


def test_series_return_keys_agree(pacses: Pacses) -> None:
    devpacs = _by_unique(pacses.find("devpacs", "SERIES", {}, SERIES_RETURN_KEYS), "SeriesInstanceUID", SERIES_RETURN_KEYS)
    orthanc = _by_unique(pacses.find("orthanc", "SERIES", {}, SERIES_RETURN_KEYS), "SeriesInstanceUID", SERIES_RETURN_KEYS)
    assert devpacs == orthanc
    assert {uid: values["NumberOfSeriesRelatedInstances"] for uid, values in devpacs.items()} == {
        s.series_instance_uid: (str(s.instances),) for s in pacses.cohort.series
    }


# --------------------------------------------------------------------------------------------
# Where Orthanc 1.10.1 differs: both answers pinned, so a change on either side is noticed.

DIFFERENCES: list[tuple[str, str, dict[str, Any], frozenset[str], frozenset[str]]] = [
    # SOPClassesInStudy is returned by Orthanc but, as a key, matches no study at all there; the
    # bundled PACS matches it like ModalitiesInStudy (the standard's optional key).
    ("sop-classes-in-study", "STUDY", {"SOPClassesInStudy": XRAY_RADIATION_DOSE_SR},
     frozenset(), frozenset({"000123-2022-ct"})),
    ("sop-classes-in-study-list", "STUDY", {"SOPClassesInStudy": [BASIC_TEXT_SR, XRAY_RADIATION_DOSE_SR]},
     frozenset(), frozenset({"000123-2019-ct", "000123-2022-ct"})),
    # A SERIES-level key at STUDY level: Orthanc matches nothing, the bundled PACS ignores it.
    ("modality-at-study-level", "STUDY", {"Modality": "MR"}, frozenset(), ALL),
    ("series-description-at-study-level", "STUDY", {"SeriesDescription": "Localizer"}, frozenset(), ALL),
    # Computed counts as keys: Orthanc matches nothing, the bundled PACS compares the counts.
    ("count-as-key", "STUDY", {"NumberOfStudyRelatedSeries": "3"}, frozenset(), frozenset({"000123-2019-ct"})),
]  # fmt: skip


@pytest.mark.parametrize(("level", "keys", "on_orthanc", "on_devpacs"), [d[1:] for d in DIFFERENCES], ids=[d[0] for d in DIFFERENCES])
def test_documented_differences(
    pacses: Pacses, level: str, keys: dict[str, Any], on_orthanc: frozenset[str], on_devpacs: frozenset[str]
) -> None:
    assert pacses.names(level, pacses.find("orthanc", level, keys)) == set(on_orthanc)
    assert pacses.names(level, pacses.find("devpacs", level, keys)) == set(on_devpacs)

