"""The project's one configuration file: loading, `${VAR}` substitution and validation.

Every error names the offending key (``pacs.port``) and what is wrong with it, because the
person reading it is usually setting the project up for the first time.
"""

from __future__ import annotations

import importlib
import ipaddress
import os
import re
import shlex
from datetime import time as dtime
from pathlib import Path
from typing import Any, Callable, Literal

import yaml
from pydantic import AliasChoices, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from dicom_assets.config_deid import DeidentifySettings, check_secret_reference
from dicom_assets.config_dicomweb import DicomwebSettings, check_dicomweb_secrets
from dicom_assets.config_selection import SeriesFilterSettings

CONFIG_ENV_VAR = "DICOM_ASSETS_CONFIG"
_AE_TITLE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")  # DICOM AE: 16 chars, no backslash/control
_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
_CLOCK = r"([01]\d|2[0-3]):([0-5]\d)(?::([0-5]\d))?"
_BLACKOUT = re.compile(rf"^\s*{_CLOCK}\s*-\s*{_CLOCK}\s*$")


class ConfigError(ValueError):
    """The configuration file is missing, unreadable or invalid; the message says where."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _check_ae_title(value: str) -> str:
    if not _AE_TITLE.match(value) or not value.strip():
        raise ValueError("must be 1-16 printable ASCII characters without backslash")
    return value


class PacsSettings(_Section):
    host: str
    port: int = Field(ge=1, le=65535)
    called_ae_title: str
    calling_ae_title: str = "DICOM_ASSETS"
    retrieve_method: Literal["c-move", "c-get"] = "c-move"
    protocol: Literal["dimse", "dicomweb"] = "dimse"  # dicomweb: QIDO-RS/WADO-RS, see the dicomweb: section
    max_requests_per_minute: int = Field(700, ge=1)
    # DIMSE associations, or parallel DICOMweb requests, retrieving at once. With adaptive_concurrency
    # (the default) the ceiling of the count the retrieval finds (dicom_assets.pacs.adaptive_concurrency);
    # 8: what a 20 ms round trip needs, a tenth of the 50 parallel moves that made PACS answer A702.
    max_concurrent_associations: int = Field(
        8, ge=1, le=32, validation_alias=AliasChoices("max_concurrent_associations", "max_concurrent_requests")
    )
    adaptive_concurrency: bool = Field(
        True, description="probe the count of concurrent retrieves between 1 and max_concurrent_associations"
    )
    # 4: over a WAN it reaches 8 in one doubling; where 4 already fill this machine's CPUs
    # (loopback, a fast LAN) half the start is tried at once, and a PACS that allows fewer
    # refuses (A7xx, or a rejected association) and the count halves. Only the first run against
    # a PACS starts here: later runs start from the count the state DB holds.
    start_concurrent_associations: int = Field(4, ge=1, description="where the first probe of a PACS starts")
    timeout_s: float = Field(30.0, gt=0)
    straggler_timeout_s: float = Field(5.0, gt=0, description="idle wait for late C-STOREs")
    max_attempts: int = Field(
        5, ge=1, description="attempts per series that brought nothing new and were refused by the PACS, across runs"
    )
    wait_for_pacs_s: float = Field(600.0, ge=0, description="how long a run waits out one outage (no progress)")
    retry_initial_s: float = Field(2.0, gt=0, description="first backoff delay (exponential, with jitter)")
    retry_max_s: float = Field(120.0, gt=0, description="longest backoff delay")
    blackout: list[str] = Field(default_factory=list, description='"HH:MM-HH:MM" local time, no new requests')
    max_find_results: int = Field(0, ge=0, description="the PACS's C-FIND result cap (0 = none)")
    adaptive_rate: bool = Field(True, description="halve the shared request rate when the PACS resets associations")
    min_requests_per_minute: int | None = Field(
        None, ge=1, description="the adaptive rate's floor (default: a tenth of max_requests_per_minute)"
    )

    _ae = field_validator("called_ae_title", "calling_ae_title")(_check_ae_title)

    @model_validator(mode="before")
    @classmethod
    def _one_concurrency_key(cls, value: Any) -> Any:
        if isinstance(value, dict) and {"max_concurrent_associations", "max_concurrent_requests"} <= value.keys():
            raise ValueError("set max_concurrent_associations or max_concurrent_requests (the same limit), not both")
        return value

    @field_validator("blackout")
    @classmethod
    def _blackout_windows(cls, value: list[str]) -> list[str]:
        for window in value:
            blackout_window(window)
        return value

    @model_validator(mode="after")
    def _backoff_order(self) -> "PacsSettings":
        if self.retry_max_s < self.retry_initial_s:
            raise ValueError("retry_max_s must be >= retry_initial_s")
        if self.start_concurrent_associations > self.max_concurrent_associations:
            self.start_concurrent_associations = self.max_concurrent_associations  # a ceiling of 1 starts at 1
        if self.min_requests_per_minute is not None and self.min_requests_per_minute > self.max_requests_per_minute:
            raise ValueError("min_requests_per_minute must be <= max_requests_per_minute")
        return self

    @property
    def rate_floor(self) -> int:
        """The lowest rate the adaptive budget goes down to (requests per window)."""
        return self.min_requests_per_minute or max(1, self.max_requests_per_minute // 10)

    def blackout_windows(self) -> list[tuple[dtime, dtime]]:
        """The blackout windows as (start, end) local times; end <= start crosses midnight."""
        return [blackout_window(w) for w in self.blackout]


def blackout_window(text: str) -> tuple[dtime, dtime]:
    """Parse ``"HH:MM-HH:MM"`` (seconds optional) into (start, end) local times."""
    match = _BLACKOUT.match(text) if isinstance(text, str) else None
    if not match:
        raise ValueError(f'{text!r} is not a window like "02:50-03:20" (HH:MM-HH:MM, local time)')
    g = match.groups()
    start = dtime(int(g[0]), int(g[1]), int(g[2] or 0))
    end = dtime(int(g[3]), int(g[4]), int(g[5] or 0))
    if start == end:
        raise ValueError(f"{text!r} is an empty window (start equals end)")
    return start, end


class ReceiverSettings(_Section):
    ae_title: str = "DICOM_ASSETS"
    bind_address: str = "127.0.0.1"
    port: int = Field(11113, ge=0, le=65535)
    allowed_ae_titles: list[str] | None = None  # default: [pacs.called_ae_title]
    allowed_hosts: list[str] | None = None  # IP addresses; default: any host

    _ae = field_validator("ae_title")(_check_ae_title)

    @field_validator("allowed_ae_titles")
    @classmethod
    def _allowed_titles(cls, value: list[str] | None) -> list[str] | None:
        if value is not None:
            if not value:
                raise ValueError("must list at least one AE title (leave it out to allow only pacs.called_ae_title)")
            for title in value:
                _check_ae_title(title)
        return value

    @field_validator("allowed_hosts")
    @classmethod
    def _allowed_ips(cls, value: list[str] | None) -> list[str] | None:
        if value is not None:
            if not value:
                raise ValueError("must list at least one IP address (leave it out to allow any host)")
            for host in value:
                try:
                    ipaddress.ip_address(host)
                except ValueError:
                    raise ValueError(f"{host!r} is not an IP address") from None
        return value


class SelectionSettings(_Section):
    """Which patients to pull: at most one patient rule (regex or function), and/or a request file.

    ``request_file`` (a researcher's .csv/.xlsx, see dicom_assets.request_file) may be combined
    with either rule: a patient must pass the rule AND be named by the file's rows. Only its
    name and existence are checked at load; its content is read (and its errors reported)
    later, so a config error never depends on the spreadsheet parsing.
    """

    patient_id_regex: str | None = None
    function: str | None = None
    request_file: Path | None = None  # relative = to the config file's directory
    series: SeriesFilterSettings = Field(default_factory=SeriesFilterSettings)  # which series (default: all)

    @field_validator("series", mode="before")
    @classmethod
    def _empty_series_block(cls, value: Any) -> Any:
        """``series:`` with every key commented out (config-sample.yaml) parses as None: no filter."""
        return {} if value is None else value

    @field_validator("patient_id_regex")
    @classmethod
    def _regex_compiles(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                re.compile(value)
            except re.error as exc:
                raise ValueError(f"is not a valid regular expression: {exc}") from exc
        return value

    @field_validator("function")
    @classmethod
    def _function_shape(cls, value: str | None) -> str | None:
        if value is not None and not re.match(r"^[\w.]+:[\w.]+$", value):
            raise ValueError('must look like "package.module:callable"')
        return value

    @field_validator("request_file")
    @classmethod
    def _request_file_type(cls, value: Path | None) -> Path | None:
        """Refuse a .xls/.ods/.txt here, where the key can be named, not when the file is read."""
        if value is not None and value.suffix.lower() not in (".csv", ".xlsx"):
            raise ValueError(
                f"{str(value)!r} must be a .csv or .xlsx file; save the spreadsheet as "
                "'Excel Workbook (.xlsx)' or 'CSV UTF-8' and point to that file"
            )
        return value

    @model_validator(mode="after")
    def _one_rule(self) -> "SelectionSettings":
        if self.patient_id_regex is not None and self.function is not None:
            raise ValueError("set either patient_id_regex or function, not both")
        return self

    def resolve_request_file(self, base_dir: Path | None) -> None:
        """Make a relative request_file absolute (under ``base_dir``, the config file's directory,
        like every other path) and check that it is a file; ValueError says what is wrong.

        Checked at load so a typo in the path fails when the project starts, not at the first run.
        """
        if self.request_file is None:
            return
        if base_dir is not None and not self.request_file.is_absolute():
            self.request_file = (base_dir / self.request_file).resolve()
        if not self.request_file.is_file():
            state = "is not a file" if self.request_file.exists() else "does not exist"
            hint = f" (a relative path is taken from {base_dir})" if base_dir is not None else ""
            raise ValueError(f"{self.request_file} {state}{hint}; give the path of the researcher's .csv/.xlsx file")


class PathSettings(_Section):
    download_dir: Path
    archive_dir: Path
    report_dir: Path
    deidentified_dir: Path | None = None  # de-identified zips (required with a deidentify: section)


class ArchiveSettings(_Section):
    delimiter: str = "__seriesCount"
    keep_superseded: bool = False
    compression_level: int = Field(6, ge=0, le=9)

    @field_validator("delimiter")
    @classmethod
    def _safe_delimiter(cls, value: str) -> str:
        if not re.match(r"^[A-Za-z0-9_\-]{1,32}$", value) or not re.search(r"\D$", value):
            raise ValueError("must be 1-32 of A-Z a-z 0-9 _ - and not end in a digit")
        return value


def mask_url(url: str) -> str:
    """A database URL fit for logs and errors: the password replaced by ``***``."""
    try:
        import sqlalchemy as sa

        return sa.engine.make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 - unparsable: hide everything between :// and @
        return re.sub(r"(://[^:/@]*:)[^@]*@", r"\1***@", url)


class DatabaseSettings(_Section):
    url: str = Field("sqlite:///dicom_assets.sqlite", repr=False)

    def __repr_args__(self):  # type: ignore[no-untyped-def]
        yield "url", mask_url(self.url)

    @property
    def masked_url(self) -> str:
        """:attr:`url` with the password hidden (for logs, metadata and errors)."""
        return mask_url(self.url)

    @field_validator("url")
    @classmethod
    def _known_scheme(cls, value: str) -> str:
        if not re.match(r"^(postgresql(\+\w+)?|sqlite)://", value):
            raise ValueError("must start with postgresql:// or sqlite:///")
        return value


class DiscoverySettings(_Section):
    """Incremental discovery: which StudyDates a pass asks for, and how often it asks for all."""

    recheck_days: int = Field(30, ge=0, description="an incremental pass asks StudyDate >= watermark - this")
    full_every_days: int = Field(7, ge=0, description="a full pass (every StudyDate) when the last is this old")


_CRON_FIELD = r"[\d*/,\-A-Za-z?]+"
_CRON = re.compile(rf"^\s*{_CRON_FIELD}(\s+{_CRON_FIELD}){{4}}\s*$")


class ScheduleSettings(_Section):
    """Cron strings (5 fields, the Dagster daemon's time zone) for the three recurring jobs."""

    discovery: str = "0 2 * * *"  # daily: C-FIND patients, register new partitions
    retrieval: str = "0 * * * *"  # hourly: the per-patient pipeline over every patient
    inventory: str = "30 6 * * *"  # daily: the inventory CSV
    timezone: str = "UTC"
    #: Seconds between two looks of the ``new_patient_work`` sensor: how soon after discovery
    #: finds new work a pipeline run starts (each look reads the state DB and the run list only).
    new_work_check_s: int = Field(30, ge=5, le=3600)

    @field_validator("discovery", "retrieval", "inventory")
    @classmethod
    def _cron(cls, value: str) -> str:
        if not _CRON.match(value):
            raise ValueError('must be a 5-field cron string such as "0 2 * * *"')
        return value


class HeartbeatSettings(_Section):
    """Optional healthchecks.io-style check URLs per job (``/start``, success, ``/fail``)."""

    discovery: str | None = None  # job discover_patients
    retrieval: str | None = None  # job patient_pipeline
    inventory: str | None = None  # job write_inventory
    archive: str | None = None  # runs requested by the archive sensor

    @field_validator("discovery", "retrieval", "inventory", "archive")
    @classmethod
    def _http(cls, value: str | None) -> str | None:
        if value is not None and not re.match(r"^https?://[^/\s]+", value):
            raise ValueError("must be an http:// or https:// URL")
        return value


#: ``[user@]host:/absolute/path`` (host may be ``[IPv6]``); rsync's remote-shell syntax, no daemon ``::``.
RSYNC_TARGET = re.compile(
    r"^(?P<login>(?:[A-Za-z0-9][A-Za-z0-9._-]*@)?(?P<host>\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9][A-Za-z0-9._-]*))"
    r":(?P<path>/[^\x00-\x1f]*)$"
)


class PublishSettings(_Section):
    """Copy every verified zip to a second site: a mounted directory, or rsync over SSH."""

    directory: Path | None = None  # e.g. /mnt/partner-site/dicom; unset (and no rsync_target) = off
    rsync_target: str | None = None  # e.g. dicom@partner.example.org:/srv/share/dicom
    ssh_command: str = "ssh -o BatchMode=yes"  # remote shell for rsync_target; add -p PORT here
    ssh_key: Path | None = None  # private key for rsync_target (ssh -i); relative = to the config file
    heartbeat: str | None = None  # healthchecks.io-style URL pinged by published_archive
    ship: Literal["identifiable", "deidentified", "both"] = "identifiable"  # which zips go to the second site

    @field_validator("rsync_target")
    @classmethod
    def _rsync_target(cls, value: str | None) -> str | None:
        if value is not None and ("://" in value or not RSYNC_TARGET.match(value)):
            raise ValueError('must look like "user@host:/absolute/path" (rsync over SSH)')
        return value

    @field_validator("ssh_command")
    @classmethod
    def _ssh_command(cls, value: str) -> str:
        try:
            words = shlex.split(value)
        except ValueError as exc:
            raise ValueError(f"cannot be split into words: {exc}") from None
        if not words:
            raise ValueError('must name the ssh program, e.g. "ssh -o BatchMode=yes"')
        return value

    @model_validator(mode="after")
    def _one_destination(self) -> "PublishSettings":
        if self.directory is not None and self.rsync_target is not None:
            raise ValueError("set either publish.directory or publish.rsync_target, not both")
        return self

    @field_validator("heartbeat")
    @classmethod
    def _http(cls, value: str | None) -> str | None:
        if value is not None and not re.match(r"^https?://[^/\s]+", value):
            raise ValueError("must be an http:// or https:// URL")
        return value


class Settings(_Section):
    pacs: PacsSettings
    receiver: ReceiverSettings = ReceiverSettings()
    selection: SelectionSettings = SelectionSettings()
    paths: PathSettings
    archive: ArchiveSettings = ArchiveSettings()
    database: DatabaseSettings = DatabaseSettings()
    discovery: DiscoverySettings = DiscoverySettings()
    schedules: ScheduleSettings = ScheduleSettings()
    heartbeats: HeartbeatSettings = HeartbeatSettings()
    publish: PublishSettings = PublishSettings()
    deidentify: DeidentifySettings | None = None
    dicomweb: DicomwebSettings | None = None

    @field_validator("receiver", "selection", "archive", "database", "discovery", "schedules", "heartbeats", "publish",
                     mode="before")
    @classmethod
    def _empty_section_is_defaults(cls, value: Any) -> Any:
        """``publish:`` with every key commented out (as in config-sample.yaml) parses as None."""
        return {} if value is None else value

    @model_validator(mode="after")
    def _deidentified_dir(self) -> "Settings":
        if self.deidentify is not None and self.paths.deidentified_dir is None:
            raise ValueError("paths.deidentified_dir is required with a deidentify: section (where the de-identified zips go)")
        if self.publish.ship != "identifiable" and self.deidentify is None:
            raise ValueError(f"publish.ship: {self.publish.ship!r} needs a deidentify: section (there are no de-identified zips)")
        if self.pacs.protocol == "dicomweb" and self.dicomweb is None:
            raise ValueError("pacs.protocol: dicomweb needs a dicomweb: section (at least dicomweb.url, the base URL)")
        return self


def _substitute_env(value: Any, where: str) -> Any:
    """Replace ``${VAR}`` in every string of the parsed YAML; a missing variable is an error."""
    if isinstance(value, dict):
        return {k: _substitute_env(v, f"{where}.{k}" if where else str(k)) for k, v in value.items()}
    if isinstance(value, list):
        return [_substitute_env(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, str):

        def repl(match: re.Match[str]) -> str:
            name = match.group(1)
            if name not in os.environ:
                raise ConfigError(f"{where}: environment variable {name} is not set (referenced as ${{{name}}})")
            return os.environ[name]

        return _ENV_REF.sub(repl, value)
    return value


def _format_validation_error(exc: ValidationError, source: str) -> str:
    lines = [f"invalid configuration in {source}:"]
    for err in exc.errors():
        key = ".".join(str(p) for p in err["loc"]) or "(top level)"
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown key (see config-sample.yaml for the keys that exist)"
        elif err["type"] == "missing":
            msg = "is required"
        lines.append(f"  {key}: {msg}")
    return "\n".join(lines)


def settings_from_dict(raw: dict[str, Any], source: str = "<dict>", base_dir: Path | None = None) -> Settings:
    """Validate a parsed configuration; relative paths are taken from ``base_dir``."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: the file must contain a mapping of sections (pacs:, paths:, ...)")
    problem = check_secret_reference(raw)
    if problem:
        raise ConfigError(f"invalid configuration in {source}:\n  deidentify.secret: {problem}")
    if web_problems := check_dicomweb_secrets(raw):
        raise ConfigError(f"invalid configuration in {source}:\n" + "\n".join(f"  {k}: {m}" for k, m in web_problems))
    raw = _substitute_env(raw, "")
    try:
        settings = Settings.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(_format_validation_error(exc, source)) from None
    if base_dir is not None:
        for name in ("download_dir", "archive_dir", "report_dir", "deidentified_dir"):
            path = getattr(settings.paths, name)
            if path is not None and not path.is_absolute():
                setattr(settings.paths, name, (base_dir / path).resolve())
        if settings.publish.directory is not None and not settings.publish.directory.is_absolute():
            settings.publish.directory = (base_dir / settings.publish.directory).resolve()
        if settings.publish.ssh_key is not None and not settings.publish.ssh_key.is_absolute():
            settings.publish.ssh_key = (base_dir / settings.publish.ssh_key).resolve()
        if settings.database.url.startswith("sqlite:///") and not settings.database.url.startswith("sqlite:////"):
            rel = settings.database.url.removeprefix("sqlite:///")
            if rel and rel != ":memory:":
                settings.database.url = f"sqlite:///{(base_dir / rel).resolve()}"
    try:
        settings.selection.resolve_request_file(base_dir)
    except ValueError as exc:
        raise ConfigError(f"invalid configuration in {source}:\n  selection.request_file: {exc}") from None
    return settings


def config_path(explicit: str | os.PathLike[str] | None = None) -> Path:
    """The config file to use: the explicit one, else ``$DICOM_ASSETS_CONFIG``."""
    chosen = explicit or os.environ.get(CONFIG_ENV_VAR)
    if not chosen:
        raise ConfigError(f"no configuration file: pass --config FILE or set {CONFIG_ENV_VAR}")
    return Path(chosen)


def load_settings(path: str | os.PathLike[str] | None = None) -> Settings:
    """Read, substitute and validate the YAML config file at ``path`` (or ``$DICOM_ASSETS_CONFIG``)."""
    file = config_path(path)
    try:
        text = file.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read configuration file {file}: {exc.strerror}") from None
    try:
        raw = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{file} is not valid YAML: {exc}") from None
    return settings_from_dict(raw, str(file), base_dir=file.resolve().parent)


def selection_rule_name(selection: SelectionSettings) -> str:
    """The patient rule in words, for reasons given to researchers ("not accepted by ...")."""
    if selection.function:
        return f"selection.function {selection.function}"
    if selection.patient_id_regex is not None:
        return f"selection.patient_id_regex /{selection.patient_id_regex}/"
    return "the selection (every patient)"


def receiver_allowed_ae_titles(settings: Settings) -> list[str]:
    """Calling AE titles the storage SCP accepts: receiver.allowed_ae_titles, else the PACS's."""
    return list(settings.receiver.allowed_ae_titles or [settings.pacs.called_ae_title])


def load_selection_rule(selection: SelectionSettings) -> Callable[[Any], bool]:
    """Build the patient selection predicate: regex on PatientID, a user callable, or accept all.

    The callable receives the patient's C-FIND identifier (a pydicom Dataset). With a request
    file it is applied to the patients the rows name (the rule AND the rows).
    """
    if selection.function:
        module_name, _, attr = selection.function.partition(":")
        try:
            target: Any = importlib.import_module(module_name)
            for part in attr.split("."):
                target = getattr(target, part)
        except (ImportError, AttributeError) as exc:
            raise ConfigError(f"selection.function: cannot load {selection.function!r}: {exc}") from None
        if not callable(target):
            raise ConfigError(f"selection.function: {selection.function!r} is not callable")
        return target
    if selection.patient_id_regex is not None:
        pattern = re.compile(selection.patient_id_regex)
        return lambda identifier: bool(pattern.search(str(getattr(identifier, "PatientID", "") or "")))
    return lambda identifier: True
