"""The production Dagster instance (dagster.yaml): PostgreSQL storage from the environment, the
queued run coordinator and the `pacs` pool, with a real materialization stored through it."""

from __future__ import annotations

import shutil
from pathlib import Path

import dagster as dg
import pytest
import sqlalchemy as sa
import yaml

ROOT = Path(__file__).resolve().parents[1]


def test_production_instance_runs_a_materialization_on_postgresql(tmp_path: Path, pg_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from dicom_assets import defs

    url = sa.engine.make_url(pg_url)
    home = tmp_path / "dagster_home"
    home.mkdir()
    shutil.copy(ROOT / "dagster.yaml", home / "dagster.yaml")
    for key, value in {"HOST": url.host, "PORT": str(url.port or 5432), "USER": url.username,
                       "PASSWORD": url.password or "", "DB": url.database}.items():
        monkeypatch.setenv(f"DAGSTER_PG_{key}", value)
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({
        "pacs": {"host": "127.0.0.1", "port": 1, "called_ae_title": "PACS"},
        "paths": {"download_dir": "dl", "archive_dir": "zips", "report_dir": "reports"},
        "database": {"url": f"sqlite:///{tmp_path / 'state.sqlite'}"},
    }))
    monkeypatch.setenv("DICOM_ASSETS_CONFIG", str(config))

    with dg.DagsterInstance.get() as instance:
        assert type(instance.run_storage).__name__ == "PostgresRunStorage"
        assert type(instance.run_coordinator).__name__ == "QueuedRunCoordinator"
        assert instance.get_concurrency_config().pool_config.default_pool_limit == 1
        result = defs.resolve_job_def("write_inventory").execute_in_process(instance=instance)
        assert result.success
        stored = instance.get_run_by_id(result.run_id)
        assert stored is not None and stored.is_success
        assert instance.get_latest_materialization_event(dg.AssetKey("inventory")) is not None
    assert (tmp_path / "reports" / "inventory.csv").exists()
    with sa.create_engine(pg_url).connect() as conn:  # the run is in PostgreSQL, not in files
        assert conn.execute(sa.text("SELECT count(*) FROM runs")).scalar() == 1


def test_every_step_that_talks_to_the_pacs_is_in_the_pacs_pool() -> None:
    from dicom_assets import defs

    graph = defs.get_repository_def().asset_graph
    pools = {key.to_user_string(): graph.get(key).pools for key in graph.get_all_asset_keys()}
    for name in ("patients", "studies", "series", "downloaded_series"):
        assert pools[name] == {"pacs"}, name
    for name in ("patient_archive", "validation_report", "inventory"):
        assert not pools[name], name
