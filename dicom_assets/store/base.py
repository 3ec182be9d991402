"""State DB plumbing: the engine, its transactions, SQL "now", the schema, and shared helpers.

:class:`StoreBase` holds what every group of queries builds on (one SQLAlchemy engine, the
``_write``/``_read`` transactions, ``_now``/``_now_plus``, a dialect-specific ``_insert``) plus
``create_schema`` and ``dispose``. The conventions it implements (database clock, one transaction
per public method, SQLite locking) are described in :mod:`dicom_assets.store.state`.
"""

from __future__ import annotations

import hashlib
import re
from contextlib import contextmanager
from datetime import datetime, timedelta, timezone
from itertools import islice
from pathlib import Path
from typing import Any, Iterable, Iterator

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql as pg_dialect
from sqlalchemy.dialects import sqlite as sqlite_dialect
from sqlalchemy.pool import StaticPool

from dicom_assets.store import tables as t
from dicom_assets.store.records import SeriesState

SCHEMA_SQL = Path(__file__).parent / "schema.sql"
BATCH_ROWS = 1000
SQLITE_BUSY_TIMEOUT_S = 60.0
_SCHEMA_LOCK_KEY = 0x6469636F6D  # pg_advisory_xact_lock key serialising concurrent create_schema()

_SERIES_STATE_COLUMNS = (
    "series_instance_uid",
    "study_instance_uid",
    "patient_id",
    "series_number",
    "modality",
    "series_description",
    "expected_instances",
    "downloaded_instances",
    "downloaded_bytes",
    "download_status",
    "attempts",
    "last_error",
    "claimed_by",
    "claim_expires_at",
    "network_faults",
    "transfer_syntaxes",
    "transcoded_instances",
    "lossy_transcoded_instances",
    "skip_reason",
)


def _utc(value: datetime | None) -> datetime | None:
    """Aware UTC from an aware datetime (PostgreSQL) or a naive UTC one (SQLite)."""
    if value is None:
        return None
    if value.tzinfo is None:
        return value.replace(tzinfo=timezone.utc)
    return value.astimezone(timezone.utc)


def _chunks(items: Iterable[Any], size: int) -> Iterator[list[Any]]:
    iterator = iter(items)
    while chunk := list(islice(iterator, size)):
        yield chunk


def _series_state(row: Any) -> SeriesState:
    m = row._mapping
    return SeriesState(
        **{c: m[c] for c in _SERIES_STATE_COLUMNS if c != "claim_expires_at"},
        claim_expires_at=_utc(m["claim_expires_at"]),
    )


#: The one-off move of connection-fault attempts to ``network_faults``, run when create_schema adds
#: that column to an older state DB (PostgreSQL and SQLite; see schema.sql).
NETWORK_FAULTS_MIGRATION = """
UPDATE series
   SET network_faults = attempts, attempts = 0,
       download_status = CASE WHEN download_status = 'failed' THEN 'incomplete' ELSE download_status END
 WHERE download_status <> 'complete'
   AND (last_error LIKE '%dropped the association or timed out%'
        OR last_error LIKE '%cannot associate with%'
        OR last_error LIKE '%the worker holding the claim died%')
"""


def _add_missing_sqlite_columns(conn: sa.Connection) -> set[tuple[str, str]]:
    """ALTER TABLE ADD COLUMN for the columns an older SQLite state DB lacks (create_all makes
    only missing tables); returns the (table, column) pairs added."""
    added = set()
    for table in t.metadata.sorted_tables:
        have = {row[1] for row in conn.exec_driver_sql(f"PRAGMA table_info({table.name})")}
        for column in table.columns:
            if column.name in have:
                continue
            ddl = f"ALTER TABLE {table.name} ADD COLUMN {column.name} {column.type.compile(conn.dialect)}"
            if not column.nullable and column.server_default is not None:  # constant defaults only
                ddl += f" NOT NULL DEFAULT {column.server_default.arg.text}"  # type: ignore[attr-defined]
            conn.exec_driver_sql(ddl)
            added.add((table.name, column.name))
    return added


_STATUS_CHECK = re.compile(r"download_status\s+IN\s*\([^)]*\)", re.IGNORECASE)


def _widen_sqlite_status_check(conn: sa.Connection) -> bool:
    """Make an older SQLite state DB accept every status of t.SERIES_STATUSES ('skipped' came
    later); returns whether the stored ``CREATE TABLE series`` was changed.

    SQLite cannot ALTER a CHECK constraint. This is its documented way for a change that leaves
    the stored data valid (https://www.sqlite.org/lang_altertable.html, "Making Other Kinds Of
    Table Schema Changes"): rewrite the table's SQL in sqlite_schema under writable_schema and
    bump schema_version so every connection re-reads it. The new CHECK only admits more values,
    so no row, index or trigger is affected and the table is not copied (a rebuild would rewrite
    every series row). Runs only when the stored SQL lacks a status: once per old DB.
    """
    row = conn.exec_driver_sql("SELECT sql FROM sqlite_master WHERE type = 'table' AND name = 'series'").first()
    if row is None or all(f"'{status}'" in row[0] for status in t.SERIES_STATUSES):
        return False
    allowed = ", ".join(f"'{status}'" for status in t.SERIES_STATUSES)
    new_sql, found = _STATUS_CHECK.subn(f"download_status IN ({allowed})", row[0], count=1)
    if not found:
        raise RuntimeError("the SQLite state DB's series table has no download_status CHECK to widen: " + row[0])
    version = conn.exec_driver_sql("PRAGMA schema_version").scalar_one()
    conn.exec_driver_sql("PRAGMA writable_schema = ON")
    try:
        conn.exec_driver_sql("UPDATE sqlite_master SET sql = ? WHERE type = 'table' AND name = 'series'", (new_sql,))
        conn.exec_driver_sql(f"PRAGMA schema_version = {int(version) + 1}")
    finally:
        conn.exec_driver_sql("PRAGMA writable_schema = OFF")
    return True


def _has_column(cursor: Any, table: str, column: str) -> bool:
    cursor.execute(
        "SELECT EXISTS (SELECT 1 FROM information_schema.columns WHERE table_schema = current_schema() "
        "AND table_name = %s AND column_name = %s)", (table, column),
    )  # fmt: skip
    return bool(cursor.fetchone()[0])


def _schema_applied(cursor: Any, digest: str) -> bool:
    """True when schema.sql with this SHA-256 is recorded in ``schema_applied`` (takes no table locks).

    pg_tables, not to_regclass(): the latter answers from a cache that still says "no such table"
    after another process created it while we waited for the advisory lock."""
    cursor.execute(
        "SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_tables "
        "WHERE schemaname = current_schema() AND tablename = 'schema_applied')"
    )
    if not cursor.fetchone()[0]:
        return False
    cursor.execute("SELECT 1 FROM schema_applied WHERE sha256 = %s", (digest,))
    return cursor.fetchone() is not None


class StoreBase:
    """The engine and transactions of the state DB; the query mixins of StateStore build on it."""

    def __init__(self, url: str) -> None:
        """Open (lazily) the database at a SQLAlchemy URL: ``postgresql://...`` or ``sqlite:///path``."""
        self.url = sa.engine.make_url(url)
        backend = self.url.get_backend_name()
        if backend == "postgresql":
            self.engine = sa.create_engine(self.url, pool_pre_ping=True, pool_size=8, max_overflow=16)
            self._read_engine = self.engine
        elif backend == "sqlite":
            memory = self.url.database in (None, "", ":memory:")
            kwargs: dict[str, Any] = {
                "connect_args": {"check_same_thread": False, "timeout": SQLITE_BUSY_TIMEOUT_S},
            }
            if memory:  # one shared connection; only useful for quick experiments
                kwargs["poolclass"] = StaticPool
            self.engine = sa.create_engine(self.url, **kwargs)
            sa.event.listen(self.engine, "connect", self._sqlite_on_connect)
            sa.event.listen(self.engine, "begin", self._sqlite_on_begin)
            self._read_engine = self.engine.execution_options(sqlite_begin="DEFERRED")
        else:
            raise ValueError(f"unsupported database URL {self.url.render_as_string(hide_password=True)!r}")

    # -- engine plumbing ---------------------------------------------------------------------
    @staticmethod
    def _sqlite_on_connect(dbapi_connection: Any, connection_record: Any) -> None:
        # Take transaction control away from the sqlite3 module: _sqlite_on_begin emits BEGIN.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute(f"PRAGMA busy_timeout = {int(SQLITE_BUSY_TIMEOUT_S * 1000)}")
            cursor.execute("PRAGMA journal_mode = WAL")
            cursor.execute("PRAGMA synchronous = NORMAL")
            cursor.execute("PRAGMA foreign_keys = ON")
        finally:
            cursor.close()

    @staticmethod
    def _sqlite_on_begin(conn: sa.Connection) -> None:
        mode = conn.get_execution_options().get("sqlite_begin", "IMMEDIATE")
        conn.exec_driver_sql(f"BEGIN {mode}")

    @contextmanager
    def _write(self) -> Iterator[sa.Connection]:
        with self.engine.begin() as conn:
            yield conn

    @contextmanager
    def _read(self) -> Iterator[sa.Connection]:
        with self._read_engine.begin() as conn:
            yield conn

    @property
    def is_postgresql(self) -> bool:
        """True on PostgreSQL, False on SQLite."""
        return self.engine.dialect.name == "postgresql"

    def _now(self) -> sa.ColumnElement[datetime]:
        """"Now" as SQL: the DB clock on PostgreSQL, Python's UTC clock (naive) on SQLite."""
        if self.is_postgresql:
            return sa.func.now()
        return sa.literal(datetime.now(timezone.utc).replace(tzinfo=None), t.series.c.claim_expires_at.type)

    def _now_plus(self, seconds: float) -> sa.ColumnElement[datetime]:
        if self.is_postgresql:
            return sa.func.now() + sa.literal(timedelta(seconds=seconds), sa.Interval())
        value = datetime.now(timezone.utc).replace(tzinfo=None) + timedelta(seconds=seconds)
        return sa.literal(value, t.series.c.claim_expires_at.type)

    def _insert(self, table: sa.Table) -> Any:
        return (pg_dialect.insert if self.is_postgresql else sqlite_dialect.insert)(table)

    def create_schema(self) -> None:
        """Idempotent. PostgreSQL: execute schema.sql. SQLite: tables.metadata.create_all + triggers.

        On PostgreSQL, schema.sql runs only when this exact text (by SHA-256) has not been applied to
        the DB yet: its ALTER TABLEs take ACCESS EXCLUSIVE locks even when there is nothing to alter,
        and running them while another process claims series deadlocks. Concurrent first runs are
        serialised by an advisory lock, and the loser finds the hash recorded and does nothing.
        """
        if self.is_postgresql:
            sql = SCHEMA_SQL.read_text(encoding="utf-8")
            digest = hashlib.sha256(sql.encode("utf-8")).hexdigest()
            raw = self.engine.raw_connection()
            try:
                cursor = raw.cursor()
                try:
                    if _schema_applied(cursor, digest):
                        return
                    cursor.execute("SELECT pg_advisory_xact_lock(%s)", (_SCHEMA_LOCK_KEY,))
                    if not _schema_applied(cursor, digest):
                        had_network_faults = _has_column(cursor, "series", "network_faults")
                        cursor.execute(sql)
                        if not had_network_faults:
                            cursor.execute(NETWORK_FAULTS_MIGRATION)
                        cursor.execute("INSERT INTO schema_applied (sha256) VALUES (%s)", (digest,))
                finally:
                    cursor.close()
                raw.commit()
            except BaseException:
                raw.rollback()
                raise
            finally:
                raw.close()
            return
        with self._write() as conn:
            widened = _widen_sqlite_status_check(conn)
        if widened:  # connections opened before hold the old schema: let them go
            self.engine.dispose()
        with self._write() as conn:
            t.metadata.create_all(conn)
            if ("series", "network_faults") in _add_missing_sqlite_columns(conn):
                conn.execute(sa.text(NETWORK_FAULTS_MIGRATION))
            for table in t.TIMESTAMPED_TABLES:
                conn.exec_driver_sql(
                    f"CREATE TRIGGER IF NOT EXISTS {table.name}_date_modified "
                    f"AFTER UPDATE ON {table.name} FOR EACH ROW "
                    f"WHEN NEW.date_modified IS OLD.date_modified "
                    f"BEGIN UPDATE {table.name} SET date_modified = {t.SQLITE_NOW} "
                    f"WHERE rowid = NEW.rowid; END"
                )

    def dispose(self) -> None:
        """Close every pooled connection."""
        self.engine.dispose()
