"""What a site chooses for its de-identified copies: the PS3.15 options, the clinical trial it
shares under, and which series are left out for fear of burned-in text.

The options map onto the option columns of Table E.1-1 (:data:`dicom_assets.deid.profile.OPTIONS`);
:meth:`DeidOptions.method_codes` names the profile and the options in use with their CID 7050
codes, taken from pydicom's copy of the DICOM code tables (PS3.16), not typed here.

**Why whole series are left out.** The profile only treats the header. Pixel data is copied byte
for byte, so text burned into the pixels (names on an ultrasound screen, a screenshot of a
report, a scanned request form) would leak. Nothing here reads pixels; instead, series whose
modality or SOP class typically carries such text are left out unless the site opts in
(``keep_burned_in``). The defaults:

* modalities ``US`` (ultrasound screens carry patient names), ``SC``/``OT`` (screen saves,
  scanned documents), ``XC``/``ES``/``GM``/``SM`` (photographs, endoscopy, microscopy: faces,
  slide labels with names), ``DOC`` (documents), ``IVUS``;
* SOP classes of secondary captures, ultrasound, visible-light photography/video and
  encapsulated documents (PDF, CDA: the document itself holds the identity; the profile would
  replace it by a dummy anyway).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from functools import lru_cache

from pydicom import uid as _uid

__all__ = [
    "ClinicalTrial",
    "DEFAULT_BURNED_IN_MODALITIES",
    "DEFAULT_BURNED_IN_SOP_CLASSES",
    "DeidOptions",
    "SafePrivate",
]

DEFAULT_BURNED_IN_MODALITIES: tuple[str, ...] = ("US", "SC", "OT", "XC", "ES", "GM", "SM", "DOC", "IVUS")
DEFAULT_BURNED_IN_SOP_CLASSES: tuple[str, ...] = tuple(
    str(u)
    for u in (
        _uid.SecondaryCaptureImageStorage,
        _uid.MultiFrameSingleBitSecondaryCaptureImageStorage,
        _uid.MultiFrameGrayscaleByteSecondaryCaptureImageStorage,
        _uid.MultiFrameGrayscaleWordSecondaryCaptureImageStorage,
        _uid.MultiFrameTrueColorSecondaryCaptureImageStorage,
        _uid.UltrasoundImageStorage,
        _uid.UltrasoundMultiFrameImageStorage,
        _uid.EnhancedUSVolumeStorage,
        _uid.VLEndoscopicImageStorage,
        _uid.VideoEndoscopicImageStorage,
        _uid.VLMicroscopicImageStorage,
        _uid.VideoMicroscopicImageStorage,
        _uid.VLSlideCoordinatesMicroscopicImageStorage,
        _uid.VLPhotographicImageStorage,
        _uid.VideoPhotographicImageStorage,
        _uid.EncapsulatedPDFStorage,
        _uid.EncapsulatedCDAStorage,
    )
)

#: A private element a site declares safe: (private creator, group, element offset 0x00-0xFF),
#: e.g. ``("SIEMENS CT VA0  COAD", 0x0019, 0x23)`` for (0019,xx23) of that creator.
SafePrivate = tuple[str, int, int]


@dataclass(frozen=True)
class ClinicalTrial:
    """The Clinical Trial Subject / Study attributes written into every de-identified instance
    (the fields are those of the ``deidentify.trial`` config section; blank ones are left out)."""

    sponsor_name: str | None = None
    protocol_id: str | None = None
    protocol_name: str | None = None
    site_id: str | None = None
    site_name: str | None = None

    def is_empty(self) -> bool:
        return not any(getattr(self, f.name) for f in fields(self))


@dataclass(frozen=True)
class DeidOptions:
    """The PS3.15 Annex E options a site uses (each one is an option column of Table E.1-1).

    * ``retain_longitudinal_modified_dates``: dates move back by a per-patient number of days
      (intervals between a patient's studies are kept); times are kept. Off: dates are removed
      or replaced by a dummy as the Basic Profile says.
    * ``clean_descriptors``: descriptions (StudyDescription, SeriesDescription, ProtocolName...)
      are kept after cleaning (see :mod:`dicom_assets.deid.clean` for what cleaning removes);
      off: removed.
    * ``retain_patient_characteristics``: sex, age, size, weight, ethnic group, smoking and
      pregnancy status are kept.
    * ``retain_device_identity``: device serial numbers, station names, device UIDs are kept.
    * ``retain_institution_identity``: institution name/address/department are kept.
    * ``retain_safe_private``: private elements listed in ``safe_private`` are kept; every other
      private element is always removed. No source of the standard's list of safe private
      attributes is at hand, so ``safe_private`` is empty unless the site fills it in: with the
      default, this option still removes every private element.
    * ``keep_burned_in``: opt in to series that may carry burned-in text (see the module doc).
    """

    retain_longitudinal_modified_dates: bool = True
    clean_descriptors: bool = False
    retain_patient_characteristics: bool = False
    retain_device_identity: bool = False
    retain_safe_private: bool = False
    keep_burned_in: bool = False
    burned_in_modalities: tuple[str, ...] = DEFAULT_BURNED_IN_MODALITIES
    trial: ClinicalTrial | None = None
    retain_institution_identity: bool = False
    burned_in_sop_classes: tuple[str, ...] = DEFAULT_BURNED_IN_SOP_CLASSES
    safe_private: tuple[SafePrivate, ...] = ()

    def __post_init__(self) -> None:
        # Normalise what a config file may hand in (lists, lower case) so equality and hashing work.
        object.__setattr__(self, "burned_in_modalities", tuple(str(m).strip().upper() for m in self.burned_in_modalities))
        object.__setattr__(self, "burned_in_sop_classes", tuple(str(u).strip() for u in self.burned_in_sop_classes))
        object.__setattr__(self, "safe_private", tuple((str(c), int(g), int(e)) for c, g, e in self.safe_private))
        for creator, group, offset in self.safe_private:
            if not group & 1 or not 0 <= offset <= 0xFF:
                raise ValueError(f"safe_private entry ({creator!r}, {group:#06x}, {offset:#04x}) is not a private element")

    def profile_options(self) -> frozenset[str]:
        """The option columns of :data:`dicom_assets.deid.profile.OPTIONS` this site uses."""
        chosen = {
            "retain_modified_dates": self.retain_longitudinal_modified_dates,
            "clean_descriptors": self.clean_descriptors,
            "retain_patient_characteristics": self.retain_patient_characteristics,
            "retain_device_identity": self.retain_device_identity,
            "retain_institution_identity": self.retain_institution_identity,
            "retain_safe_private": self.retain_safe_private,
        }
        return frozenset(name for name, on in chosen.items() if on)

    def method_codes(self) -> list[tuple[str, str, str]]:
        """(code value, coding scheme "DCM", code meaning) from CID 7050 for the Basic Profile and
        each option used, in code order; what DeidentificationMethodCodeSequence holds."""
        used = {"basic"} | set(self.profile_options())
        return [code for key, code in _cid7050().items() if key in used]


#: Our option names -> the CID 7050 keyword pydicom uses for the code.
_CID7050_KEYWORDS = {
    "basic": "BasicApplicationConfidentialityProfile",
    "clean_descriptors": "CleanDescriptorsOption",
    "retain_modified_dates": "RetainLongitudinalTemporalInformationModifiedDatesOption",
    "retain_patient_characteristics": "RetainPatientCharacteristicsOption",
    "retain_device_identity": "RetainDeviceIdentityOption",
    "retain_safe_private": "RetainSafePrivateOption",
    "retain_institution_identity": "RetainInstitutionIdentityOption",
}


@lru_cache(maxsize=1)
def _cid7050() -> dict[str, tuple[str, str, str]]:
    """Our option name -> (value, scheme, meaning), sorted by code value, from pydicom's CID 7050."""
    from pydicom.sr.codedict import codes

    found = {key: getattr(codes.cid7050, keyword) for key, keyword in _CID7050_KEYWORDS.items()}
    return {key: (c.value, c.scheme_designator, c.meaning) for key, c in sorted(found.items(), key=lambda kv: kv[1].value)}
