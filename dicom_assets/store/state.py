"""The state DB: every query the project makes, in one place (SQLAlchemy Core).

PostgreSQL in production (schema from schema.sql), SQLite as the embedded default, same code.

Time: on PostgreSQL every "now" is the database clock (``now()``); on SQLite it is Python's UTC
clock, stored as naive UTC text (the SQLAlchemy SQLite DateTime format), so string comparison is
time comparison. Every datetime a method returns is timezone-aware UTC on both backends.

Transactions: each public method is one transaction. On SQLite a writing method starts with
``BEGIN IMMEDIATE`` (it takes the write lock up front, so a read-then-write never fails to
upgrade its lock), reads use a deferred ``BEGIN``; WAL mode lets readers run beside the writer
and the busy timeout makes writers queue instead of failing.
"""

from __future__ import annotations

import hashlib
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from itertools import islice
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Collection, Iterable, Iterator, Sequence

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql as pg_dialect
from sqlalchemy.dialects import sqlite as sqlite_dialect
from sqlalchemy.pool import StaticPool

from dicom_assets import layout
from dicom_assets.store import tables as t
from dicom_assets.store.records import (
    RETRIEVABLE,
    ArchiveCandidate,
    ArchiveRecord,
    PatientRecord,
    SeriesRecord,
    SeriesState,
    SeriesStatus,
    StudyRecord,
    UpsertCounts,
)

if TYPE_CHECKING:
    import pandas

SCHEMA_SQL = Path(__file__).parent / "schema.sql"
_ID_SEPARATOR = "\x1f"  # joins PatientIDs into one parameter (ASCII unit separator)
BATCH_ROWS = 1000
SQLITE_BUSY_TIMEOUT_S = 60.0
_SCHEMA_LOCK_KEY = 0x6469636F6D  # pg_advisory_xact_lock key serialising concurrent create_schema()

_PATIENT_FIELDS = ("patient_name", "patient_sex", "patient_birth_date")
_STUDY_FIELDS = (
    "study_id",
    "study_date",
    "study_time",
    "accession_number",
    "study_description",
    "modalities_in_study",
)
_SERIES_FIELDS = (
    "series_number",
    "modality",
    "series_description",
    "body_part_examined",
    "institution_name",
    "series_date",
    "series_time",
)
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
)
_INT_INVENTORY_COLUMNS = ("series_number", "expected_instances", "downloaded_instances", "downloaded_bytes", "attempts")


@dataclass(frozen=True)
class RelatedCounts:
    """The computed counts a C-FIND answer carried for a patient or a study; None = not answered.

    ``studies`` is NumberOfPatientRelatedStudies (patients only); ``series`` and ``instances``
    are NumberOfPatientRelatedSeries/Instances or NumberOfStudyRelatedSeries/Instances. They are
    how discovery notices, without asking about every study, that something changed below.
    """

    studies: int | None = None
    series: int | None = None
    instances: int | None = None


@dataclass(frozen=True)
class OutdatedRow:
    """A patient whose studies, or a study whose series, must be asked for again.

    ``outdated_at`` is the stored mark exactly as read: handing it back to ``mark_*_discovered``
    clears the mark only if nothing outdated the row again meanwhile (None: not marked).
    """

    key: str  # PatientID or StudyInstanceUID
    patient_id: str
    outdated_at: datetime | None


@dataclass(frozen=True)
class DiscoveryWatermark:
    """Where incremental discovery of one PACS stands (table ``discovery_watermarks``)."""

    watermark: str  # DICOM DA: the local date the last complete pass started
    passed_at: datetime
    full_pass_at: datetime | None


#: RelatedCounts attribute -> column, per table.
_PATIENT_COUNT_COLUMNS = {"studies": "related_studies", "series": "related_series", "instances": "related_instances"}
_STUDY_COUNT_COLUMNS = {"series": "related_series", "instances": "related_instances"}


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


def _archive_record(row: Any) -> ArchiveRecord:
    m = row._mapping
    return ArchiveRecord(
        patient_id=m["patient_id"],
        file_name=m["file_name"],
        series_count=m["series_count"],
        instance_count=m["instance_count"],
        bytes=m["bytes"],
        sha256=m["sha256"],
        archive_id=m["archive_id"],
        created_at=_utc(m["date_created"]),
        superseded_at=_utc(m["superseded_at"]),
        removed_at=_utc(m["removed_at"]),
        published_to=m["published_to"],
        published_at=_utc(m["published_at"]),
    )


class StateStore:
    """Thread-safe handle on the state DB (one SQLAlchemy engine; each method is one transaction)."""

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
                        cursor.execute(sql)
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
            t.metadata.create_all(conn)
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

    # -- discovery ---------------------------------------------------------------------------
    def _upsert(
        self,
        table: sa.Table,
        key: str,
        rows: Iterable[dict[str, Any]],
        fields: Sequence[str],
        extra_set: Callable[[Any], dict[str, Any]] | None = None,
        resets: Callable[[dict[str, Any], Any], bool] | None = None,
    ) -> UpsertCounts:
        """Batched insert-or-update keyed on ``key``.

        ``fields`` are updated on known rows, a NULL incoming value keeping the stored one. Known
        rows whose fields would not change are not written at all (their date_modified stays).
        ``resets(row, existing)`` says whether a known row goes back to pending (series only).
        Counts come from a SELECT of the batch's existing keys (locked FOR UPDATE on PostgreSQL).
        """
        inserted = updated = reset = 0
        key_col = table.c[key]
        extra_cols = ("download_status", "downloaded_instances", "expected_instances") if resets else ()
        read_cols = [key_col, *(table.c[f] for f in dict.fromkeys((*fields, *extra_cols)))]
        for chunk in _chunks(rows, BATCH_ROWS):
            batch: dict[Any, dict[str, Any]] = {}
            for row in chunk:  # a key twice in one statement is an error on PostgreSQL: last wins
                batch[row[key]] = row
            with self._write() as conn:
                query = sa.select(*read_cols).where(key_col.in_(list(batch))).order_by(key_col)
                if self.is_postgresql:
                    query = query.with_for_update()
                existing = {r[0]: r._mapping for r in conn.execute(query)}
                to_write = []
                for k, row in sorted(batch.items()):  # key order: concurrent upserts lock alike
                    old = existing.get(k)
                    if old is None:
                        inserted += 1
                        to_write.append(row)
                        continue
                    is_reset = bool(resets and resets(row, old))
                    changed = any(row[f] is not None and row[f] != old[f] for f in fields)
                    if is_reset or changed:
                        updated += 1
                        reset += is_reset
                        to_write.append(row)
                if not to_write:
                    continue
                stmt = self._insert(table)
                set_ = {f: sa.func.coalesce(stmt.excluded[f], table.c[f]) for f in fields}
                if extra_set:
                    set_.update(extra_set(stmt.excluded))
                stmt = stmt.on_conflict_do_update(index_elements=[key_col], set_=set_)
                conn.execute(stmt, to_write)
        return UpsertCounts(inserted=inserted, updated=updated, reset_to_pending=reset)

    def upsert_patients(self, patients: Iterable[PatientRecord]) -> UpsertCounts:
        """Insert new patients (partition_key = layout.patient_key), update demographics of known ones.

        A NULL demographic never overwrites a known value. ``updated`` counts known patients
        whose stored values changed (unchanged ones are not written).
        """
        rows = (
            {
                "patient_id": p.patient_id,
                "partition_key": layout.patient_key(p.patient_id),
                **{f: getattr(p, f) for f in _PATIENT_FIELDS},
            }
            for p in patients
        )
        return self._upsert(t.patients, "patient_id", rows, _PATIENT_FIELDS)

    def upsert_studies(self, studies: Iterable[StudyRecord]) -> UpsertCounts:
        """Insert new studies, update descriptive fields of known ones (NULL never overwrites).

        The patient of a known study is not changed. ``updated`` counts studies that changed.
        """
        rows = (
            {
                "study_instance_uid": s.study_instance_uid,
                "patient_id": s.patient_id,
                **{f: getattr(s, f) for f in _STUDY_FIELDS},
            }
            for s in studies
        )
        return self._upsert(t.studies, "study_instance_uid", rows, _STUDY_FIELDS)

    def upsert_series(self, series: Iterable[SeriesRecord]) -> UpsertCounts:
        """Insert new series as 'pending'; update descriptive fields of known ones.

        A known series whose expected_instances changed (PACS gained instances) and that is
        'complete' goes back to 'pending' (counted in reset_to_pending). A NULL expected count
        from the PACS never overwrites a known one. "Changed" compares with the stored expected
        count, or with downloaded_instances when none is stored. The study and patient of a
        known series are not changed. ``updated`` counts series that changed.
        """
        s = t.series
        rows = (
            {
                "series_instance_uid": r.series_instance_uid,
                "study_instance_uid": r.study_instance_uid,
                "patient_id": r.patient_id,
                "expected_instances": r.expected_instances,
                **{f: getattr(r, f) for f in _SERIES_FIELDS},
            }
            for r in series
        )

        def resets(row: dict[str, Any], old: Any) -> bool:
            new = row["expected_instances"]
            known = old["expected_instances"] if old["expected_instances"] is not None else old["downloaded_instances"]
            return old["download_status"] == "complete" and new is not None and new != known

        def extra_set(excluded: Any) -> dict[str, Any]:
            changed = sa.and_(
                s.c.download_status == "complete",
                excluded.expected_instances.is_not(None),
                excluded.expected_instances != sa.func.coalesce(s.c.expected_instances, s.c.downloaded_instances),
            )
            return {"download_status": sa.case((changed, "pending"), else_=s.c.download_status)}

        return self._upsert(
            s,
            "series_instance_uid",
            rows,
            (*_SERIES_FIELDS, "expected_instances"),
            extra_set=extra_set,
            resets=resets,
        )

    def patient_ids_for_keys(self, keys: Sequence[str]) -> dict[str, str]:
        """partition_key -> patient_id for the keys that exist."""
        out: dict[str, str] = {}
        with self._read() as conn:
            for chunk in _chunks(dict.fromkeys(keys), BATCH_ROWS):
                query = sa.select(t.patients.c.partition_key, t.patients.c.patient_id).where(
                    t.patients.c.partition_key.in_(chunk)
                )
                out.update({k: p for k, p in conn.execute(query)})
        return out

    def all_partition_keys(self) -> list[str]:
        """Every patient's partition key, sorted."""
        with self._read() as conn:
            query = sa.select(t.patients.c.partition_key).order_by(t.patients.c.partition_key)
            return list(conn.execute(query).scalars())

    def get_patient(self, patient_id: str) -> PatientRecord | None:
        """The patient's demographics, or None if unknown."""
        p = t.patients.c
        with self._read() as conn:
            row = conn.execute(
                sa.select(p.patient_id, *(p[f] for f in _PATIENT_FIELDS)).where(p.patient_id == patient_id)
            ).first()
        return PatientRecord(**row._mapping) if row else None

    def studies_of(self, patient_id: str) -> list[StudyRecord]:
        """The patient's studies, ordered by study_date then study uid."""
        s = t.studies.c
        query = (
            sa.select(s.study_instance_uid, s.patient_id, *(s[f] for f in _STUDY_FIELDS))
            .where(s.patient_id == patient_id)
            .order_by(s.study_date.nulls_last(), s.study_instance_uid)
        )
        with self._read() as conn:
            return [StudyRecord(**r._mapping) for r in conn.execute(query)]

    def series_of(self, patient_id: str) -> list[SeriesState]:
        """Ordered by study_date, study uid, series_number, series uid."""
        s = t.series.c
        query = (
            sa.select(*(s[c] for c in _SERIES_STATE_COLUMNS))
            .select_from(t.series.join(t.studies, t.series.c.study_instance_uid == t.studies.c.study_instance_uid))
            .where(s.patient_id == patient_id)
            .order_by(
                t.studies.c.study_date.nulls_last(),
                s.study_instance_uid,
                s.series_number.nulls_last(),
                s.series_instance_uid,
            )
        )
        with self._read() as conn:
            return [_series_state(r) for r in conn.execute(query)]

    def get_series(self, series_uid: str) -> SeriesState | None:
        """One series' state, or None if unknown."""
        s = t.series.c
        with self._read() as conn:
            row = conn.execute(
                sa.select(*(s[c] for c in _SERIES_STATE_COLUMNS)).where(s.series_instance_uid == series_uid)
            ).first()
        return _series_state(row) if row else None

    # -- incremental discovery ---------------------------------------------------------------
    def _record_counts(
        self,
        table: sa.Table,
        key: str,
        columns: dict[str, str],
        outdated_column: str,
        counts: Iterable[tuple[str, RelatedCounts]],
        unknown_outdates: bool,
    ) -> int:
        """Store the PACS's related counts of known rows; rows whose counts changed (or, with
        ``unknown_outdates``, came without any) get ``outdated_column`` = now. A count the PACS
        did not answer keeps the stored one. Rows that are not in the table are ignored.
        Returns how many rows were outdated."""
        outdated = 0
        key_col = table.c[key]
        stmt = (
            sa.update(table)
            .where(key_col == sa.bindparam("b_key"))
            .values(
                {
                    **{column: sa.func.coalesce(sa.bindparam(f"b_{column}", type_=sa.Integer), table.c[column]) for column in columns.values()},
                    outdated_column: self._now(),
                }
            )
        )
        for chunk in _chunks(counts, BATCH_ROWS):
            batch = dict(chunk)
            with self._write() as conn:
                query = sa.select(key_col, *(table.c[c] for c in columns.values())).where(key_col.in_(list(batch))).order_by(key_col)
                if self.is_postgresql:
                    query = query.with_for_update()
                changed = []
                for row in conn.execute(query):
                    new = {column: getattr(batch[row[0]], attr) for attr, column in columns.items()}
                    known = {column: value for column, value in new.items() if value is not None}
                    if any(row._mapping[c] != v for c, v in known.items()) if known else unknown_outdates:
                        changed.append({"b_key": row[0], **{f"b_{c}": v for c, v in new.items()}})
                if changed:
                    conn.execute(stmt, changed)
                    outdated += len(changed)
        return outdated

    def record_patient_counts(self, counts: dict[str, RelatedCounts]) -> int:
        """Store each known patient's NumberOfPatientRelated{Studies,Series,Instances}.

        A patient whose counts changed gets ``studies_outdated_at`` = now: something below it
        changed on the PACS. No counts at all changes nothing (such a PACS relies on full
        passes). Returns how many patients were outdated.
        """
        return self._record_counts(t.patients, "patient_id", _PATIENT_COUNT_COLUMNS, "studies_outdated_at", counts.items(), False)

    def record_study_counts(self, counts: dict[str, RelatedCounts]) -> int:
        """Store each known study's NumberOfStudyRelated{Series,Instances}.

        A study whose counts changed, or that came without counts (then nothing tells an
        unchanged study from a changed one), gets ``series_outdated_at`` = now. Returns how many.
        """
        return self._record_counts(t.studies, "study_instance_uid", _STUDY_COUNT_COLUMNS, "series_outdated_at", counts.items(), True)

    def settle_patient_studies(self, patient_ids: Sequence[str], full_pass: bool) -> int:
        """Clear the outdated mark of these patients when their stored studies account for the
        PACS's patient-level counts (number of studies, sums of the studies' related series and
        instances), or, after a full pass, when the PACS gave no patient-level counts.

        Called after a date-window pass: a patient whose change was a recent study is then fully
        known without a per-patient query. Returns how many of them stay outdated.
        """
        p, st = t.patients.c, t.studies.c
        remaining = 0
        for chunk in _chunks(dict.fromkeys(patient_ids), BATCH_ROWS):
            known = (
                sa.select(
                    st.patient_id,
                    sa.func.count().label("studies"),
                    sa.func.sum(st.related_series).label("series"),
                    sa.func.sum(st.related_instances).label("instances"),
                )
                .where(st.patient_id.in_(chunk))
                .group_by(st.patient_id)
                .subquery("known")
            )
            query = (
                sa.select(p.patient_id, p.related_studies, p.related_series, p.related_instances, known.c.studies, known.c.series, known.c.instances)
                .select_from(t.patients.outerjoin(known, known.c.patient_id == p.patient_id))
                .where(p.patient_id.in_(chunk), p.studies_outdated_at.is_not(None))
            )
            with self._write() as conn:
                settled = []
                for row in conn.execute(query):
                    pairs = [(row[1], row[4]), (row[2], row[5]), (row[3], row[6])]
                    answered = [(pacs, int(ours or 0)) for pacs, ours in pairs if pacs is not None]
                    if all(pacs == ours for pacs, ours in answered) if answered else full_pass:
                        settled.append(row[0])
                    else:
                        remaining += 1
                if settled:
                    conn.execute(sa.update(t.patients).where(p.patient_id.in_(settled)).values(studies_outdated_at=None))
        return remaining

    def patients_to_query_for_studies(self, patient_ids: Sequence[str], every_patient: bool = False) -> list[OutdatedRow]:
        """These patients whose studies are outdated (or all of them), in the order given."""
        p = t.patients.c
        found: dict[str, OutdatedRow] = {}
        with self._read() as conn:
            for chunk in _chunks(dict.fromkeys(patient_ids), BATCH_ROWS):
                query = sa.select(p.patient_id, p.studies_outdated_at).where(p.patient_id.in_(chunk))
                if not every_patient:
                    query = query.where(p.studies_outdated_at.is_not(None))
                found.update({pid: OutdatedRow(pid, pid, at) for pid, at in conn.execute(query)})
        return [found[pid] for pid in dict.fromkeys(patient_ids) if pid in found]

    def studies_to_query_for_series(self, patient_ids: Sequence[str], every_study: bool = False) -> list[OutdatedRow]:
        """The studies of these patients whose series are outdated (or all of them), ordered by
        patient, study date, study uid."""
        st = t.studies.c
        out: list[OutdatedRow] = []
        with self._read() as conn:
            for chunk in _chunks(sorted(set(patient_ids)), BATCH_ROWS):
                query = (
                    sa.select(st.study_instance_uid, st.patient_id, st.series_outdated_at)
                    .where(st.patient_id.in_(chunk))
                    .order_by(st.patient_id, st.study_date.nulls_last(), st.study_instance_uid)
                )
                if not every_study:
                    query = query.where(st.series_outdated_at.is_not(None))
                out.extend(OutdatedRow(uid, pid, at) for uid, pid, at in conn.execute(query))
        return out

    def _clear_outdated(self, table: sa.Table, key: str, column: str, rows: Iterable[OutdatedRow]) -> int:
        """Compare-and-clear: a mark set again after it was read (a later time) stays."""
        marked = [r for r in rows if r.outdated_at is not None]
        if not marked:
            return 0
        stmt = sa.update(table).where(
            table.c[key] == sa.bindparam("b_key"), table.c[column] <= sa.bindparam("b_at", type_=table.c[column].type)
        ).values({column: None})
        cleared = 0
        for chunk in _chunks(marked, BATCH_ROWS):
            with self._write() as conn:
                result = conn.execute(stmt, [{"b_key": r.key, "b_at": r.outdated_at} for r in chunk])
                cleared += max(result.rowcount, 0)
        return cleared

    def mark_studies_discovered(self, patients: Iterable[OutdatedRow]) -> int:
        """The studies of these patients were just asked for: clear their marks (as read)."""
        return self._clear_outdated(t.patients, "patient_id", "studies_outdated_at", patients)

    def mark_series_discovered(self, studies: Iterable[OutdatedRow]) -> int:
        """The series of these studies were just asked for: clear their marks (as read)."""
        return self._clear_outdated(t.studies, "study_instance_uid", "series_outdated_at", studies)

    def count_studies(self, patient_ids: Sequence[str]) -> int:
        """How many studies of these patients the state DB knows."""
        st = t.studies.c
        total = 0
        with self._read() as conn:
            for chunk in _chunks(dict.fromkeys(patient_ids), BATCH_ROWS):
                total += conn.execute(sa.select(sa.func.count()).select_from(t.studies).where(st.patient_id.in_(chunk))).scalar_one()
        return total

    def discovery_watermark(self, pacs_key: str) -> DiscoveryWatermark | None:
        """Where discovery of this PACS stands; None before its first complete pass."""
        w = t.discovery_watermarks.c
        with self._read() as conn:
            row = conn.execute(sa.select(w.watermark, w.passed_at, w.full_pass_at).where(w.pacs_key == pacs_key)).first()
        if row is None:
            return None
        return DiscoveryWatermark(watermark=row[0], passed_at=_utc(row[1]), full_pass_at=_utc(row[2]))  # type: ignore[arg-type]

    def record_discovery_pass(self, pacs_key: str, watermark: str, full_pass: bool) -> None:
        """A complete pass over this PACS ended: move its watermark (and its full-pass time)."""
        table = t.discovery_watermarks
        now = self._now()
        stmt = self._insert(table).values(pacs_key=pacs_key, watermark=watermark, passed_at=now, full_pass_at=now if full_pass else None)
        set_: dict[str, Any] = {"watermark": stmt.excluded.watermark, "passed_at": stmt.excluded.passed_at}
        if full_pass:
            set_["full_pass_at"] = stmt.excluded.full_pass_at
        with self._write() as conn:
            conn.execute(stmt.on_conflict_do_update(index_elements=[table.c.pacs_key], set_=set_))

    # -- retrieval ---------------------------------------------------------------------------
    def _retrievable(self) -> sa.ColumnElement[bool]:
        s = t.series.c
        return sa.or_(
            s.download_status.in_(RETRIEVABLE),
            sa.and_(
                s.download_status == "in_progress",
                sa.or_(s.claim_expires_at.is_(None), s.claim_expires_at < self._now()),
            ),
        )

    def _patient_in(self, patient_ids: list[str]) -> sa.ColumnElement[bool]:
        """``series.patient_id`` is one of ``patient_ids``.

        PostgreSQL: the IDs travel as one text parameter, split on the server into an array the
        planner sees only as an InitPlan parameter. A 20,000-element IN list or array literal
        costs ~26 ms to adapt in psycopg and ~36 ms to plan (every element is estimated); this
        costs ~1 ms, and the claim index is still scanned in order. Falls back to IN when an ID
        contains the separator (never a DICOM PatientID character).
        """
        s = t.series.c
        joined = _ID_SEPARATOR.join(patient_ids)
        if not self.is_postgresql or joined.count(_ID_SEPARATOR) != len(patient_ids) - 1:
            return s.patient_id.in_(patient_ids)
        array = sa.select(
            sa.func.string_to_array(sa.literal(joined, sa.Text), sa.literal(_ID_SEPARATOR, sa.Text),
                                    type_=pg_dialect.ARRAY(sa.Text))
        ).scalar_subquery()
        return s.patient_id == sa.any_(sa.cast(array, pg_dialect.ARRAY(sa.Text)))

    def _claimable(
        self,
        patient_ids: list[str],
        max_attempts: int | None,
        run_id: str | None = None,
        only: Collection[str] | None = None,
        from_patient: str | None = None,
    ) -> list[sa.ColumnElement[bool]]:
        """The WHERE clauses of "a series claim_next_series may take" (see its docstring)."""
        s = t.series.c
        clauses = [t.SERIES_NOT_COMPLETE, self._patient_in(patient_ids), self._retrievable()]
        if run_id is not None:
            clauses.append(s.claimed_in_run.is_distinct_from(run_id))
        if only is not None:
            clauses.append(s.series_instance_uid.in_(list(only)))
        if from_patient is not None:
            clauses.append(s.patient_id >= from_patient)
        if max_attempts is not None:
            clauses.append(sa.or_(s.download_status == "pending", s.attempts < max_attempts))
        return clauses

    def claim_next_series(
        self,
        patient_ids: Sequence[str],
        worker: str,
        lease_s: float,
        run_id: str | None = None,
        max_attempts: int | None = None,
        only: Collection[str] | None = None,
        from_patient: str | None = None,
    ) -> SeriesState | None:
        """Atomically claim one retrievable series of these patients for ``worker``.

        Retrievable: status pending/incomplete/failed, or in_progress with claim_expires_at in
        the past (a crashed claimer). PostgreSQL: SELECT ... FOR UPDATE SKIP LOCKED LIMIT 1,
        then UPDATE. Sets status in_progress, claimed_by, claim_expires_at = now + lease,
        attempts + 1. Returns the claimed row (after update) or None.
        Order: patient_id, study uid, series_number (NULL last), series uid: the order of the
        partial index series_claim_idx (not-complete series only), so a claim reads a few index
        entries however many series are complete.
        SQLite: one UPDATE ... WHERE uid = (SELECT ... LIMIT 1) RETURNING under BEGIN IMMEDIATE.
        ``run_id``: the retrieval run claiming. It is stored in the claimed row
        (``series.claimed_in_run``) and series already claimed under it are skipped, so a series
        that ended failed/incomplete is not retried in a loop within one run; another run claims
        it again. A retry of one series within the run (``only``) passes no run_id.
        ``max_attempts``: a series that already had that many attempts is no longer claimed
        (it stays failed with its last error) unless it is 'pending' (new, or reset because the
        PACS gained instances). ``only``: claim only among these series UIDs.
        ``from_patient``: only series of patients >= this PatientID (in the database's order),
        so a run resumes at its last claim instead of re-reading every series it attempted.
        """
        ids = list(dict.fromkeys(patient_ids))
        if not ids or (only is not None and not only):
            return None
        s = t.series.c
        pick = (
            sa.select(s.series_instance_uid)
            .where(*self._claimable(ids, max_attempts, run_id, only, from_patient))
            .order_by(s.patient_id, s.study_instance_uid, s.series_number.nulls_last(), s.series_instance_uid)
            .limit(1)
        )
        values = {
            "download_status": "in_progress",
            "claimed_by": worker,
            "claim_expires_at": self._now_plus(lease_s),
            "attempts": s.attempts + 1,
        }
        if run_id is not None:
            values["claimed_in_run"] = run_id
        returning = [s[c] for c in _SERIES_STATE_COLUMNS]
        with self._write() as conn:
            if self.is_postgresql:
                uid = conn.execute(pick.with_for_update(skip_locked=True)).scalar_one_or_none()
                if uid is None:
                    return None
                target = s.series_instance_uid == uid
            else:
                target = s.series_instance_uid == pick.scalar_subquery()
            row = conn.execute(sa.update(t.series).where(target).values(**values).returning(*returning)).first()
        return _series_state(row) if row else None

    def has_claimable_series(self, patient_ids: Sequence[str], max_attempts: int | None = None) -> bool:
        """Whether claim_next_series(patient_ids, max_attempts=...) could claim anything now
        (one indexed EXISTS, so an idle run over many patients sends no request and costs ~1 ms)."""
        ids = list(dict.fromkeys(patient_ids))
        if not ids:
            return False
        query = sa.select(sa.exists().where(*self._claimable(ids, max_attempts)))
        with self._read() as conn:
            return bool(conn.execute(query).scalar())

    def extend_claim(self, series_uid: str, worker: str, lease_s: float) -> bool:
        """Push the claim's expiry to now + lease. False if ``worker`` no longer holds the claim."""
        s = t.series.c
        stmt = (
            sa.update(t.series)
            .where(s.series_instance_uid == series_uid, s.claimed_by == worker, s.download_status == "in_progress")
            .values(claim_expires_at=self._now_plus(lease_s))
        )
        with self._write() as conn:
            return conn.execute(stmt).rowcount == 1

    def finish_series(
        self,
        series_uid: str,
        worker: str,
        status: SeriesStatus,
        downloaded_instances: int,
        downloaded_bytes: int,
        error: str | None = None,
        expected_instances: int | None = None,
    ) -> bool:
        """Record the outcome of an attempt and release the claim (only if ``worker`` holds it).

        expected_instances, when given, replaces the stored count (learned at IMAGE level).
        Sets downloaded_at when status is complete; clears last_error then.
        Returns False if the claim was lost (expired and taken by another worker, or released
        by release_expired_claims).
        """
        if status not in t.SERIES_STATUSES or status == "in_progress":
            raise ValueError(f"finish_series: {status!r} is not a final status")
        s = t.series.c
        values: dict[str, Any] = {
            "download_status": status,
            "downloaded_instances": downloaded_instances,
            "downloaded_bytes": downloaded_bytes,
            "claimed_by": None,
            "claim_expires_at": None,
        }
        if status == "complete":
            values["last_error"] = None
            values["downloaded_at"] = self._now()
        else:
            values["last_error"] = error
        if expected_instances is not None:
            values["expected_instances"] = expected_instances
        stmt = (
            sa.update(t.series)
            .where(s.series_instance_uid == series_uid, s.claimed_by == worker, s.download_status == "in_progress")
            .values(**values)
        )
        with self._write() as conn:
            return conn.execute(stmt).rowcount == 1

    def release_expired_claims(self) -> int:
        """Set in_progress series with an expired claim back to 'incomplete'. Returns how many."""
        s = t.series.c
        stmt = (
            sa.update(t.series)
            .where(
                s.download_status == "in_progress",
                sa.or_(s.claim_expires_at.is_(None), s.claim_expires_at < self._now()),
            )
            .values(download_status="incomplete", claimed_by=None, claim_expires_at=None)
        )
        with self._write() as conn:
            return conn.execute(stmt).rowcount

    def claim_holders(self) -> list[str]:
        """The distinct workers holding an in_progress claim (to find those that died)."""
        s = t.series.c
        stmt = sa.select(s.claimed_by).where(s.download_status == "in_progress", s.claimed_by.is_not(None)).distinct()
        with self._read() as conn:
            return [row[0] for row in conn.execute(stmt)]

    def release_claims_of(self, workers: Sequence[str]) -> int:
        """Release the claims of workers known to be dead (set their series to 'incomplete')."""
        if not workers:
            return 0
        s = t.series.c
        stmt = (
            sa.update(t.series)
            .where(s.download_status == "in_progress", s.claimed_by.in_(list(workers)))
            .values(download_status="incomplete", claimed_by=None, claim_expires_at=None,
                    last_error="the worker holding the claim died")
        )
        with self._write() as conn:
            return conn.execute(stmt).rowcount

    # -- archive -----------------------------------------------------------------------------
    def record_archive(self, archive: ArchiveRecord) -> ArchiveRecord:
        """Insert the archive and mark older archives of the patient superseded (same transaction).

        Returns the stored record (archive_id and created_at filled in).
        """
        a = t.archives.c
        with self._write() as conn:
            if self.is_postgresql:  # serialise concurrent recorders of one patient
                conn.execute(
                    sa.select(t.patients.c.patient_id)
                    .where(t.patients.c.patient_id == archive.patient_id)
                    .with_for_update()
                )
            conn.execute(
                sa.update(t.archives)
                .where(a.patient_id == archive.patient_id, a.superseded_at.is_(None))
                .values(superseded_at=self._now())
            )
            row = conn.execute(
                sa.insert(t.archives)
                .values(
                    patient_id=archive.patient_id,
                    file_name=archive.file_name,
                    series_count=archive.series_count,
                    instance_count=archive.instance_count,
                    bytes=archive.bytes,
                    sha256=archive.sha256,
                )
                .returning(*t.archives.c)
            ).one()
        return _archive_record(row)

    def mark_archive_removed(self, archive_id: int) -> None:
        """Record that a superseded archive's file was deleted."""
        a = t.archives.c
        with self._write() as conn:
            conn.execute(
                sa.update(t.archives)
                .where(a.archive_id == archive_id, a.removed_at.is_(None))
                .values(removed_at=self._now())
            )

    def mark_archive_published(self, archive_id: int, destination: str) -> None:
        """Record that the archive was copied to ``destination`` and verified there."""
        with self._write() as conn:
            conn.execute(
                sa.update(t.archives)
                .where(t.archives.c.archive_id == archive_id)
                .values(published_to=destination, published_at=self._now())
            )

    def all_series_uids(self) -> list[str]:
        """Every SeriesInstanceUID in the state DB (a list: for small DBs and tests)."""
        with self._read() as conn:
            return list(conn.execute(sa.select(t.series.c.series_instance_uid)).scalars())

    def iter_series_uids(self, chunk_rows: int = 50_000) -> Iterator[list[str]]:
        """Every SeriesInstanceUID in pages of at most ``chunk_rows``, in key order, so a million
        never sit in memory at once. Keyset pages over the primary key, each a short read of its
        own: no connection is held between pages, and a page is a plain fetch (SQLAlchemy's
        streamed rows cost 2.5 s per million here, the pages 1 s)."""
        if chunk_rows < 1:
            raise ValueError("chunk_rows must be >= 1")
        uid = t.series.c.series_instance_uid
        last: str | None = None
        while True:
            query = sa.select(uid).order_by(uid).limit(chunk_rows)
            if last is not None:
                query = query.where(uid > last)
            with self._read() as conn:
                page = list(conn.execute(query).scalars())
            if page:
                yield page
            if len(page) < chunk_rows:
                return
            last = page[-1]

    def latest_archive(self, patient_id: str) -> ArchiveRecord | None:
        """The patient's most recent archive record, or None."""
        a = t.archives.c
        query = sa.select(t.archives).where(a.patient_id == patient_id).order_by(a.archive_id.desc()).limit(1)
        with self._read() as conn:
            row = conn.execute(query).first()
        return _archive_record(row) if row else None

    def superseded_archives(self, patient_id: str) -> list[ArchiveRecord]:
        """Superseded archives of the patient whose file has not been removed yet (oldest first)."""
        a = t.archives.c
        query = (
            sa.select(t.archives)
            .where(a.patient_id == patient_id, a.superseded_at.is_not(None), a.removed_at.is_(None))
            .order_by(a.archive_id)
        )
        with self._read() as conn:
            return [_archive_record(r) for r in conn.execute(query)]

    @staticmethod
    def _series_counts() -> sa.Subquery:
        s = t.series.c
        return (
            sa.select(
                s.patient_id,
                sa.func.count().label("n"),
                sa.func.sum(sa.case((s.download_status == "complete", 0), else_=1)).label("not_complete"),
            )
            .group_by(s.patient_id)
            .subquery("counts")
        )

    @staticmethod
    def _latest_archive_ids(current_only: bool = False) -> sa.Subquery:
        a = t.archives.c
        query = sa.select(a.patient_id, sa.func.max(a.archive_id).label("archive_id")).group_by(a.patient_id)
        if current_only:
            query = query.where(a.superseded_at.is_(None))
        return query.subquery("latest")

    def archive_candidates(self, after_key: str | None = None, limit: int = 1000) -> list[ArchiveCandidate]:
        """Patients (ordered by partition_key, > after_key) with >= 1 series, every series complete,
        and no archive or a latest archive whose series_count differs from the current count."""
        p = t.patients.c
        counts = self._series_counts()
        latest = self._latest_archive_ids()
        a = t.archives.alias("a")
        query = (
            sa.select(p.patient_id, p.partition_key, counts.c.n, a.c.series_count)
            .select_from(
                t.patients.join(counts, counts.c.patient_id == p.patient_id)
                .outerjoin(latest, latest.c.patient_id == p.patient_id)
                .outerjoin(a, a.c.archive_id == latest.c.archive_id)
            )
            .where(
                counts.c.not_complete == 0,
                sa.or_(a.c.archive_id.is_(None), a.c.series_count != counts.c.n),
            )
            .order_by(p.partition_key)
            .limit(limit)
        )
        if after_key is not None:
            query = query.where(p.partition_key > after_key)
        with self._read() as conn:
            return [
                ArchiveCandidate(patient_id=r[0], partition_key=r[1], series_count=r[2], archived_series_count=r[3])
                for r in conn.execute(query)
            ]

    # -- reporting ---------------------------------------------------------------------------
    def status_counts(self) -> dict[str, int]:
        """download_status -> number of series (every status present, zeros included)."""
        s = t.series.c
        out = dict.fromkeys(t.SERIES_STATUSES, 0)
        with self._read() as conn:
            for status, n in conn.execute(sa.select(s.download_status, sa.func.count()).group_by(s.download_status)):
                out[status] = n
        return out

    def patient_counts(self) -> dict[str, int]:
        """{'patients': n, 'archived': patients whose latest archive matches their series count,
        'pending': the rest}."""
        counts = self._series_counts()
        latest = self._latest_archive_ids()
        a = t.archives.alias("a")
        archived_q = (
            sa.select(sa.func.count())
            .select_from(
                latest.join(a, a.c.archive_id == latest.c.archive_id).join(
                    counts, counts.c.patient_id == latest.c.patient_id
                )
            )
            .where(a.c.series_count == counts.c.n)
        )
        with self._read() as conn:
            total = conn.execute(sa.select(sa.func.count()).select_from(t.patients)).scalar_one()
            archived = conn.execute(archived_q).scalar_one()
        return {"patients": total, "archived": archived, "pending": total - archived}

    def inventory_query(self) -> sa.Select:
        """The inventory SELECT (columns = dicom_assets.inventory.INVENTORY_COLUMNS, in order)."""
        p, st, se = t.patients.c, t.studies.c, t.series.c
        latest = self._latest_archive_ids(current_only=True)
        a = t.archives.alias("a")
        return (
            sa.select(
                p.patient_id,
                p.partition_key,
                p.patient_name,
                p.patient_sex,
                p.patient_birth_date,
                st.study_instance_uid,
                st.study_id,
                st.study_date,
                st.study_time,
                st.accession_number,
                st.study_description,
                st.modalities_in_study,
                se.series_instance_uid,
                se.series_number,
                se.modality,
                se.series_description,
                se.body_part_examined,
                se.institution_name,
                se.series_date,
                se.series_time,
                se.expected_instances,
                se.downloaded_instances,
                se.downloaded_bytes,
                se.download_status,
                se.attempts,
                se.last_error,
                se.downloaded_at,
                a.c.file_name.label("archive_name"),
            )
            .select_from(
                t.series.join(t.studies, se.study_instance_uid == st.study_instance_uid)
                .join(t.patients, se.patient_id == p.patient_id)
                .outerjoin(latest, latest.c.patient_id == se.patient_id)
                .outerjoin(a, a.c.archive_id == latest.c.archive_id)
            )
            .order_by(
                se.patient_id,
                st.study_date.nulls_last(),
                st.study_instance_uid,
                se.series_number.nulls_last(),
                se.series_instance_uid,
            )
        )

    def iter_inventory_rows(self, chunk_rows: int = 10_000) -> Iterator[list[tuple[Any, ...]]]:
        """The inventory query's rows as tuples (columns: dicom_assets.inventory.INVENTORY_COLUMNS),
        in lists of at most ``chunk_rows``.

        One query (one snapshot), streamed through a server-side cursor on PostgreSQL, so memory
        is bounded by the chunk whatever the number of series. downloaded_at is aware UTC. Yields
        nothing when there are no series. Holds one connection until exhausted or closed.
        """
        if chunk_rows < 1:
            raise ValueError("chunk_rows must be >= 1")
        query = self.inventory_query()
        at = [c.name for c in query.selected_columns].index("downloaded_at")
        with self._read() as conn:
            if self.is_postgresql:  # psycopg then loads timestamps in datetime.timezone.utc, so
                conn.exec_driver_sql("SET LOCAL TimeZone = 'UTC'")  # _utc() needs no zone conversion
            result = conn.execution_options(yield_per=chunk_rows).execute(query)
            for part in result.partitions(chunk_rows):
                yield [(*row[:at], _utc(row[at]), *row[at + 1 :]) for row in part]

    def iter_inventory(self, chunk_rows: int = 50_000) -> Iterator["pandas.DataFrame"]:
        """iter_inventory_rows as DataFrames (for analysis; the CSV is written from the rows).

        Integer columns are pandas ``Int64`` (NULL-able), downloaded_at is UTC datetime64.
        """
        import pandas as pd

        columns = [c.name for c in self.inventory_query().selected_columns]
        for part in self.iter_inventory_rows(chunk_rows):
            if part:
                frame = pd.DataFrame.from_records(part, columns=columns)
                for name in _INT_INVENTORY_COLUMNS:
                    frame[name] = frame[name].astype("Int64")
                frame["downloaded_at"] = pd.to_datetime(frame["downloaded_at"], utc=True)
                yield frame

    # -- PACS request budget -----------------------------------------------------------------
    def _budget_time(self, value: datetime) -> datetime:
        """A budget timestamp as bound: aware UTC on PostgreSQL, naive UTC on SQLite."""
        value = value.astimezone(timezone.utc)
        return value if self.is_postgresql else value.replace(tzinfo=None)

    def take_request_token(
        self, pacs_key: str, max_per_window: int, window_s: float, what: str = "request"
    ) -> float:
        """Grant one request to the PACS ``pacs_key`` if fewer than ``max_per_window`` were granted
        in the last ``window_s`` seconds: returns 0.0 and logs it. Otherwise returns the seconds
        until the oldest grant that keeps the window full leaves it (> 0), and logs nothing.

        One short transaction: create-if-missing and lock the PACS's ``pacs_budgets`` row (FOR
        UPDATE on PostgreSQL; BEGIN IMMEDIATE serialises all writers on SQLite), prune its log rows
        older than the window, count the rest, insert the grant. Grants to one PACS are therefore
        serialised, and each one is timestamped after the lock was taken with
        ``max(clock, last_sent_at)``, so logged times never decrease even if the clock steps back.
        The clock is the database's (``clock_timestamp()``, not the transaction start ``now()``)
        on PostgreSQL, shared by every machine; on SQLite it is this machine's UTC clock.
        """
        if max_per_window < 1:
            raise ValueError("max_per_window must be >= 1")
        if window_s <= 0:
            raise ValueError("window_s must be > 0")
        b, log = t.pacs_budgets, t.pacs_request_log
        with self._write() as conn:
            conn.execute(self._insert(b).values(pacs_key=pacs_key).on_conflict_do_nothing(index_elements=[b.c.pacs_key]))
            columns: list[Any] = [b.c.last_sent_at]
            if self.is_postgresql:
                columns.append(sa.func.clock_timestamp(type_=sa.DateTime(timezone=True)))
            row = conn.execute(sa.select(*columns).where(b.c.pacs_key == pacs_key).with_for_update()).one()
            clock = _utc(row[1]) if self.is_postgresql else datetime.now(timezone.utc)
            last = _utc(row[0])
            now = max(clock, last) if last is not None else clock  # type: ignore[type-var]
            assert now is not None
            cutoff = self._budget_time(now - timedelta(seconds=window_s))
            conn.execute(sa.delete(log).where(log.c.pacs_key == pacs_key, log.c.sent_at <= cutoff))
            in_window = conn.execute(
                sa.select(sa.func.count()).select_from(log).where(log.c.pacs_key == pacs_key)
            ).scalar_one()
            if in_window < max_per_window:
                stamp = self._budget_time(now)
                conn.execute(sa.insert(log).values(pacs_key=pacs_key, sent_at=stamp, what=what))
                conn.execute(
                    sa.update(b).where(b.c.pacs_key == pacs_key).values(last_sent_at=stamp, granted=b.c.granted + 1)
                )
                return 0.0
            # Full: the window has room again when the (in_window - max + 1)-th oldest grant leaves.
            oldest = conn.execute(
                sa.select(log.c.sent_at)
                .where(log.c.pacs_key == pacs_key)
                .order_by(log.c.sent_at)
                .offset(in_window - max_per_window)
                .limit(1)
            ).scalar_one()
            conn.execute(sa.update(b).where(b.c.pacs_key == pacs_key).values(deferred=b.c.deferred + 1))
        leaves_at = _utc(oldest) + timedelta(seconds=window_s)  # type: ignore[operator]
        return max((leaves_at - now).total_seconds(), 0.001)

    def request_budget_stats(self, pacs_key: str) -> dict[str, int]:
        """``{'granted': n, 'deferred': n, 'in_log': n}`` for one PACS (zeros when unknown).

        ``deferred`` counts token requests answered "wait"; ``in_log`` the grants not yet pruned.
        """
        b, log = t.pacs_budgets, t.pacs_request_log
        with self._read() as conn:
            row = conn.execute(sa.select(b.c.granted, b.c.deferred).where(b.c.pacs_key == pacs_key)).first()
            in_log = conn.execute(
                sa.select(sa.func.count()).select_from(log).where(log.c.pacs_key == pacs_key)
            ).scalar_one()
        granted, deferred = (row[0], row[1]) if row else (0, 0)
        return {"granted": int(granted), "deferred": int(deferred), "in_log": int(in_log)}


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
