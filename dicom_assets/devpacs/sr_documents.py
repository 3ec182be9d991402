"""Small, valid structured reports for the planned cohort (:mod:`~dicom_assets.devpacs.request_cohort`).

Series filters skip reports by SOP class (a text report, a CT dose report) and by Modality
``SR``, so the tests need real SR objects, not images relabelled: a one-instance SR series
whose document DCMTK's ``dsrdump`` reads without a complaint about its structure.

* ``sr``: a Basic Text SR (TID 2000 shape): a finding and an impression text.
* ``dose_sr``: an X-Ray Radiation Dose SR (TID 10011 shape): procedure reported, a device
  observer, irradiation start/end, the accumulated DLP and one CT acquisition, plus the Enhanced
  General Equipment attributes that SOP class requires. Values are synthetic.
"""

from __future__ import annotations

from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import generate_uid

from dicom_assets.devpacs.cohort import INSTITUTION, UTF8_CHARSET, _needs_utf8, _Patient, _Study

__all__ = ["BASIC_TEXT_SR", "SR_SOP_CLASSES", "XRAY_RADIATION_DOSE_SR", "sr_document"]

BASIC_TEXT_SR = "1.2.840.10008.5.1.4.1.1.88.11"
XRAY_RADIATION_DOSE_SR = "1.2.840.10008.5.1.4.1.1.88.67"
#: Series kind -> the SOP class of its document.
SR_SOP_CLASSES = {"sr": BASIC_TEXT_SR, "dose_sr": XRAY_RADIATION_DOSE_SR}
#: The (synthetic) modality that "made" every dose report: the Device Observer UID.
_DEVICE_UID = str(generate_uid(entropy_srcs=["dicom-assets-devpacs-dose-device"]))


def _code(value: str, scheme: str, meaning: str) -> Dataset:
    code = Dataset()
    code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning = value, scheme, meaning
    return code


def _item(relationship: str, value_type: str, concept: Dataset, **values: object) -> Dataset:
    """One SR content item: ``relationship`` ``value_type`` ``concept`` plus its value attributes."""
    item = Dataset()
    item.RelationshipType = relationship
    item.ValueType = value_type
    item.ConceptNameCodeSequence = DicomSequence([concept])
    for keyword, value in values.items():
        setattr(item, keyword, value)
    return item


def _num(concept: Dataset, value: str, unit: Dataset) -> Dataset:
    measured = Dataset()
    measured.NumericValue = value
    measured.MeasurementUnitsCodeSequence = DicomSequence([unit])
    return _item("CONTAINS", "NUM", concept, MeasuredValueSequence=DicomSequence([measured]))


def _header(patient: _Patient, study: _Study, uids: tuple[str, str, str], number: int, description: str, time: str) -> Dataset:
    """Patient, study, SR Document Series and SR Document General attributes of a one-instance
    series; ``uids`` is (SOP Class UID, Series Instance UID, SOP Instance UID)."""
    ds = Dataset()
    if _needs_utf8(patient.patient_id, patient.name, study.description, description):
        ds.SpecificCharacterSet = UTF8_CHARSET
    ds.SOPClassUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = uids
    ds.StudyDate, ds.StudyTime = study.date, study.time
    ds.SeriesDate = ds.ContentDate = study.date
    ds.SeriesTime = ds.ContentTime = time
    ds.AccessionNumber = study.accession
    ds.Modality = "SR"
    ds.Manufacturer = "dicom_assets devpacs"
    ds.InstitutionName = INSTITUTION
    ds.ReferringPhysicianName = ""
    ds.StudyDescription = study.description
    ds.SeriesDescription = description
    ds.PatientName, ds.PatientID = patient.name, patient.patient_id
    ds.PatientBirthDate, ds.PatientSex = patient.birth_date, patient.sex
    ds.StudyInstanceUID = study.uid
    ds.StudyID, ds.SeriesNumber, ds.InstanceNumber = study.study_id, number, 1
    ds.ReferencedPerformedProcedureStepSequence = DicomSequence()  # type 2 of the SR Document Series module
    ds.PerformedProcedureCodeSequence = DicomSequence()  # type 2 of the SR Document General module
    ds.CompletionFlag, ds.VerificationFlag = "COMPLETE", "UNVERIFIED"
    ds.ValueType, ds.ContinuityOfContent = "CONTAINER", "SEPARATE"
    return ds


def _text_report(ds: Dataset) -> None:
    """A Basic Text SR body (TID 2000 shape): a finding and an impression text."""
    ds.ConceptNameCodeSequence = DicomSequence([_code("18748-4", "LN", "Diagnostic Imaging Report")])
    ds.ContentSequence = DicomSequence([
        _item("CONTAINS", "TEXT", _code("121071", "DCM", "Finding"), TextValue="No focal lesion. Synthetic report."),
        _item("CONTAINS", "TEXT", _code("121073", "DCM", "Impression"), TextValue="Normal study."),
    ])  # fmt: skip


def _ct_acquisition(dlp: str) -> Dataset:
    """TID 10013 shape: one sequenced acquisition with its CTDIvol and DLP."""
    acquisition = _item("CONTAINS", "CONTAINER", _code("113819", "DCM", "CT Acquisition"), ContinuityOfContent="SEPARATE")
    acquisition.ContentSequence = DicomSequence([
        _item("CONTAINS", "CODE", _code("113820", "DCM", "CT Acquisition Type"),
              ConceptCodeSequence=DicomSequence([_code("113804", "DCM", "Sequenced Acquisition")])),
        _num(_code("113830", "DCM", "Mean CTDIvol"), "10", _code("mGy", "UCUM", "mGy")),
        _num(_code("113838", "DCM", "DLP"), dlp, _code("mGy.cm", "UCUM", "mGy.cm")),
    ])  # fmt: skip
    return acquisition


def _accumulated(dlp: str) -> Dataset:
    """TID 10012 shape: the study's total DLP over one irradiation event."""
    accumulated = _item("CONTAINS", "CONTAINER", _code("113811", "DCM", "CT Accumulated Dose Data"), ContinuityOfContent="SEPARATE")
    accumulated.ContentSequence = DicomSequence([
        _num(_code("113812", "DCM", "Total Number of Irradiation Events"), "1", _code("{events}", "UCUM", "events")),
        _num(_code("113813", "DCM", "CT Dose Length Product Total"), dlp, _code("mGy.cm", "UCUM", "mGy.cm")),
    ])  # fmt: skip
    return accumulated


def _dose_report(ds: Dataset, seed: int) -> None:
    """An X-Ray Radiation Dose SR body (TID 10011 shape); the DLP varies with the seed."""
    ds.ManufacturerModelName, ds.DeviceSerialNumber, ds.SoftwareVersions = "devpacs", "0001", "1"  # Enhanced General Equipment
    template = Dataset()
    template.MappingResource, template.TemplateIdentifier = "DCMR", "10011"
    ds.ContentTemplateSequence = DicomSequence([template])
    ds.ConceptNameCodeSequence = DicomSequence([_code("113701", "DCM", "X-Ray Radiation Dose Report")])
    irradiated = f"{ds.ContentDate}{ds.ContentTime}"
    dlp = f"{200 + seed % 300}"
    ds.ContentSequence = DicomSequence([
        _item("HAS CONCEPT MOD", "CODE", _code("121058", "DCM", "Procedure reported"),
              ConceptCodeSequence=DicomSequence([_code("77477000", "SCT", "Computed Tomography X-Ray")])),
        _item("HAS OBS CONTEXT", "CODE", _code("121005", "DCM", "Observer Type"),
              ConceptCodeSequence=DicomSequence([_code("121007", "DCM", "Device")])),
        _item("HAS OBS CONTEXT", "UIDREF", _code("121012", "DCM", "Device Observer UID"), UID=_DEVICE_UID),
        _item("HAS OBS CONTEXT", "DATETIME", _code("113809", "DCM", "Start of X-Ray Irradiation"), DateTime=irradiated),
        _item("HAS OBS CONTEXT", "DATETIME", _code("113810", "DCM", "End of X-Ray Irradiation"), DateTime=irradiated),
        _accumulated(dlp),
        _ct_acquisition(dlp),
    ])  # fmt: skip


def sr_document(
    kind: str, patient: _Patient, study: _Study, uids: tuple[str, str], number: int, description: str, time: str, seed: int
) -> Dataset:
    """The dataset (no file meta) of an ``sr`` or ``dose_sr`` document; ``uids`` is (Series
    Instance UID, SOP Instance UID), ``number`` the SeriesNumber, ``time`` its HHMMSS."""
    ds = _header(patient, study, (SR_SOP_CLASSES[kind], *uids), number, description, time)
    if kind == "dose_sr":
        _dose_report(ds, seed)
    else:
        _text_report(ds)
    return ds
