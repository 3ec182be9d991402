"""QidoSession against Orthanc with its DICOMweb plugin: the same answers as DIMSE C-FIND.

One Orthanc (module scope) holds a small cohort with hostile PatientIDs; every test asks QIDO-RS
and C-FIND of that same Orthanc the same question and compares StudyInstanceUIDs,
SeriesInstanceUIDs, SOPInstanceUIDs and counts.
"""

from __future__ import annotations

import logging
import math
from datetime import date
from typing import Any, Iterator

import pytest
from pydicom.dataset import Dataset

from dicom_assets.config import PacsSettings
from dicom_assets.config_dicomweb import DicomwebSettings
from dicom_assets.devpacs import CohortSpec, generate_cohort
from dicom_assets.dicomweb.http import DicomwebHttp
from dicom_assets.dicomweb.qido import QidoSession, wildcard_form
from dicom_assets.pacs.budget import SlidingWindowBudget
from dicom_assets.pacs.client import PacsClient, integer, text
from dicom_assets_tests.conftest import free_port
from dicom_assets_tests.orthanc import (
    ORTHANC_AET,
    RECEIVER_AET,
    OrthancHandle,
    running_orthanc,
)
from dicom_assets_tests.pacs_fixtures import HOSTILE_PATIENT_IDS

#: The issue's IDs that Orthanc 1.10.1's QIDO-RS did not find, a case twin and a prefix twin.
ODD_IDS = ("0202-Zé B/x", "0203-*?", "pat-001", "PAT-0011", "A&B=C+D#E%F")
PATIENT_IDS = (*HOSTILE_PATIENT_IDS, *ODD_IDS)
STUDY_KEYS = ("PatientID", "PatientName", "PatientSex", "PatientBirthDate", "StudyDate", "StudyTime", "AccessionNumber",
              "StudyDescription", "ModalitiesInStudy", "StudyID")  # fmt: skip
COUNT_KEYS = ("NumberOfStudyRelatedSeries", "NumberOfStudyRelatedInstances")


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OrthancHandle]:
    root = tmp_path_factory.mktemp("qido")
    spec = CohortSpec(patients=len(PATIENT_IDS), studies_per_patient=2, series_per_study=2, slices_per_series=2,
                      rows=16, columns=16, patient_ids=PATIENT_IDS, seed=13)  # fmt: skip
    generate_cohort(root / "cohort", spec)
    with running_orthanc(root, free_port(), dicomweb=True, wait_on_stop=False) as handle:
        handle.load(root / "cohort")
        yield handle


@pytest.fixture
def dimse(orthanc: OrthancHandle) -> Iterator[Any]:
    settings = PacsSettings(host="127.0.0.1", port=orthanc.dicom_port, called_ae_title=ORTHANC_AET,
                            calling_ae_title=RECEIVER_AET, timeout_s=10)  # fmt: skip
    with PacsClient(settings).session() as session:
        yield session


def qido_session(orthanc: OrthancHandle, **settings: Any) -> tuple[QidoSession, SlidingWindowBudget]:
    budget = SlidingWindowBudget(10_000)
    http = DicomwebHttp(DicomwebSettings(url=orthanc.dicomweb_url, timeout_s=10, **settings), budget, wait_for_server_s=5)
    return QidoSession(http), budget


@pytest.fixture
def qido(orthanc: OrthancHandle) -> Iterator[QidoSession]:
    session, budget = qido_session(orthanc)
    yield session
    assert session.requests == budget.total  # every HTTP request took a budget token
    session.http.close()


def by_uid(found: list[Dataset], key: str = "StudyInstanceUID") -> dict[str, Dataset]:
    return {str(ds.get(key)): ds for ds in found}


def assert_same_studies(qido_found: list[Dataset], dimse_found: list[Dataset]) -> None:
    q, d = by_uid(qido_found), by_uid(dimse_found)
    assert sorted(q) == sorted(d)
    for uid, ds in d.items():
        answered = [k for k in STUDY_KEYS if text(ds, k) is not None]  # C-FIND of studies asks no demographics
        assert {k: text(q[uid], k) for k in answered} == {k: text(ds, k) for k in answered}, uid
        assert {k: integer(q[uid], k) for k in COUNT_KEYS} == {k: integer(ds, k) for k in COUNT_KEYS}, uid


# -- studies ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("patient_id", PATIENT_IDS)
def test_studies_of_each_patient_equal_dimse(patient_id: str, qido: QidoSession, dimse: Any) -> None:
    expected = dimse.find_studies(patient_id)
    assert len(expected) == 2  # DIMSE finds every one of them
    found = qido.find_studies(patient_id)
    assert_same_studies(found, expected)
    assert {text(ds, "PatientID") for ds in found} == {patient_id}  # exact: no case or prefix twin


def test_odd_ids_switch_the_session_to_wildcard_form(qido: QidoSession, caplog: pytest.LogCaptureFixture) -> None:
    """Orthanc 1.10.1 + DICOMweb 1.7 does not URL-decode query values: the first odd ID costs a
    second query in wildcard form, later ones go straight to it."""
    caplog.set_level(logging.INFO, logger="dicom_assets.dicomweb")
    assert len(qido.find_studies("0202-Zé B/x")) == 2
    assert qido.finds == 2 and qido.server_decodes_values is False
    assert "does not URL-decode query values" in caplog.text
    assert len(qido.find_studies("A&B=C+D#E%F")) == 2
    assert qido.finds == 3


@pytest.mark.parametrize("patient_id", ["0299-Zé nobody", "é"])
def test_an_odd_id_nobody_matches_is_a_warning_naming_it(patient_id: str, qido: QidoSession, orthanc: OrthancHandle,
                                                         caplog: pytest.LogCaptureFixture) -> None:  # fmt: skip
    assert qido.find_studies(patient_id) == []
    warning = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(f"PatientID={patient_id!r}" in m and orthanc.dicomweb_url in m for m in warning), warning


def test_studies_by_date_and_every_study_equal_dimse(qido: QidoSession, dimse: Any) -> None:
    assert_same_studies(qido.find_studies_by_date(None), dimse.find_studies_by_date(None))
    since = date(2022, 1, 1)
    found = qido.find_studies_by_date(since)
    assert_same_studies(found, dimse.find_studies_by_date(since))
    assert found and all(text(ds, "StudyDate") >= "20220101" for ds in found)


def test_studies_matching_keys_equal_dimse(qido: QidoSession, dimse: Any) -> None:
    some = dimse.find_studies("0203-*?")[0]
    for keys in (
        {"AccessionNumber": text(some, "AccessionNumber")},
        {"PatientID": "0203-*?", "StudyDate": f"{text(some, 'StudyDate')}-{text(some, 'StudyDate')}"},
        {"PatientID": "PAT 002/..", "ModalitiesInStudy": "CT"},
        {"StudyInstanceUID": text(some, "StudyInstanceUID")},
    ):
        expected = [ds for ds in dimse.find_studies_matching(**keys) if text(ds, "PatientID") == keys.get("PatientID", text(ds, "PatientID"))]
        assert expected, keys
        assert_same_studies(qido.find_studies_matching(**keys), expected)


def test_patients_equal_dimse(qido: QidoSession, dimse: Any) -> None:
    keys = ("PatientName", "PatientSex", "PatientBirthDate", "NumberOfPatientRelatedStudies",
            "NumberOfPatientRelatedSeries", "NumberOfPatientRelatedInstances")  # fmt: skip
    q, d = by_uid(qido.find_patients(), "PatientID"), by_uid(dimse.find_patients(), "PatientID")
    assert sorted(q) == sorted(d) == sorted(PATIENT_IDS)
    for pid in d:
        assert {k: text(q[pid], k) for k in keys} == {k: text(d[pid], k) for k in keys}, pid


# -- series and instances -------------------------------------------------------------------------------


def test_series_and_instances_equal_dimse(qido: QidoSession, dimse: Any) -> None:
    keys = ("SeriesNumber", "Modality", "SeriesDescription", "BodyPartExamined", "SeriesDate", "SeriesTime")
    for study in dimse.find_studies("PAT*3 José") + dimse.find_studies("0202-Zé B/x"):
        study_uid = text(study, "StudyInstanceUID")
        q, d = by_uid(qido.find_series(study_uid), "SeriesInstanceUID"), by_uid(dimse.find_series(study_uid), "SeriesInstanceUID")
        assert sorted(q) == sorted(d) and len(d) == 2
        for uid, ds in d.items():
            assert {k: text(q[uid], k) for k in keys} == {k: text(ds, k) for k in keys}
            assert integer(q[uid], "NumberOfSeriesRelatedInstances") == integer(ds, "NumberOfSeriesRelatedInstances") == 2
            assert text(q[uid], "StudyInstanceUID") == study_uid
            instances = qido.find_instances(study_uid, uid)
            expected = dimse.find_instances(study_uid, uid)
            assert [(i.sop_instance_uid, i.sop_class_uid) for i in instances] == [(i.sop_instance_uid, i.sop_class_uid) for i in expected]
            assert qido.find_instance_uids(study_uid, uid) == dimse.find_instance_uids(study_uid, uid)
            assert [i.stored_transfer_syntax for i in instances] == [i.stored_transfer_syntax for i in expected]


# -- paging and the result cap -------------------------------------------------------------------------------


def test_small_pages_give_the_same_answers_and_count_every_request(orthanc: OrthancHandle, dimse: Any) -> None:
    session, budget = qido_session(orthanc, page_size=3)
    found = session.find_studies_by_date(None)
    total = len(PATIENT_IDS) * 2
    assert_same_studies(found, dimse.find_studies_by_date(None))
    assert session.finds == math.floor(total / 3) + 1  # full pages, then a short (maybe empty) one
    assert session.requests == budget.total == session.finds
    session.http.close()


def test_a_capped_server_is_split_by_study_date(orthanc: OrthancHandle, dimse: Any, caplog: pytest.LogCaptureFixture) -> None:
    session, budget = qido_session(orthanc, page_size=2, max_results=4)
    found = session.find_studies_by_date(None)
    assert_same_studies(found, dimse.find_studies_by_date(None))
    assert "splitting by StudyDate" in caplog.text
    assert session.finds > len(PATIENT_IDS) and session.requests == budget.total
    patients = session.find_patients()
    assert sorted(text(p, "PatientID") for p in patients) == sorted(PATIENT_IDS)
    session.http.close()


def test_wildcard_form() -> None:
    assert wildcard_form("0202-Zé B/x") == "0202-Z*?B/x"
    assert wildcard_form("0203-*?") == "0203-??"
    assert wildcard_form("PAT*3 José") == "PAT?3?Jos*"
    assert wildcard_form("Zéé") is None and wildcard_form("é") is None  # too little left to match on
