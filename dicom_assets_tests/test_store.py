"""StateStore against real PostgreSQL and SQLite (the ``store`` fixture runs each test on both)."""

from __future__ import annotations

import threading
import time
from collections import Counter
from datetime import datetime, timedelta, timezone

import pytest
import sqlalchemy as sa

from dicom_assets import layout
from dicom_assets.store import (
    ArchiveRecord,
    PatientRecord,
    SeriesRecord,
    StateStore,
    StudyRecord,
    UpsertCounts,
)
from dicom_assets.store import tables


def _seed(store: StateStore, patient_id: str, series: list[tuple[str, str, int | None, int | None]]) -> None:
    """series: (study uid, series uid, series_number, expected_instances)."""
    store.upsert_patients([PatientRecord(patient_id)])
    store.upsert_studies([StudyRecord(study, patient_id) for study in dict.fromkeys(s[0] for s in series)])
    store.upsert_series(
        [SeriesRecord(uid, study, patient_id, series_number=num, expected_instances=exp) for study, uid, num, exp in series]
    )


def _complete(store: StateStore, series_uid: str, patient_id: str, instances: int = 3) -> None:
    claimed = store.claim_next_series([patient_id], "setup", 60)
    assert claimed is not None and claimed.series_instance_uid == series_uid
    assert store.finish_series(series_uid, "setup", "complete", instances, instances * 100)


def _timestamps(store: StateStore, table: sa.Table, key: str, value: str) -> tuple[datetime, datetime]:
    with store.engine.connect() as conn:
        row = conn.execute(sa.select(table.c.date_created, table.c.date_modified).where(table.c[key] == value)).one()
    return row[0], row[1]


# -- schema ------------------------------------------------------------------------------------


def _family(type_: sa.types.TypeEngine) -> str:
    for family, cls in (
        ("bigint", sa.BigInteger),
        ("integer", sa.Integer),
        ("boolean", sa.Boolean),
        ("datetime", sa.DateTime),
        ("text", sa.String),
    ):
        if isinstance(type_, cls):
            if family == "datetime":
                return f"datetime(tz={bool(type_.timezone)})"
            return family
    raise AssertionError(f"unexpected type {type_!r}")


def test_postgres_schema_from_schema_sql_matches_tables(pg_store: StateStore) -> None:
    inspector = sa.inspect(pg_store.engine)
    assert set(inspector.get_table_names()) == set(tables.metadata.tables)
    for name, table in tables.metadata.tables.items():
        reflected = {c["name"]: c for c in inspector.get_columns(name)}
        assert list(reflected) == [c.name for c in table.columns], name
        for column in table.columns:
            r = reflected[column.name]
            where = f"{name}.{column.name}"
            assert r["nullable"] == column.nullable, where
            assert _family(r["type"]) == _family(column.type), where
            if column.autoincrement is True:  # BIGSERIAL
                assert r["default"].startswith("nextval("), where
            else:
                assert (r["default"] is not None) == (column.server_default is not None), where
        pk = inspector.get_pk_constraint(name)["constrained_columns"]
        assert pk == [c.name for c in table.primary_key.columns], name
        indexes = {i["name"]: i["column_names"] for i in inspector.get_indexes(name) if not i.get("unique")}
        expected_indexes = {i.name: [c.name for c in i.columns] for i in table.indexes}
        assert indexes == expected_indexes, name
        fks = sorted(
            (tuple(fk["constrained_columns"]), fk["referred_table"], fk["options"].get("ondelete"))
            for fk in inspector.get_foreign_keys(name)
        )
        expected_fks = sorted(
            ((fk.parent.name,), fk.column.table.name, fk.ondelete) for fk in table.foreign_keys
        )
        assert fks == expected_fks, name
        checks = {c["name"] for c in inspector.get_check_constraints(name)}
        assert checks == {c.name for c in table.constraints if isinstance(c, sa.CheckConstraint)}, name
    uniques = inspector.get_unique_constraints("patients")
    assert [u["column_names"] for u in uniques] == [["partition_key"]]
    assert "'pending'" in {c["name"]: c for c in inspector.get_columns("series")}["download_status"]["default"]


def test_create_schema_is_idempotent_and_builds_triggers(store: StateStore) -> None:
    store.create_schema()
    store.create_schema()
    with store.engine.connect() as conn:
        if store.is_postgresql:
            triggers = conn.execute(sa.text("SELECT tgname FROM pg_trigger WHERE NOT tgisinternal")).scalars()
        else:
            triggers = conn.execute(sa.text("SELECT name FROM sqlite_master WHERE type = 'trigger'")).scalars()
        assert set(triggers) == {f"{t}_date_modified" for t in ("patients", "studies", "series", "archives", "request_rows")}


def test_create_schema_on_a_busy_db_takes_no_table_locks(pg_store: StateStore, pg_url: str) -> None:
    """A process starting while another holds row locks must not queue behind them (or deadlock, as
    three concurrent syncs once did): schema.sql runs once, then its hash says there is nothing to do."""
    from dicom_assets.store import StateStore

    with pg_store.engine.connect() as busy:
        busy.exec_driver_sql("LOCK TABLE patients, studies, series IN ROW EXCLUSIVE MODE")
        url = sa.engine.make_url(pg_url).update_query_dict({"options": "-c lock_timeout=2000"})
        late = StateStore(url.render_as_string(hide_password=False))
        try:
            late.create_schema()  # would raise LockNotAvailable if it ran the ALTER TABLEs
            with late.engine.connect() as conn:
                applied = conn.exec_driver_sql("SELECT count(*) FROM schema_applied").scalar()
        finally:
            late.dispose()
        busy.rollback()
    assert applied == 1


def test_concurrent_first_create_schema_applies_it_once(pg_url: str) -> None:
    from concurrent.futures import ThreadPoolExecutor

    from dicom_assets.store import StateStore

    stores = [StateStore(pg_url) for _ in range(4)]
    try:
        with ThreadPoolExecutor(len(stores)) as pool:
            list(pool.map(lambda s: s.create_schema(), stores))  # raises if any of them failed
        with stores[0].engine.connect() as conn:
            assert conn.exec_driver_sql("SELECT count(*) FROM schema_applied").scalar() == 1
    finally:
        for s in stores:
            s.dispose()


def test_an_older_db_moves_connection_fault_attempts_off_the_series_budget(store: StateStore) -> None:
    """Before network_faults existed every claim was an attempt: series given up over a flaky
    link become claimable again on upgrade; those refused by the PACS keep their count."""
    _seed(store, "A", [("1.1", "1.1.1", 1, 3), ("1.1", "1.1.2", 2, 3), ("1.1", "1.1.3", 3, 3)])
    net = "gave up after 5 attempts (pacs.max_attempts=5): C-GET ([Errno 104] Connection reset by peer): PACS X@h:1 " \
          "dropped the association or timed out"
    with store.engine.begin() as conn:
        conn.execute(sa.text("UPDATE series SET download_status = 'failed', attempts = 5, last_error = :e "
                             "WHERE series_instance_uid = '1.1.1'"), {"e": net})
        conn.execute(sa.text("UPDATE series SET download_status = 'failed', attempts = 5, last_error = 'gave up "
                             "after 5 attempts: status 0xA702' WHERE series_instance_uid = '1.1.2'"))
        if store.is_postgresql:
            conn.exec_driver_sql("UPDATE schema_applied SET sha256 = 'an older text'")
        conn.exec_driver_sql("DROP INDEX IF EXISTS series_claim_idx")  # SQLite cannot drop a column an index uses
        conn.exec_driver_sql("ALTER TABLE series DROP COLUMN network_faults")
    store.create_schema()
    flaky, refused, untouched = (store.get_series(u) for u in ("1.1.1", "1.1.2", "1.1.3"))
    assert (flaky.download_status, flaky.attempts, flaky.network_faults) == ("incomplete", 0, 5)
    assert (refused.download_status, refused.attempts, refused.network_faults) == ("failed", 5, 0)
    assert (untouched.download_status, untouched.attempts, untouched.network_faults) == ("pending", 0, 0)
    claimed = store.claim_next_series(["A"], "w", 30, max_attempts=5)
    assert claimed is not None and claimed.series_instance_uid == "1.1.1"
    store.create_schema()  # applied once: a second start moves nothing again
    assert store.get_series("1.1.1").network_faults == 5


def test_retry_lists_and_resets_given_up_series(store: StateStore) -> None:
    _seed(store, "A", [("1.1", "1.1.1", 1, 3), ("1.1", "1.1.2", 2, 3)])
    _seed(store, "B", [("2.1", "2.1.1", 1, 3)])
    for uid, patient in (("1.1.1", "A"), ("1.1.2", "A"), ("2.1.1", "B")):
        claimed = store.claim_next_series([patient], "w", 30, only=[uid])
        status = "incomplete" if uid == "1.1.2" else "failed"
        assert claimed and store.finish_series(uid, "w", status, 1, 10, error="0xA702", count_attempt=True)
    assert [s.series_instance_uid for s in store.series_to_retry(["failed"])] == ["1.1.1", "2.1.1"]
    assert [s.series_instance_uid for s in store.series_to_retry(["failed"], patient_ids=["B"])] == ["2.1.1"]
    assert [s.series_instance_uid for s in store.series_to_retry(["failed", "incomplete"], series_uids=["1.1.2"])] == ["1.1.2"]
    assert not store.has_claimable_series(["B"], max_attempts=1)
    assert store.reset_attempts(["2.1.1"]) == 1
    state = store.get_series("2.1.1")
    assert (state.download_status, state.attempts, state.last_error) == ("incomplete", 0, "0xA702")
    assert store.has_claimable_series(["B"], max_attempts=1)
    assert store.reset_attempts([]) == 0


def test_instances_as_received_and_the_series_summary(store: StateStore) -> None:
    _seed(store, "A", [("1.1", "1.1.1", 1, 3)])
    ct, jpeg, explicit = "1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.1"
    first = store.record_instances("1.1.1", {"9.1": (ct, explicit, 100), "9.2": (ct, jpeg, 40)}, {"9.2": explicit})
    assert (first.transfer_syntaxes, first.transcoded, first.lossy_transcoded) == ((explicit, jpeg), 1, 1)
    again = store.record_instances("1.1.1", {"9.2": (ct, explicit, 100), "9.3": (ct, explicit, 100)}, {"9.2": explicit})
    assert (again.transfer_syntaxes, again.transcoded, again.lossy_transcoded) == ((explicit,), 0, 0)  # 9.2 fetched again
    rows = store.instances_of("1.1.1")
    assert [(r["sop_instance_uid"], r["transfer_syntax_uid"], r["bytes"]) for r in rows] == [
        ("9.1", explicit, 100), ("9.2", explicit, 100), ("9.3", explicit, 100)]
    state = store.get_series("1.1.1")
    assert (state.transfer_syntaxes, state.transcoded_instances, state.lossy_transcoded_instances) == (explicit, 0, 0)


def test_status_check_constraint(store: StateStore) -> None:
    _seed(store, "P", [("1.1", "1.1.1", 1, 1)])
    with pytest.raises(sa.exc.IntegrityError):
        with store.engine.begin() as conn:
            conn.execute(sa.update(tables.series).values(download_status="bogus"))
    assert store.get_series("1.1.1").download_status == "pending"


def test_foreign_keys_enforced(store: StateStore) -> None:
    with pytest.raises(sa.exc.IntegrityError):
        store.upsert_studies([StudyRecord("1.9", "no-such-patient")])


def test_date_modified_trigger(store: StateStore) -> None:
    store.upsert_patients([PatientRecord("P", patient_name="Old")])
    created, modified = _timestamps(store, tables.patients, "patient_id", "P")
    assert created.tzinfo is not None or not store.is_postgresql
    time.sleep(0.05)
    assert store.upsert_patients([PatientRecord("P", patient_name="Old")]) == UpsertCounts()
    assert _timestamps(store, tables.patients, "patient_id", "P") == (created, modified)  # untouched
    time.sleep(0.05)
    assert store.upsert_patients([PatientRecord("P", patient_name="New")]).updated == 1
    created2, modified2 = _timestamps(store, tables.patients, "patient_id", "P")
    assert created2 == created
    assert modified2 > modified
    assert modified2 - modified >= timedelta(milliseconds=50)
    # Every table has the trigger: an arbitrary UPDATE moves date_modified.
    store.upsert_studies([StudyRecord("1.1", "P")])
    store.upsert_series([SeriesRecord("1.1.1", "1.1", "P")])
    before = _timestamps(store, tables.series, "series_instance_uid", "1.1.1")[1]
    time.sleep(0.05)
    assert store.claim_next_series(["P"], "w", 10) is not None
    assert _timestamps(store, tables.series, "series_instance_uid", "1.1.1")[1] > before


# -- discovery ---------------------------------------------------------------------------------


def test_upsert_counts_and_batches(store: StateStore) -> None:
    patients = [PatientRecord(f"P{i}", patient_name=f"N{i}") for i in range(5)]
    assert store.upsert_patients(patients) == UpsertCounts(inserted=5)
    assert store.upsert_patients(patients) == UpsertCounts()
    changed = [PatientRecord("P0", patient_name="Other"), PatientRecord("P1", patient_sex="F"), PatientRecord("P9")]
    assert store.upsert_patients(changed) == UpsertCounts(inserted=1, updated=2)
    # A key twice in one call: the last record wins, counted once.
    dup = [PatientRecord("P2", patient_name="x"), PatientRecord("P2", patient_name="y")]
    assert store.upsert_patients(dup) == UpsertCounts(updated=1)
    assert store.get_patient("P2").patient_name == "y"

    store.upsert_studies([StudyRecord("1.1", "P0")])
    many = [SeriesRecord(f"1.1.{i}", "1.1", "P0", series_number=i, expected_instances=1) for i in range(2500)]
    assert store.upsert_series(many) == UpsertCounts(inserted=2500)
    half_changed = [
        SeriesRecord(r.series_instance_uid, "1.1", "P0", series_number=r.series_number, modality="CT" if i % 2 else None,
                     expected_instances=1)
        for i, r in enumerate(many)
    ]
    assert store.upsert_series(half_changed) == UpsertCounts(updated=1250)
    assert store.status_counts()["pending"] == 2500


def test_upsert_keeps_known_values_when_pacs_sends_null(store: StateStore) -> None:
    store.upsert_patients([PatientRecord("P", "Name", "F", "19700101")])
    store.upsert_patients([PatientRecord("P")])
    assert store.get_patient("P") == PatientRecord("P", "Name", "F", "19700101")
    store.upsert_studies([StudyRecord("1.1", "P", study_date="20200101", accession_number="A1")])
    assert store.upsert_studies([StudyRecord("1.1", "P", study_description="Head")]) == UpsertCounts(updated=1)
    assert store.studies_of("P") == [
        StudyRecord("1.1", "P", study_date="20200101", accession_number="A1", study_description="Head")
    ]
    store.upsert_series([SeriesRecord("1.1.1", "1.1", "P", series_number=3, modality="MR", expected_instances=10)])
    store.upsert_series([SeriesRecord("1.1.1", "1.1", "P")])
    s = store.get_series("1.1.1")
    assert (s.series_number, s.modality, s.expected_instances) == (3, "MR", 10)


def test_reset_to_pending_when_expected_count_changes(store: StateStore) -> None:
    _seed(store, "P", [("1.1", "1.1.1", 1, 3), ("1.1", "1.1.2", 2, None), ("1.1", "1.1.3", 3, 5)])
    _complete(store, "1.1.1", "P", instances=3)
    _complete(store, "1.1.2", "P", instances=4)  # complete with an unknown PACS count
    # 1.1.3 stays pending.
    same = [SeriesRecord("1.1.1", "1.1", "P", 1, expected_instances=3), SeriesRecord("1.1.2", "1.1", "P", 2, expected_instances=4)]
    assert store.upsert_series(same).reset_to_pending == 0  # 4 == the 4 downloaded
    assert store.get_series("1.1.2").download_status == "complete"

    counts = store.upsert_series(
        [
            SeriesRecord("1.1.1", "1.1", "P", 1, expected_instances=4),  # gained an instance
            SeriesRecord("1.1.2", "1.1", "P", 2, expected_instances=None),  # NULL: keep, no reset
            SeriesRecord("1.1.3", "1.1", "P", 3, expected_instances=6),  # changed but not complete
        ]
    )
    # 1.1.2 is unchanged (NULL keeps the stored 4), so only two rows were written.
    assert counts == UpsertCounts(inserted=0, updated=2, reset_to_pending=1)
    s1, s2, s3 = (store.get_series(u) for u in ("1.1.1", "1.1.2", "1.1.3"))
    assert (s1.download_status, s1.expected_instances) == ("pending", 4)
    assert (s2.download_status, s2.expected_instances) == ("complete", 4)
    assert (s3.download_status, s3.expected_instances) == ("pending", 6)
    assert store.upsert_series([SeriesRecord("1.1.2", "1.1", "P", 2, expected_instances=7)]) == UpsertCounts(
        updated=1, reset_to_pending=1
    )
    assert store.get_series("1.1.2").download_status == "pending"


def test_lookups_and_ordering(store: StateStore) -> None:
    odd = ["../..", "a/b", "José Ñ", ""]
    store.upsert_patients([PatientRecord(p) for p in odd])
    keys = [layout.patient_key(p) for p in odd]
    assert store.all_partition_keys() == sorted(keys)
    assert store.patient_ids_for_keys([*keys, "missing"]) == dict(zip(keys, odd))
    assert store.get_patient("nobody") is None and store.get_series("9.9") is None

    store.upsert_patients([PatientRecord("P")])
    store.upsert_studies([StudyRecord("1.2", "P", study_date="20200101"), StudyRecord("1.1", "P", study_date="20210101"),
                          StudyRecord("1.3", "P")])
    store.upsert_series(
        [
            SeriesRecord("1.1.1", "1.1", "P", series_number=1),
            SeriesRecord("1.2.10", "1.2", "P", series_number=10),
            SeriesRecord("1.2.2", "1.2", "P", series_number=2),
            SeriesRecord("1.2.9", "1.2", "P", series_number=None),
            SeriesRecord("1.3.1", "1.3", "P", series_number=1),
        ]
    )
    assert [s.series_instance_uid for s in store.series_of("P")] == ["1.2.2", "1.2.10", "1.2.9", "1.1.1", "1.3.1"]
    assert [s.study_instance_uid for s in store.studies_of("P")] == ["1.2", "1.1", "1.3"]
    assert store.series_of("nobody") == []


# -- claims ------------------------------------------------------------------------------------


def test_claim_order_fields_and_scope(store: StateStore) -> None:
    _seed(store, "B", [("2.1", "2.1.1", 1, 1)])
    _seed(store, "A", [("1.2", "1.2.1", 1, 1), ("1.1", "1.1.5", 5, 1), ("1.1", "1.1.3", None, 1), ("1.1", "1.1.2", 2, 1)])
    assert store.claim_next_series([], "w", 10) is None
    before = datetime.now(timezone.utc)
    order = []
    while (claimed := store.claim_next_series(["A", "B"], "w", 30)) is not None:
        order.append(claimed.series_instance_uid)
        assert claimed.download_status == "in_progress" and claimed.claimed_by == "w" and claimed.attempts == 0
        assert claimed.claim_expires_at.tzinfo is not None
        assert before + timedelta(seconds=20) < claimed.claim_expires_at < before + timedelta(seconds=40)
    assert order == ["1.1.2", "1.1.5", "1.1.3", "1.2.1", "2.1.1"]
    assert store.status_counts()["in_progress"] == 5
    assert store.extend_claim("1.1.2", "w", 100)
    assert store.get_series("1.1.2").claim_expires_at > datetime.now(timezone.utc) + timedelta(seconds=90)
    assert not store.extend_claim("1.1.2", "intruder", 100)
    assert not store.finish_series("1.1.2", "intruder", "complete", 1, 1)


def test_claim_only_given_patients_and_retrievable_statuses(store: StateStore) -> None:
    _seed(store, "A", [("1.1", "1.1.1", 1, 1), ("1.1", "1.1.2", 2, 1), ("1.1", "1.1.3", 3, 1)])
    _seed(store, "B", [("2.1", "2.1.1", 1, 1)])
    _complete(store, "1.1.1", "A", 1)
    c = store.claim_next_series(["A"], "w", 30)
    assert store.finish_series(c.series_instance_uid, "w", "failed", 0, 0, error="boom", count_attempt=True)
    c = store.claim_next_series(["A"], "w", 30)
    assert c.series_instance_uid == "1.1.2" and c.attempts == 1  # failed is retrievable
    assert store.finish_series("1.1.2", "w", "incomplete", 0, 0, error="short")
    assert store.get_series("1.1.2").last_error == "short"
    assert store.claim_next_series(["A"], "w", 30, only={"1.1.1", "1.1.3"}).series_instance_uid == "1.1.3"
    assert store.claim_next_series(["A"], "w", 30, only={"1.1.1", "1.1.3"}) is None  # complete / in progress
    assert store.claim_next_series(["A"], "w", 30).series_instance_uid == "1.1.2"  # incomplete too
    assert store.finish_series("1.1.3", "w", "incomplete", 0, 0)
    assert store.claim_next_series(["A"], "w", 30).series_instance_uid == "1.1.3"
    assert store.claim_next_series(["A"], "w", 30) is None
    assert store.get_series("2.1.1").download_status == "pending"


def test_a_run_claims_a_series_once_another_run_claims_it_again(store: StateStore) -> None:
    _seed(store, "A", [("1.1", "1.1.1", 1, 1), ("1.1", "1.1.2", 2, 1)])
    _seed(store, "B", [("2.1", "2.1.1", 1, 1)])
    assert store.has_claimable_series(["A", "B"]) and not store.has_claimable_series(["nobody"])
    assert store.claim_next_series(["A", "B"], "w", 30, run_id="r1").series_instance_uid == "1.1.1"
    assert store.finish_series("1.1.1", "w", "failed", 0, 0, error="boom", count_attempt=True)
    assert store.claim_next_series(["A", "B"], "w", 30, run_id="r1").series_instance_uid == "1.1.2"  # not 1.1.1 again
    assert store.finish_series("1.1.2", "w", "incomplete", 0, 0, count_attempt=True)
    # A retry of one series within the run (after a transient failure) names it and passes no run.
    retry = store.claim_next_series(["A"], "w", 30, only=["1.1.2"])
    assert retry.series_instance_uid == "1.1.2" and retry.attempts == 1
    assert store.finish_series("1.1.2", "w", "failed", 0, 0, count_attempt=True)
    assert store.claim_next_series(["A", "B"], "w", 30, run_id="r1").series_instance_uid == "2.1.1"
    assert store.finish_series("2.1.1", "w", "failed", 0, 0, count_attempt=True)
    assert store.claim_next_series(["A", "B"], "w", 30, run_id="r1") is None  # r1 tried all three
    assert store.has_claimable_series(["A", "B"])  # ... but they are claimable for any other run
    assert store.claim_next_series(["A", "B"], "w", 30, run_id="r2", from_patient="B").series_instance_uid == "2.1.1"
    second = store.claim_next_series(["A", "B"], "w", 30, run_id="r2")
    assert (second.series_instance_uid, second.attempts) == ("1.1.1", 1)
    assert store.claim_next_series(["A", "B"], "w", 30, run_id="r2").series_instance_uid == "1.1.2"
    assert store.claim_next_series(["A", "B"], "w", 30, run_id="r2") is None  # all in progress now
    for uid in ("1.1.1", "1.1.2", "2.1.1"):
        assert store.finish_series(uid, "w", "failed", 0, 0, count_attempt=True)
    assert store.has_claimable_series(["A", "B"], max_attempts=4)
    assert not store.has_claimable_series(["A", "B"], max_attempts=2)  # every one had 2 or 3 attempts
    assert store.claim_next_series(["A", "B"], "w", 30, run_id="r3", max_attempts=2) is None


def test_claims_scale_to_many_patients_in_one_call(store: StateStore) -> None:
    """20,000 PatientIDs in one claim (on PostgreSQL one parameter split on the server), IDs
    with the separator character (a plain IN list instead), and the claim index in the schema."""
    many = [f"P{i:05d}" for i in range(20_000)]
    _seed(store, "P19999", [("9.1", "9.1.1", 1, 1)])
    _seed(store, "odd\x1fid", [("8.1", "8.1.1", 1, 1)])
    assert store.has_claimable_series(many)
    assert store.claim_next_series(many, "w", 30, run_id="r").series_instance_uid == "9.1.1"
    assert store.claim_next_series(many, "w", 30, run_id="r") is None
    assert store.claim_next_series(["odd\x1fid", *many], "w", 30, run_id="r").series_instance_uid == "8.1.1"
    assert "series_claim_idx" in {i["name"] for i in sa.inspect(store.engine).get_indexes("series")}


def test_finish_series_fields(store: StateStore) -> None:
    _seed(store, "A", [("1.1", "1.1.1", 1, None)])
    store.claim_next_series(["A"], "w", 30)
    assert store.finish_series("1.1.1", "w", "incomplete", 2, 20, error="timeout", network_fault=True)
    assert (store.get_series("1.1.1").attempts, store.get_series("1.1.1").network_faults) == (0, 1)
    store.claim_next_series(["A"], "w", 30)
    assert store.finish_series("1.1.1", "w", "incomplete", 2, 20, error="refused", count_attempt=True)
    store.claim_next_series(["A"], "w", 30)
    assert store.finish_series("1.1.1", "w", "complete", 5, 500, error="ignored", expected_instances=5)
    s = store.get_series("1.1.1")
    assert (s.download_status, s.downloaded_instances, s.downloaded_bytes, s.expected_instances) == ("complete", 5, 500, 5)
    assert s.last_error is None and s.claimed_by is None and s.claim_expires_at is None
    assert (s.attempts, s.network_faults) == (1, 1)  # a claim is not an attempt; only counted outcomes are
    with store.engine.connect() as conn:
        downloaded_at = conn.execute(sa.select(tables.series.c.downloaded_at)).scalar_one()
    assert downloaded_at is not None
    with pytest.raises(ValueError):
        store.finish_series("1.1.1", "w", "in_progress", 0, 0)
    assert not store.finish_series("1.1.1", "w", "complete", 5, 500)  # no claim held any more


@pytest.mark.timeout(60)
def test_concurrent_claims_never_hand_out_a_series_twice(store: StateStore) -> None:
    store.upsert_patients([PatientRecord(f"P{p}") for p in range(4)])
    store.upsert_studies([StudyRecord(f"1.{p}", f"P{p}") for p in range(4)])
    uids = [f"1.{p}.{i}" for p in range(4) for i in range(20)]
    store.upsert_series([SeriesRecord(u, u.rsplit(".", 1)[0], f"P{u.split('.')[1]}", series_number=1) for u in uids])
    claimed: list[tuple[str, str]] = []
    errors: list[BaseException] = []
    lock = threading.Lock()
    start = threading.Barrier(8)

    def worker(n: int) -> None:
        name = f"worker-{n}"
        try:
            start.wait()
            while (s := store.claim_next_series([f"P{p}" for p in range(4)], name, 60)) is not None:
                with lock:
                    claimed.append((s.series_instance_uid, name))
                assert store.finish_series(s.series_instance_uid, name, "complete", 1, 10)
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert errors == []
    counts = Counter(uid for uid, _ in claimed)
    assert [uid for uid, n in counts.items() if n > 1] == []
    assert sorted(counts) == sorted(uids)
    assert store.status_counts()["complete"] == len(uids)
    assert {s.attempts for p in range(4) for s in store.series_of(f"P{p}")} == {0}  # complete: nothing counted
    assert len({w for _, w in claimed}) > 1  # the work really was shared


def test_expired_claim_is_taken_over(store: StateStore) -> None:
    _seed(store, "A", [("1.1", "1.1.1", 1, 2)])
    first = store.claim_next_series(["A"], "w1", 0.1)
    assert first is not None and first.claimed_by == "w1"
    assert store.claim_next_series(["A"], "w2", 30) is None  # lease still running
    time.sleep(0.3)
    second = store.claim_next_series(["A"], "w2", 30)
    assert second is not None and second.series_instance_uid == "1.1.1"
    assert second.claimed_by == "w2" and second.attempts == 0
    assert store.finish_series("1.1.1", "w1", "complete", 2, 20) is False
    assert store.extend_claim("1.1.1", "w1", 30) is False
    assert store.get_series("1.1.1").download_status == "in_progress"
    assert store.finish_series("1.1.1", "w2", "complete", 2, 20) is True
    assert store.get_series("1.1.1").download_status == "complete"


def test_release_expired_claims(store: StateStore) -> None:
    _seed(store, "A", [("1.1", "1.1.1", 1, 2), ("1.1", "1.1.2", 2, 2)])
    store.claim_next_series(["A"], "w1", 0.1)
    store.claim_next_series(["A"], "w2", 60)
    time.sleep(0.3)
    assert store.release_expired_claims() == 1
    s1, s2 = store.get_series("1.1.1"), store.get_series("1.1.2")
    assert (s1.download_status, s1.claimed_by, s1.claim_expires_at) == ("incomplete", None, None)
    assert (s2.download_status, s2.claimed_by) == ("in_progress", "w2")
    assert store.finish_series("1.1.1", "w1", "complete", 2, 2) is False
    assert store.release_expired_claims() == 0


# -- archives & reporting ------------------------------------------------------------------------


def test_archive_records(store: StateStore) -> None:
    _seed(store, "A", [("1.1", "1.1.1", 1, 1)])
    assert store.latest_archive("A") is None
    first = store.record_archive(ArchiveRecord("A", "A__seriesCount1.zip", 1, 1, 100, "aa"))
    assert first.archive_id is not None and first.created_at is not None and first.superseded_at is None
    assert store.superseded_archives("A") == []
    second = store.record_archive(ArchiveRecord("A", "A__seriesCount2.zip", 2, 3, 300, "bb"))
    assert second.archive_id > first.archive_id
    assert store.latest_archive("A") == second
    (old,) = store.superseded_archives("A")
    assert old.archive_id == first.archive_id and old.superseded_at is not None and old.removed_at is None
    store.mark_archive_removed(old.archive_id)
    assert store.superseded_archives("A") == []
    assert store.latest_archive("A").sha256 == "bb"


def test_archive_candidates_and_counts(store: StateStore) -> None:
    for pid in ("A", "B", "C", "D", "E"):
        _seed(store, pid, [(f"1.{ord(pid)}", f"1.{ord(pid)}.1", 1, 1), (f"1.{ord(pid)}", f"1.{ord(pid)}.2", 2, 1)])
    store.upsert_patients([PatientRecord("Z")])  # no series: never a candidate
    for pid in ("A", "B", "C", "D"):
        for uid in (f"1.{ord(pid)}.1", f"1.{ord(pid)}.2"):
            _complete(store, uid, pid, 1)
    # A: no archive; B: archive with an older series count; C: up to date; D: up to date then superseded
    store.record_archive(ArchiveRecord("B", "B__seriesCount1.zip", 1, 1, 1, "x"))
    store.record_archive(ArchiveRecord("C", "C__seriesCount2.zip", 2, 2, 1, "x"))
    store.record_archive(ArchiveRecord("D", "D__seriesCount2.zip", 2, 2, 1, "x"))
    store.record_archive(ArchiveRecord("D", "D__seriesCount1.zip", 1, 2, 1, "x"))
    candidates = store.archive_candidates()
    assert [(c.patient_id, c.series_count, c.archived_series_count) for c in candidates] == [
        ("A", 2, None),
        ("B", 2, 1),
        ("D", 2, 1),
    ]
    assert [c.patient_id for c in store.archive_candidates(after_key="A", limit=1)] == ["B"]
    assert [c.partition_key for c in store.archive_candidates(after_key="B")] == ["D"]
    assert store.status_counts() == {"pending": 2, "in_progress": 0, "complete": 8, "incomplete": 0, "failed": 0,
                                     "skipped": 0}
    assert store.patient_counts() == {"patients": 6, "archived": 1, "pending": 5}
