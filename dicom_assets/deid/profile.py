"""PS3.15 Table E.1-1: the action of the Basic Application Level Confidentiality Profile and of
each option column, for every attribute the standard lists, loaded once at import.

**Where the table comes from, and why two packages.** The table is data published by the DICOM
standard; typing it by hand invites silent mistakes and goes stale every edition. Two well-kept
PyPI packages ship it as data, and neither alone has all we need:

* ``dicom-anonymizer`` (Kitware, BSD; ``dicomanonymizer/dicom_anonymization_databases/``) carries
  the Basic Profile column scraped from each edition, up to **2026c**, the current one: 652
  attributes plus the repeating groups (curves 50xx, overlay data and comments 60xx). It has no
  option columns. Its files are Python modules of tag lists (``D_TAGS``, ``X_Z_D_TAGS``, ...); we read
  them as *data* with :func:`ast.literal_eval` (no code of that project is imported or run).
* ``dicom-standard`` (Innolitics, MIT) ships ``confidentiality_profile_attributes.json`` with
  **every option column** (Retain Safe Private, Retain UIDs, Retain Device Identity, Retain
  Institution Identity, Retain Patient Characteristics, Retain Longitudinal Full / Modified
  Dates, Clean Descriptors, Clean Structured Content, Clean Graphics), but of edition 2020
  (433 attributes; its only PyPI release), and it is a ~55 MB install of JSON.

So the **Basic Profile action is edition 2026c** (dicom-anonymizer) and the **option actions come
from the 2020 edition** (dicom-standard) for the attributes that edition lists. That mix is safe
by construction: an option only ever *relaxes* the basic action (K keeps, C keeps after
cleaning), so an attribute added since 2020, which has no option entry here, simply gets its
stricter basic action under every option. Every attribute of the 2020 edition is still listed in
2026c (checked at import); where the two basic columns differ (4 attributes), 2026c wins. An
attribute listed only in the 2020 file would still be taken, with its 2020 basic action.

The table says nothing about IOD types, so combined actions (``X/Z``, ``X/D``...) are kept as the
standard writes them; :mod:`dicom_assets.deid.plan` decides what they become.
"""

from __future__ import annotations

import ast
import json
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from types import MappingProxyType
from typing import Mapping

__all__ = [
    "ACTIONS",
    "BASIC_EDITION",
    "OPTIONS",
    "OPTIONS_EDITION",
    "PRIVATE_RULE",
    "ProfileError",
    "ProfileRule",
    "TABLE",
    "rule_for",
]

#: Edition of the Basic Profile column (the newest dicom-anonymizer 2.1 ships; pinned on purpose:
#: a new edition is a reviewed change, not something a ``pip install -U`` does behind our back).
BASIC_EDITION = "2026c"
#: Edition of the option columns (dicom-standard 0.1.0, its only release).
OPTIONS_EDITION = "2020"

#: Every action code of Table E.1-1.
ACTIONS = frozenset({"D", "Z", "X", "K", "C", "U", "Z/D", "X/Z", "X/D", "X/Z/D", "X/Z/U*"})

#: Our option names -> the column key in dicom-standard's JSON.
OPTIONS: Mapping[str, str] = MappingProxyType(
    {
        "retain_safe_private": "rtnSafePrivOpt",
        "retain_uids": "rtnUIDsOpt",
        "retain_device_identity": "rtnDevIdOpt",
        "retain_institution_identity": "rtnInstIdOpt",
        "retain_patient_characteristics": "rtnPatCharsOpt",
        "retain_full_dates": "rtnLongFullDatesOpt",
        "retain_modified_dates": "rtnLongModifDatesOpt",
        "clean_descriptors": "cleanDescOpt",
        "clean_structured_content": "cleanStructContOpt",
        "clean_graphics": "cleanGraphOpt",
    }
)

#: dicom-anonymizer's list names -> action codes.
_BASIC_LISTS = {
    "D_TAGS": "D", "Z_TAGS": "Z", "X_TAGS": "X", "K_TAGS": "K", "C_TAGS": "C", "U_TAGS": "U",
    "Z_D_TAGS": "Z/D", "X_Z_TAGS": "X/Z", "X_D_TAGS": "X/D", "X_Z_D_TAGS": "X/Z/D", "X_Z_U_STAR_TAGS": "X/Z/U*",
}  # fmt: skip
_BASIC_FILE = f"dicomfields_{BASIC_EDITION}.py"
_OPTIONS_FILE = "confidentiality_profile_attributes.json"
#: Sanity floor: a truncated or re-shaped data file must fail loudly, not de-identify less.
_MIN_RULES = 600


class ProfileError(RuntimeError):
    """The table could not be loaded from the installed packages (missing, re-shaped or truncated)."""


@dataclass(frozen=True)
class ProfileRule:
    """One row of Table E.1-1: the basic action and the action of each option column it has."""

    name: str
    basic: str
    options: Mapping[str, str] = field(default_factory=dict)

    def option(self, name: str) -> str | None:
        """The action of option column ``name`` (a key of :data:`OPTIONS`), None when blank."""
        return self.options.get(name)


@dataclass(frozen=True)
class _Repeating:
    """A row for a repeating group: (group & group_mask) == group and (element & element_mask) == element."""

    group: int
    group_mask: int
    element: int
    element_mask: int
    rule: ProfileRule

    def matches(self, tag: int) -> bool:
        return (tag >> 16) & self.group_mask == self.group and (tag & 0xFFFF) & self.element_mask == self.element


def _data_file(distribution: str, file_name: str) -> Path:
    """A file a distribution installed (its RECORD), wherever pip put it (site-packages, data dir)."""
    try:
        dist = metadata.distribution(distribution)
    except metadata.PackageNotFoundError as exc:
        raise ProfileError(f"the {distribution} package is not installed: the profile table comes from it") from exc
    for path in dist.files or ():
        if path.name == file_name:
            located = Path(str(dist.locate_file(path)))
            if located.is_file():
                return located
    raise ProfileError(f"{distribution} does not ship {file_name} (another version than the one pinned in pyproject.toml?)")


def _load_basic() -> tuple[dict[int, str], list[tuple[int, int, int, int, str]]]:
    """(tag -> basic action, repeating-group rows) from dicom-anonymizer's table of the edition."""
    tree = ast.parse(_data_file("dicom-anonymizer", _BASIC_FILE).read_text(encoding="utf-8"))
    exact: dict[int, str] = {}
    masked: list[tuple[int, int, int, int, str]] = []
    for node in tree.body:
        if not (isinstance(node, ast.Assign) and isinstance(node.value, ast.List) and len(node.targets) == 1):
            continue
        target = node.targets[0]
        if not isinstance(target, ast.Name) or not target.id.endswith("_TAGS") or target.id == "ALL_TAGS":
            continue
        action = _BASIC_LISTS.get(target.id)
        if action is None:
            raise ProfileError(f"unknown action list {target.id} in dicom-anonymizer's {_BASIC_FILE}")
        for entry in ast.literal_eval(node.value):
            if len(entry) == 2:
                exact[(entry[0] << 16) | entry[1]] = action
            elif len(entry) == 4:  # (group, element, group mask, element mask)
                masked.append((entry[0], entry[2], entry[1], entry[3], action))
            else:
                raise ProfileError(f"unexpected entry {entry!r} in dicom-anonymizer's {_BASIC_FILE}")
    return exact, masked


def _load_options() -> list[dict[str, str]]:
    rows = json.loads(_data_file("dicom-standard", _OPTIONS_FILE).read_text(encoding="utf-8"))
    if not isinstance(rows, list) or not rows or not all("id" in r and "basicProfile" in r for r in rows):
        raise ProfileError(f"dicom-standard's {_OPTIONS_FILE} does not have the expected shape")
    return rows


def _option_actions(row: Mapping[str, str]) -> dict[str, str]:
    return {name: row[column] for name, column in OPTIONS.items() if row.get(column)}


def _build() -> tuple[dict[int, ProfileRule], list[_Repeating], ProfileRule]:
    from pydicom.datadict import keyword_for_tag

    exact, masked = _load_basic()
    by_id = {row["id"].lower(): row for row in _load_options()}
    table: dict[int, ProfileRule] = {}
    for tag, action in exact.items():
        row = by_id.get(f"{tag:08x}", {})
        table[tag] = ProfileRule(row.get("name") or keyword_for_tag(tag) or f"({tag >> 16:04X},{tag & 0xFFFF:04X})",
                                 action, MappingProxyType(_option_actions(row)))  # fmt: skip
    for key, row in by_id.items():  # listed in 2020 only: keep it (stricter is safe)
        if len(key) == 8 and all(c in "0123456789abcdef" for c in key) and int(key, 16) not in table:
            table[int(key, 16)] = ProfileRule(row["name"], row["basicProfile"], MappingProxyType(_option_actions(row)))
    repeating = []
    for group, group_mask, element, element_mask, action in masked:
        row = by_id.get(f"{group >> 8:02x}xx{element:04x}" if element_mask else f"{group >> 8:02x}xxxxxx", {})
        rule = ProfileRule(row.get("name") or f"({group >> 8:02X}xx,{element:04X})", action, MappingProxyType(_option_actions(row)))
        repeating.append(_Repeating(group, group_mask, element, element_mask, rule))
    private_row = next((r for r in by_id.values() if "odd" in r["id"]), {"name": "Private attributes", "basicProfile": "X"})
    private = ProfileRule(private_row["name"], private_row["basicProfile"], MappingProxyType(_option_actions(private_row)))
    bad = {r.basic for r in table.values()} - ACTIONS
    if len(table) < _MIN_RULES or bad or not repeating:
        raise ProfileError(f"the profile table looks wrong: {len(table)} rules, unknown actions {sorted(bad)}")
    return table, repeating, private


#: Table E.1-1 by int tag (public attributes; exact tags).
TABLE: Mapping[int, ProfileRule]
_table, _REPEATING, PRIVATE_RULE = _build()
TABLE = MappingProxyType(_table)
del _table


def rule_for(tag: int) -> ProfileRule | None:
    """The Table E.1-1 row for ``tag``: exact tag, repeating group (curves, overlays), private
    attribute (odd group) or None when the standard does not list the attribute."""
    rule = TABLE.get(tag)
    if rule is not None:
        return rule
    if (tag >> 16) & 1:
        return PRIVATE_RULE
    for repeating in _REPEATING:
        if repeating.matches(tag):
            return repeating.rule
    return None
