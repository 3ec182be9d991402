"""``dicomweb:``: the DICOMweb server (QIDO-RS, WADO-RS) used when ``pacs.protocol: dicomweb``.

Kept apart from :mod:`dicom_assets.config` (which imports it) to keep that module short.
Credentials (``username``, ``password``, ``token``) may only be written as environment references
(``password: "${PACS_PASSWORD}"``): a literal value is refused at load, like
``deidentify.secret``, so a password never sits in a config file, a repository or a backup. The
values are ``SecretStr``: they never show in a repr, a log or an error.
"""

from __future__ import annotations

from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    field_validator,
    model_validator,
)

from dicom_assets.config_deid import SECRET_REFERENCE

#: The keys of ``dicomweb:`` that hold credentials: environment references only.
SECRET_KEYS = ("username", "password", "token")


class _Section(BaseModel):
    """Same as dicom_assets.config._Section (unknown keys are errors)."""

    model_config = ConfigDict(extra="forbid")


def _check_http_url(value: str) -> str:
    """An http(s) URL with a host and no credentials, query or fragment; no trailing slash."""
    parts = urlsplit(value.strip())
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("must be an http:// or https:// URL, e.g. http://pacs.example.org:8042/dicom-web")
    if parts.username is not None or parts.password is not None:
        raise ValueError("must not carry credentials (user:password@): use dicomweb.auth with username/password")
    if parts.query or parts.fragment:
        raise ValueError("must not have a query (?...) or fragment (#...)")
    return value.strip().rstrip("/")


class DicomwebSettings(_Section):
    """``dicomweb:`` (required with ``pacs.protocol: dicomweb``). See README "DICOMweb"."""

    url: str = Field(description="base URL of the DICOMweb service, e.g. http://127.0.0.1:8042/dicom-web")
    qido_prefix: str | None = Field(None, description="QIDO-RS root: a path under url, or a full URL")
    wado_prefix: str | None = Field(None, description="WADO-RS root: a path under url, or a full URL")
    auth: Literal["none", "basic", "bearer"] = "none"
    username: SecretStr | None = Field(None, description='basic auth: an environment reference, "${VAR}"')
    password: SecretStr | None = Field(None, description='basic auth: an environment reference, "${VAR}"')
    token: SecretStr | None = Field(None, description='bearer auth: an environment reference, "${VAR}"')
    timeout_s: float = Field(60.0, gt=0, description="connect/read timeout of one HTTP request")
    verify_tls: bool = Field(True, description="check the server's certificate (https)")
    page_size: int = Field(1000, ge=1, description="QIDO-RS results per request (limit/offset paging)")
    max_results: int = Field(
        0, ge=0, description="the server's QIDO-RS result cap (0 = none; 10000 for the cloud services)"
    )

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        return _check_http_url(value)

    @field_validator("qido_prefix", "wado_prefix")
    @classmethod
    def _prefix(cls, value: str | None) -> str | None:
        if value is None:
            return None
        if "://" in value:
            return _check_http_url(value)
        if any(c in value for c in "?#") or ".." in value.split("/"):
            raise ValueError("must be a path under dicomweb.url (no '?', '#' or '..') or a full http(s) URL")
        return value.strip().strip("/")

    @model_validator(mode="after")
    def _credentials_match_auth(self) -> "DicomwebSettings":
        needed = {"none": (), "basic": ("username", "password"), "bearer": ("token",)}[self.auth]
        for key in needed:
            if getattr(self, key) is None:
                raise ValueError(f"dicomweb.{key} is required with dicomweb.auth: {self.auth}")
        for key in SECRET_KEYS:
            if key not in needed and getattr(self, key) is not None:
                raise ValueError(f"dicomweb.{key} is set but dicomweb.auth is {self.auth!r}: remove it or change auth")
        return self

    @property
    def qido_root(self) -> str:
        """The URL QIDO-RS paths (``studies``, ``studies/{uid}/series``) are appended to."""
        return self._root(self.qido_prefix)

    @property
    def wado_root(self) -> str:
        """The URL WADO-RS paths (``studies/{uid}/series/{uid}``) are appended to."""
        return self._root(self.wado_prefix)

    def _root(self, prefix: str | None) -> str:
        if not prefix:
            return self.url
        return prefix if "://" in prefix else f"{self.url}/{prefix}"

    def budget_key(self) -> str:
        """The request budget's name for this server: ``scheme://host:port/path`` (host
        lower-cased), so every process configured with the same URL shares one budget."""
        parts = urlsplit(self.url)
        port = parts.port or (443 if parts.scheme == "https" else 80)
        return f"{parts.scheme}://{(parts.hostname or '').lower()}:{port}{parts.path}"

    def describe(self) -> str:
        """The server for messages: its base URL (never a credential)."""
        return self.url


def check_dicomweb_secrets(raw: Any) -> list[tuple[str, str]]:
    """The problems with ``dicomweb.username/password/token`` as written in the file (before
    ``${VAR}`` is replaced): ``(key, problem)`` pairs, empty when fine. Only environment
    references are accepted; the problem never repeats the value."""
    if not isinstance(raw, dict) or not isinstance(raw.get("dicomweb"), dict):
        return []
    problems = []
    for key in SECRET_KEYS:
        value = raw["dicomweb"].get(key)
        if value is None:
            continue
        if not isinstance(value, str) or not SECRET_REFERENCE.match(value.strip()):
            var = f"PACS_{key.upper()}"
            problem = (
                f'must be an environment reference such as "${{{var}}}", never the value itself: '
                f"export {var}=... where the pipeline runs (the value is not shown here)"
            )
            problems.append((f"dicomweb.{key}", problem))
    return problems
