"""Series filters (``selection.series``): which series of the selected studies are fetched.

Localizers, structured reports, dose reports, presentation states and the like cost PACS
requests and disk and are rarely wanted. A :class:`SeriesFilter` built from
:class:`~dicom_assets.config_selection.SeriesFilterSettings` looks at what discovery learnt of a
series (:class:`SeriesFacts`) and gives the human reason it is skipped, naming the rule
(``exclude series_description /localizer|scout/ matched 'Localizer'``), or None to keep it.

The filter runs locally, over the full SERIES-level answer, on purpose: asking the PACS to filter
(Modality or SeriesDescription as C-FIND keys) costs the same one C-FIND per study, and a series
the PACS never returned could not be recorded as ``skipped`` with its reason: it would be missing
from the inventory and the validation instead of accounted for.

SOP class groups are recognised by SOP Class UID. The SERIES-level answer has none: a series'
classes are known when the PACS listed them at IMAGE level (``SeriesFacts.sop_classes``). Until
then the Modality decides where it can (PR, KO; SR is a structured report or a dose report), and
the study's SOPClassesInStudy narrows it down (a study without raw data has no raw data series).
Where the answer would still change the decision, :meth:`SeriesFilter.needs_sop_classes` says
so and the caller asks the PACS once for that series (dicom_assets.series_selection). A series
whose classes stay unknown is never skipped by a group rule: an unknown is fetched, not lost.

No Dagster, no database: pure functions of the facts and the settings.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable, Sequence

from dicom_assets.config_selection import SeriesCriteria, SeriesFilterSettings

SR_PREFIX = "1.2.840.10008.5.1.4.1.1.88."  # every Structured Report storage class (DICOM PS3.4 B.5)
PRESENTATION_STATE_PREFIX = "1.2.840.10008.5.1.4.1.1.11."  # every *Presentation State Storage
KEY_OBJECT_SELECTION = "1.2.840.10008.5.1.4.1.1.88.59"  # Key Object Selection Document Storage
RAW_DATA = "1.2.840.10008.5.1.4.1.1.66"  # Raw Data Storage (exactly: .66.x are registrations, segmentations)
DOSE_REPORTS = frozenset({
    "1.2.840.10008.5.1.4.1.1.88.67",  # X-Ray Radiation Dose SR Storage
    "1.2.840.10008.5.1.4.1.1.88.68",  # Radiopharmaceutical Radiation Dose SR Storage
    "1.2.840.10008.5.1.4.1.1.88.73",  # Patient Radiation Dose SR Storage
    "1.2.840.10008.5.1.4.1.1.88.76",  # Enhanced X-Ray Radiation Dose SR Storage
})  # fmt: skip

#: The group a series of this Modality is in when its SOP classes are unknown (SR: either).
_MODALITY_GROUPS: dict[str, frozenset[str]] = {
    "PR": frozenset({"presentation_states"}),
    "KO": frozenset({"key_objects"}),
    "SR": frozenset({"structured_reports", "dose_reports"}),
}
_SR_GROUPS = _MODALITY_GROUPS["SR"]
_NO_GROUP = ""  # an image class (CT, MR, secondary capture ...): in no group


def sop_class_group(uid: str) -> str:
    """The group of one SOP Class UID, or ``""`` for a class in none (images, documents ...)."""
    if uid in DOSE_REPORTS:
        return "dose_reports"
    if uid == KEY_OBJECT_SELECTION:
        return "key_objects"
    if uid.startswith(SR_PREFIX):
        return "structured_reports"
    if uid.startswith(PRESENTATION_STATE_PREFIX):
        return "presentation_states"
    if uid == RAW_DATA:
        return "raw_data"
    return _NO_GROUP


@dataclass(frozen=True)
class SeriesFacts:
    """What the state DB knows of a series, as the filter (and the request-file hook) sees it.

    ``sop_classes``: the SOP Class UIDs of its instances as listed by the PACS at IMAGE level;
    None = never asked, ``()`` = asked, the PACS listed none. ``study_sop_classes``: the
    study's SOPClassesInStudy; None = the PACS did not give it.
    """

    series_instance_uid: str
    study_instance_uid: str
    patient_id: str
    modality: str | None
    series_description: str | None
    series_number: int | None
    expected_instances: int | None
    sop_classes: tuple[str, ...] | None = None
    study_sop_classes: tuple[str, ...] | None = None
    download_status: str | None = None


def _listed(values: Iterable[object]) -> str:
    return "[" + ", ".join(str(v) for v in values) + "]"


@dataclass(frozen=True)
class _Groups:
    """The SOP class groups of a series' instances, as far as they are known.

    ``options``: the possible group sets (one when known); ``why``: what they come from, shown
    in reasons (the matching UID, or ``modality PR``)."""

    options: tuple[frozenset[str], ...]
    why: dict[str, str]

    @property
    def known(self) -> bool:
        return len(self.options) == 1


def _groups_of(facts: SeriesFacts) -> _Groups:
    """What is known of the series' groups: from its classes, else its Modality and its study's."""
    if facts.sop_classes:
        why: dict[str, str] = {}
        for uid in facts.sop_classes:
            why.setdefault(sop_class_group(uid), uid)
        return _Groups((frozenset(why),), why)
    modality = (facts.modality or "").upper()
    study = facts.study_sop_classes
    study_groups = None if study is None else {sop_class_group(uid) for uid in study}
    if modality in _MODALITY_GROUPS:
        candidates, source = _MODALITY_GROUPS[modality], f"modality {modality}"
        if study_groups is not None and candidates & study_groups and not candidates <= study_groups:
            candidates = frozenset(candidates & study_groups)  # the study holds only these
            source += " and the study's SOP classes"
        why = {g: source for g in candidates}
        return _Groups(tuple(frozenset({g}) for g in sorted(candidates)), why)
    if study_groups is not None and "raw_data" not in study_groups:
        return _Groups((frozenset({_NO_GROUP}),), {})
    why = {"raw_data": f"study holds {RAW_DATA}" if study_groups else "SOP classes not known"}
    return _Groups((frozenset({_NO_GROUP}), frozenset({"raw_data"})), why)


class SeriesFilter:
    """``selection.series`` as a predicate with reasons (see the module docstring)."""

    def __init__(self, settings: SeriesFilterSettings) -> None:
        self.settings = settings
        self._include_re = self._regex(settings.include)
        self._exclude_re = self._regex(settings.exclude)
        self.groups_used = frozenset(settings.include.sop_class_groups) | frozenset(settings.exclude.sop_class_groups)

    @staticmethod
    def _regex(criteria: SeriesCriteria) -> re.Pattern[str] | None:
        text = criteria.series_description
        return None if text is None else re.compile(text, re.IGNORECASE)

    @property
    def active(self) -> bool:
        """Whether the filter can skip anything at all (else every series is kept)."""
        return self.settings.active

    # -- the decision ------------------------------------------------------------------------
    def skip_reason(self, facts: SeriesFacts) -> str | None:
        """Why this series is skipped (the first rule it fails), or None to fetch it."""
        for check in (self._modality, self._description, self._number, self._sop_classes, self._instances):
            reason = check(facts)
            if reason is not None:
                return reason
        return None

    def _modality(self, facts: SeriesFacts) -> str | None:
        modality = (facts.modality or "").upper()
        shown = modality or "(none)"
        include, exclude = self.settings.include.modality, self.settings.exclude.modality
        if include and modality not in include:
            return f"modality {shown} not in include modality {_listed(include)}"
        if modality and modality in exclude:
            return f"exclude modality {_listed(exclude)} matched {modality}"
        return None

    def _description(self, facts: SeriesFacts) -> str | None:
        text = facts.series_description or ""
        if self._include_re is not None and not self._include_re.search(text):
            return f"series_description {text!r} does not match include series_description /{self._include_re.pattern}/"
        if self._exclude_re is not None and self._exclude_re.search(text):
            return f"exclude series_description /{self._exclude_re.pattern}/ matched {text!r}"
        return None

    def _number(self, facts: SeriesFacts) -> str | None:
        number = facts.series_number
        include, exclude = self.settings.include.series_number, self.settings.exclude.series_number
        if include and number not in include:
            shown = number if number is not None else "(none)"
            return f"series_number {shown} not in include series_number {_listed(include)}"
        if number is not None and number in exclude:
            return f"exclude series_number {_listed(exclude)} matched {number}"
        return None

    def _instances(self, facts: SeriesFacts) -> str | None:
        """Bounds on the PACS's count; a series whose count the PACS did not give is kept."""
        n, low, high = facts.expected_instances, self.settings.min_instances, self.settings.max_instances
        if n is None:
            return None
        if low is not None and n < low:
            return f"{n} instances < min_instances {low}"
        if high is not None and n > high:
            return f"{n} instances > max_instances {high}"
        return None

    def _group_reason(self, groups: frozenset[str], why: dict[str, str]) -> str | None:
        """The reason for a series in exactly these groups (``""`` = an image class)."""
        include, exclude = self.settings.include.sop_class_groups, self.settings.exclude.sop_class_groups
        named = sorted(g for g in groups if g)
        if include and not groups & set(include):
            shown = ", ".join(named) or "none (image classes)"
            return f"SOP class group {shown} not in include sop_class_groups {_listed(include)}"
        if exclude and groups <= set(exclude):  # only excluded objects: nothing wanted is lost
            sources = [why.get(g, "SOP classes") for g in named]
            if len(set(sources)) == 1:
                return f"SOP class group{'s' if len(named) > 1 else ''} {', '.join(named)} excluded ({sources[0]})"
            return "SOP class groups " + ", ".join(f"{g} ({w})" for g, w in zip(named, sources)) + " excluded"
        return None

    def _skips(self, groups: _Groups) -> bool | None:
        """Whether the group rules skip the series: True/False, or None when that depends on
        which of its possible groups it is in (its SOP classes are needed)."""
        outcomes = {self._group_reason(option, groups.why) is not None for option in groups.options}
        return outcomes.pop() if len(outcomes) == 1 else None

    def _sop_classes(self, facts: SeriesFacts) -> str | None:
        if not self.groups_used:
            return None
        groups = _groups_of(facts)
        if not self._skips(groups):
            return None  # kept, or depends on classes not known (not asked yet, the PACS did not say): fetch
        return self._group_reason(frozenset().union(*groups.options), groups.why)

    # -- what must be asked --------------------------------------------------------------------
    def needs_sop_classes(self, facts: SeriesFacts) -> bool:
        """Whether the decision depends on SOP classes the state DB does not have yet (never
        asked for this series, and neither the Modality nor the study's SOPClassesInStudy
        settles it): then one IMAGE-level C-FIND for this series settles it."""
        if not self.groups_used or facts.sop_classes is not None:
            return False
        return self._skips(_groups_of(facts)) is None


def split_sop_classes(text: str | None) -> tuple[str, ...] | None:
    """A backslash-separated list of UIDs as stored (None stays None, ``""`` is ``()``)."""
    if text is None:
        return None
    return tuple(uid.strip() for uid in text.split("\\") if uid.strip())


def join_sop_classes(uids: Sequence[str]) -> str:
    """Distinct UIDs, sorted, backslash-separated (the form ``series.sop_classes`` stores)."""
    return "\\".join(sorted({u for u in uids if u}))
