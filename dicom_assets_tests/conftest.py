"""Shared fixtures: a real PostgreSQL database per test, SQLite stores, free loopback ports.

PostgreSQL comes from ``$DATABASE_URL`` (a server URL; we create our own databases on it) or
the local server on 127.0.0.1:5432 (``make test`` starts it when it is installed but stopped).
Under ``CI=true`` a missing server fails the tests that need it; elsewhere they are skipped.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import uuid
from pathlib import Path
from typing import Iterator

import pytest
import sqlalchemy as sa

os.environ.setdefault("DAGSTER_DISABLE_TELEMETRY", "1")
IN_CI = os.environ.get("CI", "").lower() == "true"
DEFAULT_PG = "postgresql://postgres@127.0.0.1:5432/postgres"


def require_service(ok: bool, what: str) -> None:
    """Fail under CI, skip elsewhere, when a real service the test needs is missing."""
    if ok:
        return
    if IN_CI:
        pytest.fail(f"{what} is not available (CI=true: integration tests never skip)")
    pytest.skip(f"{what} is not available")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop_process_group(proc: "subprocess.Popen[bytes]", timeout_s: float) -> None:
    """SIGTERM a child started with ``start_new_session=True`` and everything it started
    (Dagster's run workers, code servers), SIGKILL after ``timeout_s``."""
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


@pytest.fixture
def port() -> int:
    return free_port()


@pytest.fixture(scope="session")
def pg_server_url() -> str:
    url = os.environ.get("DATABASE_URL") or DEFAULT_PG
    engine = sa.create_engine(url, isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as conn:
            conn.execute(sa.text("SELECT 1"))
        ok = True
    except Exception:  # noqa: BLE001 - any failure means "no server"
        ok = False
    finally:
        engine.dispose()
    require_service(ok, f"PostgreSQL at {sa.engine.make_url(url).render_as_string(hide_password=True)}")
    return url


def _create_database(server_url: str) -> str:
    name = f"dicom_assets_test_{uuid.uuid4().hex[:12]}"
    engine = sa.create_engine(server_url, isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    engine.dispose()
    return sa.engine.make_url(server_url).set(database=name).render_as_string(hide_password=False)


def _drop_database(server_url: str, url: str) -> None:
    name = sa.engine.make_url(url).database
    engine = sa.create_engine(server_url, isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    engine.dispose()


@pytest.fixture
def pg_url(pg_server_url: str) -> Iterator[str]:
    """A fresh, empty PostgreSQL database for one test, dropped afterwards."""
    url = _create_database(pg_server_url)
    yield url
    _drop_database(pg_server_url, url)


@pytest.fixture
def state_pg_url(pg_server_url: str) -> Iterator[str]:
    """A second fresh PostgreSQL database: the state DB beside Dagster's own (``pg_url``), as in production."""
    url = _create_database(pg_server_url)
    yield url
    _drop_database(pg_server_url, url)


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'state.sqlite'}"


@pytest.fixture(params=["postgresql", "sqlite"])
def db_url(request: pytest.FixtureRequest) -> str:
    """Run a test once against PostgreSQL and once against SQLite."""
    if request.param == "postgresql":
        return request.getfixturevalue("pg_url")
    return request.getfixturevalue("sqlite_url")


@pytest.fixture
def store(db_url: str):
    from dicom_assets.store import StateStore

    state = StateStore(db_url)
    state.create_schema()
    yield state
    state.dispose()


@pytest.fixture
def pg_store(pg_url: str):
    from dicom_assets.store import StateStore

    state = StateStore(pg_url)
    state.create_schema()
    yield state
    state.dispose()


@pytest.fixture
def production_dagster_home(tmp_path: Path, pg_url: str, monkeypatch: pytest.MonkeyPatch) -> Path:
    """``$DAGSTER_HOME`` holding the repository's production dagster.yaml, its PostgreSQL storage
    pointed (through the DAGSTER_PG_* variables it reads) at this test's own database."""
    import shutil

    url = sa.engine.make_url(pg_url)
    home = tmp_path / "dagster_home"
    home.mkdir()
    shutil.copy(Path(__file__).resolve().parents[1] / "dagster.yaml", home / "dagster.yaml")
    for key, value in {"HOST": url.host, "PORT": str(url.port or 5432), "USER": url.username,
                       "PASSWORD": url.password or "", "DB": url.database}.items():
        monkeypatch.setenv(f"DAGSTER_PG_{key}", value)
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    return home
