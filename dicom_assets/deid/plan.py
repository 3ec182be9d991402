"""Table E.1-1 plus a site's options, resolved once into one action per tag.

The walker (:mod:`dicom_assets.deid.walk`) looks every element up by int tag in
:attr:`Plan.acts`; everything that can be decided before seeing a file is decided here.

**Options over the basic action.** Where an option in use has an entry for the attribute, it
wins over the basic action: ``K`` (keep) beats ``C`` (clean) beats the basic action. ``C`` of
Retain Longitudinal Modified Dates means *shift* (DA, DT) or keep (TM); ``C`` of Clean
Descriptors / Retain Patient Characteristics means *clean text* (:mod:`dicom_assets.deid.clean`).

**Combined actions** (``X/Z``, ``X/D``, ``X/Z/D``, ``Z/D``, ``X/Z/U*``) let the standard say
"remove unless the IOD needs the attribute". Choosing needs the IOD's module tables, which we do
not have, so we take the choice that can never break an IOD while still removing the identity:

* plain elements: ``X/Z`` -> Z (empty), ``X/D``, ``X/Z/D``, ``Z/D`` -> D (dummy, or the shifted
  date when dates are shifted): a Type 1 or 2 attribute stays present, its value is gone;
* sequences: ``X/Z``, ``X/D``, ``X/Z/D`` -> removed: the ones listed are Type 3 in the IODs
  (an empty Type 3 sequence is an error of its own, "0 items, 1-n required"), except the
  Acquisition Context Sequence, Type 2 in the Acquisition Context Module, which is emptied;
  ``Z/D`` -> empty; ``X/Z/U*`` -> kept with every UID inside replaced.

**D on a sequence** keeps its items, each cleaned by the same table (``K`` is "cleaned for
sequences" too). A D *code* sequence (PersonIdentificationCodeSequence: the code IS a person's
identity) gets every string inside replaced by a dummy.

**Attributes the table does not list** are kept, except (the standard lists what it knows; these
VRs can hold identity whatever the attribute):

* private elements (odd groups): removed, unless Retain Safe Private and declared safe;
* every PN: emptied (only PatientName, set to the pseudonym afterwards, carries a name);
* free text LT, ST, UT, UC: replaced by a dummy (present, so no IOD breaks; content gone);
  UR (a URL, may name a host): removed;
* UI: replaced like ``U`` unless the value is a DICOM well-known UID (``1.2.840.10008.``) or the
  attribute names a class, syntax or coding scheme (SOPClassUID, TransferSyntaxUID...);
* DA, DT: shifted with Retain Longitudinal Modified Dates, otherwise emptied; TM: kept with it,
  otherwise emptied;
* group lengths (gggg,0000): removed (retired, and wrong once values change);
* curves (50xx) and overlays (60xx): the whole group goes, not only the Overlay Data and Comments
  the table lists, so no Overlay Plane module is left half there.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum

from pydicom.datadict import DicomDictionary

from dicom_assets.deid import profile
from dicom_assets.deid.options import DeidOptions

__all__ = ["Act", "Plan", "KEEP_UI_TAGS", "TEXT_VRS", "STRING_VRS"]


class Act(IntEnum):
    """What happens to one element."""

    KEEP = 0
    REMOVE = 1
    EMPTY = 2  # Z
    DUMMY = 3  # D (dates: shifted when dates are shifted)
    UID = 4  # U
    SHIFT = 5  # C of Retain Longitudinal Modified Dates: DA/DT shifted, TM kept
    CLEAN = 6  # C of Clean Descriptors / Retain Patient Characteristics
    RECURSE = 7  # sequences: keep, clean every item
    DUMMY_CODES = 8  # D code sequence: keep the items, every string in them a dummy
    UID_UNLISTED = 9  # UI not in the table: replace unless well known / a class or syntax UID


#: Free-text VRs.
TEXT_VRS = frozenset({"LT", "ST", "UT", "UC"})
#: VRs holding character strings (what cleaning and dummy-code sequences touch).
STRING_VRS = frozenset({"AE", "CS", "LO", "SH", "PN", "LT", "ST", "UT", "UC"})
DATE_VRS = frozenset({"DA", "DT"})

_NON_SQ = {
    "K": Act.KEEP, "X": Act.REMOVE, "Z": Act.EMPTY, "D": Act.DUMMY, "U": Act.UID, "C": Act.CLEAN,
    "X/Z": Act.EMPTY, "X/D": Act.DUMMY, "X/Z/D": Act.DUMMY, "Z/D": Act.DUMMY, "X/Z/U*": Act.UID,
}  # fmt: skip
_SQ = {
    "K": Act.RECURSE, "X": Act.REMOVE, "Z": Act.EMPTY, "D": Act.RECURSE, "U": Act.RECURSE, "C": Act.RECURSE,
    "X/Z": Act.REMOVE, "X/D": Act.REMOVE, "X/Z/D": Act.REMOVE, "Z/D": Act.EMPTY, "X/Z/U*": Act.RECURSE,
}  # fmt: skip
#: Sequences some IOD makes Type 2 (PS3.3 C.7.6.14 Acquisition Context Module): emptied, not removed,
#: where the table allows both.
_TYPE2_SEQUENCES = frozenset({0x00400555})
_TEXT_CLEANING_OPTIONS = ("clean_descriptors", "retain_patient_characteristics")

_KEEP_UI_KEYWORDS = frozenset(
    {"CodingSchemeUID", "ContextGroupExtensionCreatorUID", "ContextUID", "MappingResourceUID", "CreatorVersionUID",
     "SegmentationTemplateUID"}
)  # fmt: skip


def _keeps_ui(keyword: str) -> bool:
    return "SOPClass" in keyword or "TransferSyntax" in keyword or keyword.endswith("SyntaxUID") or keyword in _KEEP_UI_KEYWORDS


#: UI attributes the table does not list whose value names a class, a syntax or a coding scheme,
#: never an instance: kept as they are.
KEEP_UI_TAGS = frozenset(
    tag for tag, entry in DicomDictionary.items() if entry[0] == "UI" and tag not in profile.TABLE and _keeps_ui(entry[4])
)


@dataclass(frozen=True)
class Plan:
    """Per-tag actions for one set of options.

    ``acts[tag]`` is ``(action for a plain element, action for a sequence, fallback)``; the
    fallback applies when SHIFT or CLEAN meets a VR they cannot handle (a binary timestamp, a
    number), and is the basic action's. ``unlisted[vr]`` is the action for an attribute the table
    does not list. Private elements and the overlay / curve groups are the walker's business.
    """

    acts: dict[int, tuple[Act, Act, Act]]
    unlisted: dict[str, Act]
    shift_dates: bool
    safe_private: frozenset[tuple[str, int, int]]

    @classmethod
    def build(cls, options: DeidOptions) -> "Plan":
        chosen = options.profile_options()
        acts = {tag: _resolve(rule, chosen) for tag, rule in profile.TABLE.items()}
        for tag in _TYPE2_SEQUENCES:
            plain, sequence, fallback = acts[tag]
            if sequence is Act.REMOVE and "Z" in profile.TABLE[tag].basic:
                acts[tag] = (plain, Act.EMPTY, fallback)
        shift = "retain_modified_dates" in chosen
        unlisted = {
            "PN": Act.EMPTY, "LT": Act.DUMMY, "ST": Act.DUMMY, "UT": Act.DUMMY, "UC": Act.DUMMY, "UR": Act.REMOVE,
            "UI": Act.UID_UNLISTED, "SQ": Act.RECURSE,
            "DA": Act.SHIFT if shift else Act.EMPTY, "DT": Act.SHIFT if shift else Act.EMPTY,
            "TM": Act.KEEP if shift else Act.EMPTY,
        }  # fmt: skip
        safe = frozenset(options.safe_private) if "retain_safe_private" in chosen else frozenset()
        return cls(acts, unlisted, shift, safe)


def _resolve(rule: profile.ProfileRule, chosen: frozenset[str]) -> tuple[Act, Act, Act]:
    """(plain, sequence, fallback) for one row of the table under the chosen options."""
    basic_plain, basic_sq = _NON_SQ[rule.basic], _SQ[rule.basic]
    used = {rule.option(name) for name in chosen} - {None}
    if "K" in used:
        return Act.KEEP, Act.RECURSE, basic_plain
    if rule.option("retain_modified_dates") == "C" and "retain_modified_dates" in chosen:
        return Act.SHIFT, basic_sq, basic_plain
    if any(rule.option(name) == "C" for name in _TEXT_CLEANING_OPTIONS if name in chosen):
        return Act.CLEAN, Act.RECURSE, basic_plain
    if rule.basic == "D" and basic_sq is Act.RECURSE and rule.name.replace(" ", "").endswith("CodeSequence"):
        return basic_plain, Act.DUMMY_CODES, basic_plain
    return basic_plain, basic_sq, basic_plain
