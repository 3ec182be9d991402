"""The one resource: the project's configuration, and the clients built from it.

The config file path comes from ``DICOM_ASSETS_CONFIG`` (an EnvVar, so it is never baked into a
run's stored config); passwords inside it come from ``${VAR}`` references.
"""


import functools
import os
from pathlib import Path
from typing import Sequence

import dagster as dg

from dicom_assets.config import CONFIG_ENV_VAR, ScheduleSettings, Settings, load_selection_rule, load_settings, selection_rule_name
from dicom_assets.pacs.budget import DatabaseBudget, budget_window_s, pacs_key
from dicom_assets.pacs.client import PacsClient
from dicom_assets.pacs.faults import RequestGate
from dicom_assets.request_file import RequestFile, RequestFileError, read_request_file
from dicom_assets.store import StateStore


@functools.lru_cache(maxsize=8)
def _settings(path: str, mtime_ns: int) -> Settings:
    return load_settings(path)


@functools.lru_cache(maxsize=8)
def _store(url: str) -> StateStore:
    store = StateStore(url)
    store.create_schema()
    return store


@functools.lru_cache(maxsize=8)
def _budget(url: str, key: str, per_minute: int, window_s: float, adaptive: bool, floor: int) -> DatabaseBudget:
    """The PACS's request budget, kept in the state DB: shared by every thread, process and run
    that talks to this PACS (``host:port/called_ae``) through this state DB."""
    return DatabaseBudget(_store(url), key, per_minute, window_s=window_s, adaptive=adaptive, floor=floor)


class DicomAssetsResource(dg.ConfigurableResource):
    """Loads the YAML config and builds the state store and PACS client from it."""

    config_path: str

    def settings(self) -> Settings:
        path = Path(self.config_path)
        mtime = path.stat().st_mtime_ns if path.exists() else 0
        return _settings(str(path), mtime)

    def store(self) -> StateStore:
        return _store(self.settings().database.url)

    def pacs(self) -> PacsClient:
        """The PACS client: DIMSE, or with ``pacs.protocol: dicomweb`` a DicomwebClient (same surface)."""
        settings = self.settings()
        pacs = settings.pacs
        web = settings.dicomweb if pacs.protocol == "dicomweb" else None
        key = web.budget_key() if web is not None else pacs_key(pacs.host, pacs.port, pacs.called_ae_title)
        budget = _budget(
            settings.database.url, key, pacs.max_requests_per_minute, budget_window_s(), pacs.adaptive_rate, pacs.rate_floor
        )
        if web is not None:
            from dicom_assets.dicomweb.client import DicomwebClient

            return DicomwebClient(pacs, web, budget, gate=RequestGate(pacs.blackout_windows()))  # type: ignore[return-value]
        return PacsClient(pacs, budget)

    def selection_rule(self):  # type: ignore[no-untyped-def]
        return load_selection_rule(self.settings().selection)

    def selection_rule_name(self) -> str:
        return selection_rule_name(self.settings().selection)

    def request_file(self) -> RequestFile | None:
        """The researcher's request file (selection.request_file) as it is now, or None without
        one. A malformed file fails the run with every problem named (file, row, column) before
        anything is asked or changed."""
        path = self.settings().selection.request_file
        if path is None:
            return None
        try:
            return read_request_file(path)
        except RequestFileError as exc:
            raise dg.Failure(str(exc)) from None

    def patient_ids(self, partition_keys: Sequence[str]) -> list[str]:
        """Map partition keys to PatientIDs through the state DB; unknown keys are an error."""
        found = self.store().patient_ids_for_keys(partition_keys)
        missing = [k for k in partition_keys if k not in found]
        if missing:
            raise dg.Failure(
                f"{len(missing)} patient partition(s) are not in the state DB (first: {missing[0]!r}); "
                "materialize `patients` first"
            )
        return [found[k] for k in partition_keys]


def dicom_resource() -> DicomAssetsResource:
    return DicomAssetsResource(config_path=dg.EnvVar(CONFIG_ENV_VAR))


def schedule_settings() -> ScheduleSettings:
    """The cron strings, read when the code location loads (defaults without a config file).

    Schedules are part of the definitions, so they are fixed when Dagster loads the code; after
    changing them in the config, reload the code location (UI: "Reload definitions").
    """
    path = os.environ.get(CONFIG_ENV_VAR)
    if not path or not Path(path).exists():
        return ScheduleSettings()
    return load_settings(path).schedules
