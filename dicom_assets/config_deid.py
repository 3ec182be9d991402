"""``deidentify:``: de-identified copies for sharing (dicom_assets.deid), validated at load.

Kept apart from :mod:`dicom_assets.config` (which imports it) to keep that module short. The
secret is the key of every pseudonym, replacement UID and date shift: whoever holds it can link
a de-identified copy back to the patient, so it must come from the environment. The config file
may only hold a reference (``secret: "${DEID_SECRET}"``); a literal value is refused at load,
and the value is a ``SecretStr`` so it never shows in a repr, a log or an error.
"""

from __future__ import annotations

import re
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator

#: The only accepted form of ``deidentify.secret`` in the file: an environment reference.
SECRET_REFERENCE = re.compile(r"^\$\{[A-Za-z_][A-Za-z0-9_]*\}$")
#: Shortest secret accepted (bytes): an HMAC key guessable by brute force protects nothing.
MIN_SECRET_BYTES = 16
_PREFIX = re.compile(r"^[A-Z0-9_-]{0,16}$")


class _Section(BaseModel):
    """Same as dicom_assets.config._Section (unknown keys are errors)."""

    model_config = ConfigDict(extra="forbid")


class ClinicalTrialSettings(_Section):
    """Clinical Trial Subject/Study/Series attributes written into every de-identified instance."""

    sponsor_name: str | None = None
    protocol_id: str | None = None
    protocol_name: str | None = None
    site_id: str | None = None
    site_name: str | None = None


class DeidentifySettings(_Section):
    """``deidentify:`` (absent = no de-identified copies). See README "De-identified copies"."""

    secret: SecretStr = Field(description='an environment reference, e.g. "${DEID_SECRET}"')
    pseudonym_prefix: str = "ANON"
    pseudonym_digits: int = Field(8, ge=4, le=16)
    max_shift_days: int = Field(3650, ge=1, le=36500, description="dates move back 1..N days, per patient")
    retain_longitudinal_modified_dates: bool = True
    clean_descriptors: bool = False
    retain_patient_characteristics: bool = False
    retain_device_identity: bool = False
    retain_safe_private: bool = False
    keep_burned_in: bool = False  # opt in: series that may carry burned-in text are shared too
    burned_in_modalities: list[str] | None = None  # None = the default list of dicom_assets.deid.options
    trial: ClinicalTrialSettings | None = None

    @field_validator("secret")
    @classmethod
    def _long_enough(cls, value: SecretStr) -> SecretStr:
        if len(value.get_secret_value().encode("utf-8")) < MIN_SECRET_BYTES:
            raise ValueError(
                f"the secret is shorter than {MIN_SECRET_BYTES} bytes; generate one with "
                "`python3 -c 'import secrets; print(secrets.token_hex(32))'` and export it"
            )
        return value

    @field_validator("pseudonym_prefix")
    @classmethod
    def _prefix(cls, value: str) -> str:
        if not _PREFIX.match(value):
            raise ValueError("must be up to 16 characters of A-Z, 0-9, '_' or '-' (it becomes a PatientID)")
        return value

    @field_validator("burned_in_modalities")
    @classmethod
    def _modalities(cls, value: list[str] | None) -> list[str] | None:
        return None if value is None else [str(v).strip().upper() for v in value]


def check_secret_reference(raw: Any) -> str | None:
    """The problem with ``deidentify.secret`` as written in the file (before ``${VAR}`` is
    replaced), or None. Only an environment reference is accepted, so the key never sits in a
    config file, a repository or a backup of either."""
    if not isinstance(raw, dict) or not isinstance(raw.get("deidentify"), dict):
        return None
    secret = raw["deidentify"].get("secret")
    if secret is None:
        return None  # "is required" comes from validation
    if not isinstance(secret, str) or not SECRET_REFERENCE.match(secret.strip()):
        return (
            'must be an environment reference such as "${DEID_SECRET}", never the secret itself: '
            "export DEID_SECRET=... where the pipeline runs (the value is not shown here)"
        )
    return None
