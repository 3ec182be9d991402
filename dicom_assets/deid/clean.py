"""What "clean" (action C of Clean Descriptors and Retain Patient Characteristics) does to text.

The standard asks to "replace with values of similar meaning known not to contain identifying
information". No program can know that of free text, so cleaning here is deliberately narrow
and errs on removal:

* **Free text** (LT, ST, UT, UC: comments, histories, long descriptions) and **names** (PN) are
  emptied. Sentences are where people write names, dates of birth and phone numbers in every
  spelling; scrubbing them is unreliable, so nothing of them is kept.
* **Short descriptors** (SH, LO, CS: StudyDescription, SeriesDescription, ProtocolName,
  BodyPartExamined...) are kept after removing, case-insensitively and as whole words, every
  identifier of the instance we know (the names of the patient, physicians and operators, the
  PatientID and other IDs, accession number, study ID, institution and station names, device
  serial number), anything shaped like a date (``2019-03-04``, ``04.03.2019``), a run of five or
  more digits (IDs, dates without separators), an e-mail address, a phone number, and the word
  after a title (``Dr. Smith``). ``CT CHEST Smith 12345678`` becomes ``CT CHEST``.

What survives is what a descriptor usually is: protocol and anatomy words, short numbers
(``5.0 mm``). A name we do not know of (a relative's, a misspelling) in a descriptor would
survive: a site that cannot accept that leaves Clean Descriptors off (the default), and the
descriptors are removed.
"""

from __future__ import annotations

import re
from typing import Iterable

from pydicom.dataset import Dataset
from pydicom.multival import MultiValue

__all__ = ["TextCleaner", "IDENTIFYING_KEYWORDS"]

#: Top-level attributes whose values are identity a descriptor might repeat.
IDENTIFYING_KEYWORDS = (
    "PatientName", "PatientID", "OtherPatientIDs", "OtherPatientNames", "PatientBirthName", "PatientMotherBirthName",
    "PatientAddress", "PatientTelephoneNumbers", "IssuerOfPatientID", "AccessionNumber", "StudyID", "AdmissionID",
    "MedicalRecordLocator", "RequestedProcedureID", "InstitutionName", "InstitutionAddress",
    "InstitutionalDepartmentName", "ReferringPhysicianName", "PerformingPhysicianName", "NameOfPhysiciansReadingStudy",
    "OperatorsName", "PhysiciansOfRecord", "RequestingPhysician", "ResponsiblePerson", "ResponsibleOrganization",
    "StationName", "DeviceSerialNumber", "PatientBirthDate",
)  # fmt: skip
_SCRUBBED_VRS = frozenset({"SH", "LO", "CS"})
_PATTERNS = re.compile(
    r"""
    \b(?:dr|mr|mrs|ms|prof|herr|frau|mme|mlle)\.?\s+\S+   # a title and the name after it
    | \S+@\S+                                             # an e-mail address
    | \+?\d[\d\s()/-]{6,}\d                               # a phone number
    | \b\d{1,4}[./-]\d{1,2}[./-]\d{1,4}\b                 # a date with separators
    | \d{5,}                                              # IDs, dates without separators
    """,
    re.IGNORECASE | re.VERBOSE,
)
_SPLIT = re.compile(r"[\^=\\,;:/\s]+")


def _tokens(value: object) -> Iterable[str]:
    """The whole value and each of its parts (name components, words), 2 characters or more."""
    values = value if isinstance(value, (list, tuple, MultiValue)) else [value]
    for v in values:
        text = str(v).strip()
        if len(text) >= 2:
            yield text
        for part in _SPLIT.split(text):
            part = part.strip(".-_()")
            if len(part) >= 2:
                yield part


class TextCleaner:
    """Cleans descriptor text of one instance, knowing that instance's identifiers."""

    def __init__(self, identifiers: Iterable[str]) -> None:
        words = sorted({w for w in identifiers if len(w) >= 2}, key=len, reverse=True)
        alternation = "|".join(re.escape(w) for w in words)
        self._known = re.compile(rf"(?<![0-9A-Za-z])(?:{alternation})(?![0-9A-Za-z])", re.IGNORECASE) if words else None

    @classmethod
    def from_dataset(cls, ds: Dataset) -> "TextCleaner":
        """A cleaner for ``ds``, reading its identifiers *before* anything is changed."""
        found: list[str] = []
        for keyword in IDENTIFYING_KEYWORDS:
            value = ds.get(keyword)
            if value not in (None, ""):
                found.extend(_tokens(value))
        return cls(found)

    def clean(self, vr: str, text: str) -> str:
        """``text`` of ``vr`` cleaned: emptied for free text and names, scrubbed for descriptors."""
        if vr not in _SCRUBBED_VRS:
            return ""
        parts = []
        for value in text.split("\\"):
            if self._known is not None:
                value = self._known.sub(" ", value)
            value = _PATTERNS.sub(" ", value)
            parts.append(" ".join(value.split()).strip(" -_,;:/()"))
        return "\\".join(parts) if any(parts) else ""
