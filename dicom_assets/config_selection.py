"""``selection.series``: which series of the selected studies are fetched (include/exclude filters).

Kept apart from :mod:`dicom_assets.config` (which imports it) to keep that module short. The
filter itself (matching, reasons, SOP class groups by UID) is :mod:`dicom_assets.series_filter`;
this module only validates the YAML, so every mistake is reported at load with its key
(``selection.series.exclude.series_description: ...``) and how to fix it.

Semantics: a series is kept when it passes every ``include`` criterion that is given (within one
criterion any listed value matches) and matches no ``exclude`` criterion, and its instance count
is within ``min_instances``/``max_instances``. Nothing given = no filter: every series is fetched.
"""

from __future__ import annotations

import re
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

#: The SOP class groups a filter can name (their SOP Class UIDs: dicom_assets.series_filter).
SOP_CLASS_GROUPS: tuple[str, ...] = ("structured_reports", "presentation_states", "key_objects", "raw_data", "dose_reports")
_MODALITY = re.compile(r"^[A-Z0-9_ ]{1,16}$")  # DICOM CS: upper case, digits, space, underscore


class _Section(BaseModel):
    """Same as dicom_assets.config._Section (unknown keys are errors); repeated here because
    config.py imports this module."""

    model_config = ConfigDict(extra="forbid")


def _as_list(value: Any) -> Any:
    """``modality: CT`` is read as ``[CT]``; ``modality:`` with nothing after it as ``[]``."""
    if value is None:
        return []
    if isinstance(value, (str, int)) and not isinstance(value, bool):
        return [value]
    return value


class SeriesCriteria(_Section):
    """One ``include:`` or ``exclude:`` block. Within a key any value matches; in ``include``
    every key given must match, in ``exclude`` any key matching skips the series."""

    modality: list[str] = Field(default_factory=list, description="Modality codes, e.g. [CT, MR]")
    series_description: str | None = Field(None, description="a Python regex, searched case-insensitively")
    series_number: list[int] = Field(default_factory=list, description="SeriesNumber values")
    sop_class_groups: list[str] = Field(default_factory=list, description=f"any of {', '.join(SOP_CLASS_GROUPS)}")

    _lists = field_validator("modality", "series_number", "sop_class_groups", mode="before")(_as_list)

    @field_validator("modality")
    @classmethod
    def _modality_codes(cls, value: list[str]) -> list[str]:
        codes = [str(v).strip().upper() for v in value]
        bad = [c for c in codes if not _MODALITY.match(c)]
        if bad:
            raise ValueError(f"{bad[0]!r} is not a Modality code; write codes such as CT, MR, SR, PR, KO, OT")
        return codes

    @field_validator("series_description")
    @classmethod
    def _regex_compiles(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                re.compile(value, re.IGNORECASE)
            except re.error as exc:
                raise ValueError(
                    f"{value!r} is not a valid Python regular expression ({exc}); e.g. \"localizer|scout\" "
                    f"(searched anywhere in the SeriesDescription, case-insensitively)"
                ) from exc
        return value

    @field_validator("sop_class_groups")
    @classmethod
    def _known_groups(cls, value: list[str]) -> list[str]:
        names = [str(v).strip().lower() for v in value]
        unknown = [n for n in names if n not in SOP_CLASS_GROUPS]
        if unknown:
            raise ValueError(f"unknown SOP class group {unknown[0]!r}; the known groups are {', '.join(SOP_CLASS_GROUPS)}")
        return list(dict.fromkeys(names))

    @property
    def empty(self) -> bool:
        """No criterion given."""
        return not (self.modality or self.series_description is not None or self.series_number or self.sop_class_groups)


class SeriesFilterSettings(_Section):
    """``selection.series``: include/exclude criteria and instance-count bounds (default: none)."""

    include: SeriesCriteria = Field(default_factory=SeriesCriteria)
    exclude: SeriesCriteria = Field(default_factory=SeriesCriteria)
    min_instances: int | None = Field(None, ge=0, description="skip series with fewer instances (PACS count)")
    max_instances: int | None = Field(None, ge=1, description="skip series with more instances (PACS count)")

    @field_validator("include", "exclude", mode="before")
    @classmethod
    def _empty_block(cls, value: Any) -> Any:
        """``exclude:`` with every key commented out parses as None: no criterion."""
        return {} if value is None else value

    @model_validator(mode="after")
    def _bounds_in_order(self) -> "SeriesFilterSettings":
        low, high = self.min_instances, self.max_instances
        if low is not None and high is not None and low > high:
            raise ValueError(
                f"min_instances ({low}) must be <= max_instances ({high}); lower min_instances or raise max_instances"
            )
        return self

    @property
    def active(self) -> bool:
        """Whether any criterion is given (otherwise every series is kept, as before filters)."""
        return not (self.include.empty and self.exclude.empty and self.min_instances is None and self.max_instances is None)
