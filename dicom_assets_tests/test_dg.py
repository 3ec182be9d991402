"""Dagster's `dg` CLI ([tool.dg] in pyproject.toml) loads the code location of ``dicom_assets.defs``.

`dg check defs` and `dg list defs` run as the README shows them: from the checkout's root, with the
virtualenv's bin on PATH. They never reach the network: telemetry is off (the instance's
dagster.yaml and dg's own config file), and nothing here talks to a PACS.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import dagster as dg
import pytest

from dicom_assets_tests.pacs_fixtures import offline_config

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
DOCUMENTED_ASSETS = {"patients", "studies", "series", "downloaded_series", "patient_archive", "deidentified_archive", "published_archive", "validation_report", "inventory", "request_report"}
DOCUMENTED_JOBS = {"discover_patients", "patient_pipeline", "write_inventory"}


def summary(defs: dg.Definitions) -> dict[str, set[str]]:
    """Names of what a Definitions object holds, spelled as `dg list defs --json` spells them."""
    repo = defs.get_repository_def()
    return {
        "assets": {key.to_user_string() for key in repo.asset_graph.get_all_asset_keys()},
        "asset_checks": {key.to_user_string() for key in repo.asset_graph.asset_check_keys},
        "jobs": {job.name for job in repo.get_all_jobs() if not job.name.startswith("__")},  # not __ASSET_JOB
        "schedules": {schedule.name for schedule in repo.schedule_defs},
        "sensors": {sensor.name for sensor in repo.sensor_defs},
        "resources": set(repo.get_top_level_resources()),
    }


@pytest.fixture(scope="module")
def dg_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    tmp = tmp_path_factory.mktemp("dg")
    home = tmp / "dagster_home"
    home.mkdir()
    (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    (tmp / "dg.toml").write_text("[cli.telemetry]\nenabled = false\n")
    config = offline_config(tmp / "config.yaml", database_url=f"sqlite:///{tmp / 'state.sqlite'}")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DAGSTER_", "DG_"))}
    env.update(
        PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}",
        VIRTUAL_ENV=sys.prefix,  # as in an activated shell (dg warns when it is not the project's .venv)
        DAGSTER_HOME=str(home),
        DICOM_ASSETS_CONFIG=str(config),
        DG_CLI_CONFIG=str(tmp / "dg.toml"),  # dg's user config: telemetry off, ~/.config/dg.toml unread
        DAGSTER_DISABLE_TELEMETRY="1",
        DAGSTER_DG_UPDATE_CHECK_ENABLED="0",
        NO_COLOR="1",
        COLUMNS="200",
    )
    return env


def run_dg(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    done = subprocess.run([str(BIN / "dg"), *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, f"dg {' '.join(args)} exited {done.returncode}\n{done.stdout}\n{done.stderr}"
    return done


def test_dg_check_defs_loads_the_code_location(dg_env: dict[str, str]) -> None:
    done = run_dg(dg_env, "check", "defs")
    assert "All definitions loaded successfully." in done.stdout
    assert "To suppress this warning" not in done.stderr, done.stderr  # dg's own: config, virtualenv


def test_dg_list_defs_names_what_dicom_assets_defs_holds(dg_env: dict[str, str]) -> None:
    from dicom_assets import defs

    expected = summary(defs)
    assert DOCUMENTED_ASSETS <= expected["assets"] and DOCUMENTED_JOBS <= expected["jobs"]
    assert expected["schedules"] and expected["sensors"] and expected["resources"] == {"dicom"}

    listed: dict[str, list[dict[str, Any]]] = json.loads(run_dg(dg_env, "list", "defs", "--json").stdout)
    seen = {
        "assets": {a["asset_key"] for a in listed.get("assets", [])},
        "asset_checks": {c["key"] for c in listed.get("asset_checks", [])},
        **{section: {d["name"] for d in listed.get(section, [])} for section in ("jobs", "schedules", "sensors", "resources")},
    }
    assert seen == expected


def test_definitions_py_registers_every_object_of_the_defs_folder() -> None:
    """definitions.py lists the Dagster layer explicitly; Dagster's folder convention
    (``load_from_defs_folder``: every asset, check, job, schedule and sensor at module level under
    dicom_assets/defs/) must find exactly the same, so a new sensor cannot be forgotten there."""
    from dicom_assets import defs

    folder = dg.load_from_defs_folder(path_within_project=ROOT / "dicom_assets")
    merged = dg.Definitions.merge(folder, dg.Definitions(resources=defs.resources))
    assert summary(merged) == summary(defs), (
        "dicom_assets/definitions.py and the module-level objects under dicom_assets/defs/ differ: "
        "register new assets/checks/jobs/schedules/sensors in definitions.py, and keep helpers that "
        "are not part of the code location out of module level under dicom_assets/defs/"
    )
