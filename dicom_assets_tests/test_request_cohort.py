"""The planned cohort behind the request-file tests: files, kinds, SR validity, request files, bulk."""

from __future__ import annotations

import shutil
import subprocess
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import openpyxl
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.uid import CTImageStorage, MRImageStorage
from pynetdicom import AE
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind as STUDY_FIND  # type: ignore[attr-defined]

from dicom_assets.devpacs import DevPacs
from dicom_assets.devpacs.request_cohort import (
    BASIC_TEXT_SR,
    REQUEST_TEST_COLUMNS,
    REQUEST_TEST_STUDIES,
    XRAY_RADIATION_DOSE_SR,
    PlannedSeries,
    PlannedStudy,
    WrittenCohort,
    bulk_request_cohort,
    bulk_request_csv,
    request_test_cohort,
    request_test_csv,
    request_test_rows,
    write_planned_cohort,
    write_request_test_xlsx,
)
from dicom_assets.request_file import RequestRow, read_request_file
from dicom_assets_tests.conftest import require_service


@pytest.fixture(scope="module")
def scenario(tmp_path_factory: pytest.TempPathFactory) -> WrittenCohort:
    return request_test_cohort(tmp_path_factory.mktemp("scenario"))


def _files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


def _headers(cohort: WrittenCohort) -> Iterator[tuple[Path, Dataset]]:
    for path in _files(cohort.root):
        yield path, pydicom.dcmread(path)


def _find(port: int, level: str, **keys: object) -> list[Dataset]:
    query = Dataset()
    query.QueryRetrieveLevel = level
    for keyword, value in keys.items():
        setattr(query, keyword, value)
    ae = AE(ae_title="TESTSCU")
    ae.add_requested_context(STUDY_FIND)
    assoc = ae.associate("127.0.0.1", port, ae_title="DEVPACS")
    assert assoc.is_established
    try:
        return [ds for status, ds in assoc.send_c_find(query, STUDY_FIND) if status.Status in (0xFF00, 0xFF01)]
    finally:
        assoc.release()


def _multi(value: object) -> tuple[str, ...]:
    """A multi-valued response value as a tuple (pydicom gives one value as a plain string)."""
    return tuple(str(v) for v in value) if isinstance(value, (MultiValue, list)) else (str(value),)


# --------------------------------------------------------------------------------------------
# The scenario on disk.


def test_scenario_counts_and_layout(scenario: WrittenCohort) -> None:
    files = _files(scenario.root)
    assert scenario.patients == ("000123", "123", "P-ACC", "P-DUP1", "P-DUP2", "P-LATE", "P-UID")
    assert (len(scenario.studies), len(scenario.series), scenario.instances) == (10, 14, 39)
    assert len(files) == 39 and scenario.bytes == sum(p.stat().st_size for p in files)
    assert [s.label for s in scenario.studies] == [p.label for p in REQUEST_TEST_STUDIES]
    assert [s.study_date for s in scenario.studies_of("000123")] == ["20190301", "20200615", "20220110"]
    assert [s.label for s in scenario.with_accession("ACC-DUP")] == ["dup-1", "dup-2"]
    assert [s.patient_id for s in scenario.studies_of("123")] == ["123"]
    summary = scenario.summary()
    assert summary.instances == 39 and summary.studies == 10 and summary.patients == scenario.patients
    for path, ds in _headers(scenario):
        assert path.relative_to(scenario.root).parts == (ds.StudyInstanceUID, ds.SeriesInstanceUID, f"{ds.SOPInstanceUID}.dcm")
        assert ds.SOPClassUID == ds.file_meta.MediaStorageSOPClassUID


def test_headers_match_the_plan(scenario: WrittenCohort) -> None:
    by_series = {s.series_instance_uid: s for s in scenario.series}
    by_study = {s.study_instance_uid: s for s in scenario.studies}
    demographics: dict[str, set[tuple[str, str, str]]] = {}
    for _, ds in _headers(scenario):
        series, study = by_series[ds.SeriesInstanceUID], by_study[ds.StudyInstanceUID]
        assert (ds.PatientID, ds.StudyDate, ds.AccessionNumber) == (study.patient_id, study.study_date, study.accession_number)
        assert (ds.StudyDescription, ds.Modality, ds.SeriesDescription) == (study.study_description, series.modality,
                                                                             series.series_description)  # fmt: skip
        assert (ds.SeriesNumber, ds.SOPClassUID) == (series.series_number, series.sop_class_uid)
        demographics.setdefault(ds.PatientID, set()).add((str(ds.PatientName), ds.PatientSex, ds.PatientBirthDate))
    assert all(len(d) == 1 for d in demographics.values()), "a patient has one name, sex and birth date in all studies"
    assert scenario.study("000123-2019-ct").modalities == ("CT", "SR")
    assert scenario.study("000123-2020-mr").modalities == ("MR",), "an MR study's localizer is MR, never CT"


def test_series_kinds(scenario: WrittenCohort) -> None:
    kinds = Counter((s.kind, s.modality, s.series_description) for s in scenario.series)
    assert kinds[("localizer", "CT", "Localizer")] == 1 and kinds[("localizer", "MR", "Localizer")] == 1
    assert kinds[("sr", "SR", "Report")] == 1 and kinds[("dose_sr", "SR", "Dose Report")] == 1
    by_series = {s.series_instance_uid: s for s in scenario.series}
    for _, ds in _headers(scenario):
        kind = by_series[ds.SeriesInstanceUID].kind
        if kind in ("image", "localizer"):
            assert ds.SOPClassUID == {"CT": CTImageStorage, "MR": MRImageStorage}[ds.Modality]
            assert ds.pixel_array.shape == (32, 32)
            assert list(ds.ImageType)[-1] == ("LOCALIZER" if kind == "localizer" else "AXIAL")
            assert ("RescaleSlope" in ds) == (ds.Modality == "CT")


def _sr_files(cohort: WrittenCohort) -> dict[str, Path]:
    return {s.kind: cohort.root / s.study_instance_uid / s.series_instance_uid / f"{s.sop_instance_uids[0]}.dcm"
            for s in cohort.series if s.kind in ("sr", "dose_sr")}  # fmt: skip


def test_structured_reports_read_back(scenario: WrittenCohort) -> None:
    files = _sr_files(scenario)
    text, dose = pydicom.dcmread(files["sr"]), pydicom.dcmread(files["dose_sr"])
    assert (text.SOPClassUID, text.Modality, text.SeriesDescription) == (BASIC_TEXT_SR, "SR", "Report")
    assert (dose.SOPClassUID, dose.Modality, dose.SeriesDescription) == (XRAY_RADIATION_DOSE_SR, "SR", "Dose Report")
    for ds in (text, dose):
        assert ds.ValueType == "CONTAINER" and ds.CompletionFlag == "COMPLETE" and len(ds.ContentSequence) >= 2
    assert dose.ConceptNameCodeSequence[0].CodeValue == "113701"
    assert dose.ContentTemplateSequence[0].TemplateIdentifier == "10011"
    accumulated = next(i for i in dose.ContentSequence if i.ConceptNameCodeSequence[0].CodeValue == "113811")
    dlp = next(i for i in accumulated.ContentSequence if i.ConceptNameCodeSequence[0].CodeValue == "113813")
    assert float(dlp.MeasuredValueSequence[0].NumericValue) > 0


def test_structured_reports_pass_dcmtk(scenario: WrittenCohort) -> None:
    """DCMTK's dsrdump checks the SR document's structure and relationships for its SOP class."""
    dsrdump = shutil.which("dsrdump")
    require_service(dsrdump is not None, "DCMTK dsrdump (Debian package dcmtk)")
    assert dsrdump is not None
    for kind, path in _sr_files(scenario).items():
        done = subprocess.run([dsrdump, "-v", str(path)], capture_output=True, text=True, timeout=30)
        problems = [line for line in (done.stdout + done.stderr).splitlines()
                    if line.startswith(("E:", "W:")) and "VR checker does not support" not in line]  # fmt: skip
        assert done.returncode == 0 and not problems, f"{kind}: {problems or done.stderr}"
    assert "X-Ray Radiation Dose SR Document" in subprocess.run(
        [dsrdump, str(_sr_files(scenario)["dose_sr"])], capture_output=True, text=True, timeout=30).stdout  # fmt: skip


def test_uids_are_deterministic(tmp_path: Path, scenario: WrittenCohort) -> None:
    plan = [PlannedStudy("X1", "20200101", "A1", "CT CHEST", [PlannedSeries(), PlannedSeries("SR", kind="sr")])]
    first, again = write_planned_cohort(tmp_path / "a", plan), write_planned_cohort(tmp_path / "b", plan)
    other = write_planned_cohort(tmp_path / "c", plan, seed=1)
    assert first.series == again.series  # same UIDs, same sizes
    assert not {s.series_instance_uid for s in first.series} & {s.series_instance_uid for s in other.series}
    assert [s.study_instance_uid for s in request_test_cohort(tmp_path / "d").studies] == [
        s.study_instance_uid for s in scenario.studies
    ]


def test_plan_is_checked() -> None:
    with pytest.raises(ValueError, match="kind"):
        PlannedSeries("CT", kind="scout")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="CT or MR"):
        PlannedSeries("US")
    with pytest.raises(ValueError, match="Modality SR"):
        PlannedSeries("CT", kind="dose_sr")
    with pytest.raises(ValueError):
        PlannedStudy("X", "2020-01-01", "A", "CT")


def test_served_by_the_bundled_pacs(scenario: WrittenCohort) -> None:
    with DevPacs(scenario.root) as pacs:
        studies = _find(pacs.port, "STUDY", StudyInstanceUID="", NumberOfStudyRelatedInstances="", SOPClassesInStudy="")
        localizers = _find(pacs.port, "SERIES", SeriesInstanceUID="", SeriesDescription="*Localizer*")
    counts = {ds.StudyInstanceUID: (int(ds.NumberOfStudyRelatedInstances), _multi(ds.SOPClassesInStudy)) for ds in studies}
    assert counts == {s.study_instance_uid: (s.instances, s.sop_classes) for s in scenario.studies}
    assert {ds.SeriesInstanceUID for ds in localizers} == {s.series_instance_uid for s in scenario.series if s.kind == "localizer"}


# --------------------------------------------------------------------------------------------
# The request file, as CSV and as XLSX.

EXPECTED_ROWS = [
    RequestRow(2, patient_id="000123", study_date_from="20190101", study_date_until="20201231", modalities=("CT",),
               extra={"Subject": "S01"}),
    RequestRow(3, patient_id="000123", modalities=("MR",), extra={"Subject": "S02"}),
    RequestRow(4, accession_number="ACC-1001", extra={"Subject": "S03"}),
    RequestRow(5, accession_number="ACC-DUP", extra={"Subject": "S04"}),
    RequestRow(6, study_instance_uid="<by-uid>", extra={"Subject": "S05"}),
    RequestRow(7, patient_id="NOPE-999", extra={"Subject": "S06"}),
    RequestRow(8, accession_number="ACC-MISSING", extra={"Subject": "S07"}),
    RequestRow(9, patient_id="P-LATE", study_date_from="20210101", study_date_until="20211231", extra={"Subject": "S08"}),
    RequestRow(10, accession_number="ACC-LATE-2023", extra={"Subject": "S09"}),
]  # fmt: skip


def _comparable(row: RequestRow, uid: str) -> tuple[object, ...]:
    """A row's fields, the description regex as its pattern, ``<by-uid>`` as the scenario's UID."""
    study_uid = uid if row.study_instance_uid == "<by-uid>" else row.study_instance_uid
    return (row.row, row.patient_id, row.accession_number, study_uid, row.study_date_from, row.study_date_until,
            row.modalities, row.extra)  # fmt: skip


@pytest.mark.parametrize("late", [False, True])
@pytest.mark.parametrize("suffix", [".csv", ".xlsx"])
def test_request_file_reads_as_planned(tmp_path: Path, scenario: WrittenCohort, suffix: str, late: bool) -> None:
    path = tmp_path / f"request{suffix}"
    if suffix == ".csv":
        path.write_text(request_test_csv(scenario, late=late), encoding="utf-8")
    else:
        write_request_test_xlsx(path, scenario, late=late)
    request = read_request_file(path)
    uid = scenario.study("by-uid").study_instance_uid
    expected = EXPECTED_ROWS if late else EXPECTED_ROWS[:7]
    assert [_comparable(r, uid) for r in request.rows] == [_comparable(r, uid) for r in expected]
    assert request.extra_columns == ("Subject",)
    assert request.rows[1].study_description is not None and request.rows[1].study_description.search("MR BRAIN")
    assert [r.study_description for r in request.rows if r.row != 3] == [None] * (len(expected) - 1)
    scenario_rows = request_test_rows(scenario, late=late)
    assert [r.row for r in scenario_rows] == [r.row for r in request.rows]
    assert [r.subject for r in scenario_rows] == [r.extra["Subject"] for r in request.rows]


def test_xlsx_cells_are_text(tmp_path: Path, scenario: WrittenCohort) -> None:
    path = write_request_test_xlsx(tmp_path / "request.xlsx", scenario)
    sheet = openpyxl.load_workbook(path).worksheets[0]
    assert [c.value for c in sheet[1]] == list(REQUEST_TEST_COLUMNS)
    cells = [c for row in sheet.iter_rows() for c in row]
    assert all(c.number_format == "@" for c in cells)
    assert all(isinstance(c.value, str) for c in cells if c.value is not None)
    assert sheet["A2"].value == "000123"


def test_scenario_rows_point_at_real_studies(scenario: WrittenCohort) -> None:
    """Each row's expected studies satisfy the row (patient, window, modality, accession, UID)."""
    for row in request_test_rows(scenario, late=True):
        studies = [scenario.study(label) for label in row.studies]
        cells = row.cells
        if "AccessionNumber" in cells:
            assert set(studies) == set(scenario.with_accession(cells["AccessionNumber"]))
        if "PatientID" in cells:
            assert all(s.patient_id == cells["PatientID"] for s in studies)
        if "Modality" in cells:
            assert all(cells["Modality"] in s.modalities for s in studies)
        assert (row.outcome == "ambiguous") == (len(studies) > 1) and (row.outcome == "not found") == (not studies)
    assert [r.subject for r in request_test_rows(scenario)] == [f"S0{i}" for i in range(1, 8)]


# --------------------------------------------------------------------------------------------
# The 1,000-row benchmark cohort.


def test_bulk_cohort_and_its_request_file(tmp_path: Path) -> None:
    cohort = bulk_request_cohort(tmp_path / "bulk")
    assert (len(cohort.patients), len(cohort.studies), len(cohort.series), cohort.instances) == (1000, 1000, 1000, 1000)
    assert len(_files(cohort.root)) == 1000 and cohort.patients[0] == "00000001"
    assert cohort.bytes < 5_000_000
    path = tmp_path / "bulk.csv"
    path.write_text(bulk_request_csv(cohort), encoding="utf-8")
    request = read_request_file(path)
    assert [r.patient_id for r in request.rows] == list(cohort.patients)
    assert request.rows[-1].row == 1001 and request.rows[-1].extra == {"Subject": "B01000"}
    with DevPacs(cohort.root) as pacs:
        found = _find(pacs.port, "STUDY", PatientID="", StudyInstanceUID="")
        one = _find(pacs.port, "STUDY", PatientID="00000042", StudyInstanceUID="")
    assert len(found) == 1000 and {ds.PatientID for ds in found} == set(cohort.patients)
    assert [ds.StudyInstanceUID for ds in one] == [cohort.studies_of("00000042")[0].study_instance_uid]
