"""Scale benchmark (issue 5): a state DB of 20,000 patients, 50,000 studies and 1,000,000 series.

Targets: inventory of 1,000,000 series in <= 60 s and <= 1 GB peak RSS; claiming the next series
<= 10 ms; a sensor tick <= 10 s (and well under Dagster's 60 s for ``new_patient_work``).

The rows are synthetic and made by the server (``INSERT ... SELECT FROM generate_series``, so
filling takes seconds), in a database ``dicom_assets_bench_scale_<pid>`` created on the given
PostgreSQL server (default: ``$DATABASE_URL`` or 127.0.0.1:5432) and dropped at the end.

Layout, chosen to look like a site some months into a sync: patients come in blocks of 200 (one
run's partition range); every fifth block is still being retrieved (10 % of its series complete,
the rest pending / incomplete / failed / in progress), the other blocks are complete and mostly
archived: 1 in 16 of them has no archive yet, 1 in 16 gained a series since its archive, so the
archive sensor has about 2,000 patients to request.

``run_scale_benchmark()`` returns the figures (seconds, milliseconds, MB, counts); run this file
to print them as JSON. Inventory and its completeness check run in child processes, so their peak
RSS (``ru_maxrss``) is theirs alone, import of the code location included (as in a Dagster step).
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import sqlalchemy as sa

DEFAULT_ADMIN_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
PATIENTS = 20_000
STUDIES = 50_000
SERIES = 1_000_000
BLOCK = 200  # patients per run (dicom_assets.defs.patient_runs.PATIENTS_PER_RUN)
CLAIMS = 200  # claims timed per scenario
ATTEMPTED_IN_RUN = 5_000  # series the run already attempted, in the "after thousands" scenarios
MAX_ATTEMPTS = 5  # pacs.max_attempts default


# -- the synthetic state DB ----------------------------------------------------------------------

_IN_PROGRESS_PATIENT = f"(({{p}} / {BLOCK}) % 5 = 4)"

_FILL_SQL = [
    f"""
    INSERT INTO patients (patient_id, partition_key, patient_name, patient_sex, patient_birth_date)
    SELECT 'BENCH' || lpad(p::text, 6, '0'), 'BENCH' || lpad(p::text, 6, '0'),
           'Doe^Patient' || p, CASE WHEN p % 2 = 0 THEN 'F' ELSE 'M' END,
           to_char(date '1940-01-01' + (p * 7919) % 25000, 'YYYYMMDD')
    FROM generate_series(0, {PATIENTS - 1}) AS p
    """,
    f"""
    INSERT INTO studies (study_instance_uid, patient_id, study_id, study_date, study_time,
                         accession_number, study_description, modalities_in_study)
    SELECT '1.2.826.0.1.3680043.8.498.1.' || s, 'BENCH' || lpad((s % {PATIENTS})::text, 6, '0'),
           (s % 9999)::text, to_char(date '2015-01-01' + (s * 37) % 3650, 'YYYYMMDD'),
           lpad(((s * 13) % 24)::text, 2, '0') || '1500', 'ACC' || s,
           (ARRAY['CT THORAX', 'MR BRAIN', 'CT ABDOMEN', 'XR CHEST', 'PET-CT'])[1 + s % 5],
           (ARRAY['CT\\SR', 'MR', 'CT', 'CR', 'PT\\CT'])[1 + s % 5]
    FROM generate_series(0, {STUDIES - 1}) AS s
    """,
    # One row per series with its random draws (r_*: 0..999), then the columns derived from them.
    f"""
    INSERT INTO series (series_instance_uid, study_instance_uid, patient_id, series_number, modality,
                        series_description, body_part_examined, institution_name, series_date,
                        series_time, expected_instances, downloaded_instances, downloaded_bytes,
                        download_status, attempts, last_error, claimed_by, claim_expires_at,
                        downloaded_at)
    SELECT uid, study_uid, patient_id, series_number, modality, modality || ' series ' || series_number,
           'CHEST', 'Bench Hospital', study_date, '101500', expected,
           downloaded, downloaded::bigint * per_instance, status,
           CASE status WHEN 'pending' THEN 0 WHEN 'complete' THEN 1 + (r_a % 5 = 0)::int
                       WHEN 'failed' THEN 1 + r_a % {MAX_ATTEMPTS} ELSE 1 + r_a % 3 END,
           CASE status WHEN 'failed' THEN 'C-MOVE failed: 0xA702 out of resources'
                       WHEN 'incomplete' THEN 'retrieve reported success but only some instances are on disk' END,
           CASE WHEN status = 'in_progress' THEN 'bench-host:1:1' END,
           CASE WHEN status = 'in_progress' THEN now() + (CASE WHEN r_a % 2 = 0 THEN interval '1 hour'
                                                               ELSE interval '-1 hour' END) END,
           CASE WHEN status = 'complete' THEN timestamptz '2024-01-01' + r_a * interval '1 hour' END
    FROM (
        SELECT *, CASE status WHEN 'complete' THEN coalesce(expected, 10)
                              WHEN 'incomplete' THEN coalesce(expected, 10) / 2 ELSE 0 END AS downloaded
        FROM (
            SELECT *,
                   CASE WHEN r_e < 10 THEN NULL
                        WHEN modality = 'CT' THEN 50 + r_e / 2 WHEN modality = 'MR' THEN 20 + r_e / 5
                        WHEN modality = 'PT' THEN 100 + r_e / 3 WHEN modality = 'US' THEN 1 + r_e / 30
                        WHEN modality IN ('CR', 'SR') THEN 1 ELSE 1 + r_e / 100 END AS expected,
                   CASE modality WHEN 'CT' THEN 525000 WHEN 'MR' THEN 200000 WHEN 'PT' THEN 150000
                                 WHEN 'US' THEN 800000 WHEN 'CR' THEN 10000000 WHEN 'SR' THEN 5000
                                 ELSE 60000 END AS per_instance,
                   CASE WHEN NOT in_progress_patient OR r_s < 100 THEN 'complete'
                        WHEN r_s < 700 THEN 'pending' WHEN r_s < 820 THEN 'incomplete'
                        WHEN r_s < 940 THEN 'failed' ELSE 'in_progress' END AS status
            FROM (
                SELECT *, CASE WHEN r_m < 450 THEN 'CT' WHEN r_m < 700 THEN 'MR' WHEN r_m < 800 THEN 'CR'
                               WHEN r_m < 880 THEN 'US' WHEN r_m < 930 THEN 'SR' WHEN r_m < 970 THEN 'PT'
                               ELSE 'SEG' END AS modality
                FROM (
                    SELECT '1.2.826.0.1.3680043.8.498.2.' || s || '.' || j AS uid,
                           '1.2.826.0.1.3680043.8.498.1.' || s AS study_uid,
                           'BENCH' || lpad((s % {PATIENTS})::text, 6, '0') AS patient_id,
                           j / {STUDIES} + 1 AS series_number,
                           to_char(date '2015-01-01' + (s * 37) % 3650, 'YYYYMMDD') AS study_date,
                           {_IN_PROGRESS_PATIENT.format(p=f"(s % {PATIENTS})")} AS in_progress_patient,
                           abs(hashint4(j)) % 1000 AS r_s, abs(hashint4(j + 7919)) % 1000 AS r_m,
                           abs(hashint4(j + 104729)) % 1000 AS r_e, abs(hashint4(j + 1299709)) % 1000 AS r_a
                    FROM (SELECT j, j % {STUDIES} AS s FROM generate_series(0, {SERIES - 1}) AS j) AS ids
                ) AS draws
            ) AS with_modality
        ) AS with_status
    ) AS rows
    """,
    # Archives: an older superseded (and removed) zip for a quarter of the archived patients,
    # then the latest one: matching for most complete patients, one series short for 1 in 16
    # (they gained a series), none for 1 in 16; a quarter of the in-progress patients has one.
    """
    CREATE TEMP TABLE bench_counts AS
    SELECT patient_id, substr(patient_id, 6)::int AS p, count(*)::int AS n,
           sum(downloaded_instances)::int AS instances, sum(downloaded_bytes) AS bytes
    FROM series GROUP BY patient_id
    """,
    f"""
    INSERT INTO archives (patient_id, file_name, series_count, instance_count, bytes, sha256,
                          superseded_at, removed_at)
    SELECT patient_id, patient_id || '__seriesCount' || (n - 2) || '.zip', n - 2, instances, bytes,
           md5(patient_id), now() - interval '30 days', now() - interval '30 days'
    FROM bench_counts WHERE p % 16 >= 2 AND p % 4 = 2 AND NOT {_IN_PROGRESS_PATIENT.format(p="p")}
    """,
    f"""
    INSERT INTO archives (patient_id, file_name, series_count, instance_count, bytes, sha256)
    SELECT patient_id, patient_id || '__seriesCount' || c || '.zip', c, instances, bytes, md5(patient_id || c)
    FROM (SELECT *, CASE WHEN {_IN_PROGRESS_PATIENT.format(p="p")} OR p % 16 = 1 THEN n - 1 ELSE n END AS c
          FROM bench_counts
          WHERE p % 16 <> 0 AND (NOT {_IN_PROGRESS_PATIENT.format(p="p")} OR p % 4 = 0)) AS latest
    """,
]


def _drop_series_indexes_and_foreign_keys(cursor: Any) -> list[str]:
    """Drop the series table's secondary indexes and foreign keys; return the statements that
    recreate them exactly as schema.sql made them. One sorted index build and one validating
    join each are several times faster than maintaining them row by row over a million inserts."""
    cursor.execute(
        "SELECT conname, pg_get_constraintdef(oid) FROM pg_constraint WHERE conrelid = 'series'::regclass AND contype = 'f'"
    )
    foreign_keys = cursor.fetchall()
    cursor.execute(
        "SELECT i.indexrelid::regclass::text, pg_get_indexdef(i.indexrelid) FROM pg_index i "
        "WHERE i.indrelid = 'series'::regclass AND NOT i.indisprimary AND NOT i.indisunique"
    )
    indexes = cursor.fetchall()
    for name, _ in foreign_keys:
        cursor.execute(f'ALTER TABLE series DROP CONSTRAINT "{name}"')
    for name, _ in indexes:
        cursor.execute(f"DROP INDEX {name}")
    return [definition for _, definition in indexes] + [
        f'ALTER TABLE series ADD CONSTRAINT "{name}" {definition}' for name, definition in foreign_keys
    ]


def _fill(url: str) -> dict[str, float]:
    """Schema by StateStore.create_schema (the real indexes), rows by the server, then ANALYZE."""
    from dicom_assets.store import StateStore

    started = time.perf_counter()
    store = StateStore(url)
    store.create_schema()
    store.dispose()
    engine = sa.create_engine(url, isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as conn:
            cursor = conn.connection.dbapi_connection.cursor()  # no parameters: '%' is modulo
            rebuild = _drop_series_indexes_and_foreign_keys(cursor)
            for statement in _FILL_SQL:
                cursor.execute(statement)
            for statement in rebuild:
                cursor.execute(statement)
            cursor.execute("VACUUM ANALYZE")  # as autovacuum would have, on a long-lived DB
            cursor.close()
            counts = {
                name: conn.exec_driver_sql(f"SELECT count(*) FROM {name}").scalar_one()
                for name in ("patients", "studies", "series", "archives")
            }
            size = conn.exec_driver_sql("SELECT pg_database_size(current_database())").scalar_one()
    finally:
        engine.dispose()
    return {
        "fill_s": round(time.perf_counter() - started, 2),
        "db_mb": round(size / 1e6, 1),
        **{f"{name}_rows": n for name, n in counts.items()},
    }


# -- inventory and its check, each in a child process -------------------------------------------


def _child_inventory(url: str, path: str) -> dict[str, Any]:
    from dicom_assets.inventory import write_inventory
    from dicom_assets.store import StateStore

    store = StateStore(url)
    started = time.perf_counter()
    stats = write_inventory(store, Path(path))
    seconds = time.perf_counter() - started
    return {"seconds": seconds, "rows": stats.rows, "patients": stats.patients, "bytes": Path(path).stat().st_size}


def _child_inventory_check(url: str, path: str) -> dict[str, Any]:
    from dicom_assets.inventory import inventory_problems
    from dicom_assets.store import StateStore

    store = StateStore(url)
    started = time.perf_counter()
    rows, problems = inventory_problems(store, Path(path))
    return {"seconds": time.perf_counter() - started, "rows": rows, "problems": len(problems)}


_CHILDREN: dict[str, Callable[[str, str], dict[str, Any]]] = {
    "inventory": _child_inventory,
    "inventory-check": _child_inventory_check,
}


def _in_child(what: str, url: str, path: Path) -> dict[str, Any]:
    """Run one measurement in a fresh interpreter; adds its peak RSS in MB (Linux: KiB ru_maxrss)."""
    done = subprocess.run(
        [sys.executable, __file__, "--child", what, url, str(path)], capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        raise RuntimeError(f"{what} child failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _child_main(what: str, url: str, path: str) -> None:
    result = _CHILDREN[what](url, path)
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps(result))


# -- claims --------------------------------------------------------------------------------------


def _patient_ids(first: int, count: int) -> list[str]:
    return [f"BENCH{p:06d}" for p in range(first, first + count)]


_ATTEMPTED_SQL = f"""
    UPDATE series SET download_status = 'failed', attempts = attempts + 1, claimed_in_run = :run,
                      last_error = 'C-MOVE failed: 0xA702 out of resources', claimed_by = NULL,
                      claim_expires_at = NULL
    WHERE series_instance_uid IN (
        SELECT series_instance_uid FROM series
        WHERE patient_id = ANY(:ids) AND download_status <> 'complete'
          AND (download_status IN ('pending', 'incomplete', 'failed')
               OR (download_status = 'in_progress' AND claim_expires_at < now()))
          AND (download_status = 'pending' OR attempts < {MAX_ATTEMPTS})
        ORDER BY patient_id, study_instance_uid, series_number NULLS LAST, series_instance_uid
        LIMIT :n)
    RETURNING series_instance_uid
"""


def _attempt_in_run(store: Any, run_id: str, patient_ids: list[str], how_many: int) -> set[str]:
    """Put the state DB where run ``run_id`` is after its first ``how_many`` claims (in claim
    order) all ended 'failed': thousands of real claims would only make the benchmark slow."""
    with store.engine.begin() as conn:
        return set(conn.execute(sa.text(_ATTEMPTED_SQL), {"run": run_id, "ids": patient_ids, "n": how_many}).scalars())


def _time_claims(claims: Any, attempted: set[str]) -> dict[str, float]:
    """``CLAIMS`` claims as retrieval's claim loop makes them (RunClaims.next); each claimed
    series is then finished 'complete' (not timed), as a successful retrieve would."""
    times = []
    claimed = 0
    for _ in range(CLAIMS):
        started = time.perf_counter()
        series = claims.next("bench-worker")
        times.append(time.perf_counter() - started)
        if series is None:
            break
        claimed += 1
        if series.series_instance_uid in attempted:
            raise AssertionError(f"claimed {series.series_instance_uid} twice in one run")
        claims.store.finish_series(series.series_instance_uid, "bench-worker", "complete", 1, 1)
    times.sort()
    return {
        "median_ms": round(statistics.median(times) * 1000, 2),
        "p95_ms": round(times[max(0, int(len(times) * 0.95) - 1)] * 1000, 2),
        "max_ms": round(times[-1] * 1000, 2),
        "claimed": claimed,
    }


def _time_ms(fn: Callable[[], Any], repeat: int = 20) -> float:
    """Median milliseconds of ``repeat`` calls."""
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return round(statistics.median(times) * 1000, 2)


def _measure_claims(url: str) -> dict[str, float]:
    """Claims of a run over one 200-patient block still being retrieved, and over all 20,000
    patients; each fresh, and after the run already attempted ``ATTEMPTED_IN_RUN`` series."""
    from dicom_assets.retrieval import RunClaims
    from dicom_assets.store import StateStore

    everyone = _patient_ids(0, PATIENTS)
    store = StateStore(url)
    out: dict[str, float] = {}
    try:
        store.has_claimable_series(everyone[:1])  # open the connection pool
        # What an idle run checks before it opens an association (retrieval's "anything to do?").
        out["has_claimable_idle_200_patients_ms"] = _time_ms(lambda: store.has_claimable_series(_patient_ids(0, BLOCK), MAX_ATTEMPTS))
        out["has_claimable_all_patients_ms"] = _time_ms(lambda: store.has_claimable_series(everyone, MAX_ATTEMPTS))
        scenarios = [  # (name, patients, series the run attempted before)
            ("claim_200_patients", _patient_ids(4 * BLOCK, BLOCK), 0),
            ("claim_200_patients_after_attempted", _patient_ids(9 * BLOCK, BLOCK), ATTEMPTED_IN_RUN),
            ("claim_all_patients", everyone, 0),
            ("claim_all_patients_after_attempted", everyone, ATTEMPTED_IN_RUN),
        ]
        for name, ids, before in scenarios:
            claims = RunClaims(store, ids, MAX_ATTEMPTS)
            attempted = _attempt_in_run(store, claims.run_id, ids, before) if before else set()
            out.update({f"{name}_{k}": v for k, v in _time_claims(claims, attempted).items()})
    finally:
        store.dispose()
    out["claim_attempted_in_run"] = ATTEMPTED_IN_RUN
    return out


# -- sensors and the Dagster side ----------------------------------------------------------------


def _timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    started = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - started


def _measure_sensors(url: str, workdir: Path) -> dict[str, float]:
    """Both sensors through Dagster (build_sensor_context, a real ephemeral DagsterInstance)."""
    import dagster as dg
    import yaml

    from dicom_assets import defs
    from dicom_assets.defs.partitions import PATIENTS_PARTITION_SET
    from dicom_assets.defs.resources import DicomAssetsResource

    config = workdir / "config.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "pacs": {"host": "127.0.0.1", "port": 1, "called_ae_title": "PACS"},
                "paths": {"download_dir": "download", "archive_dir": "archive", "report_dir": "report"},
                "database": {"url": url},
            }
        )
    )
    resources = {"dicom": DicomAssetsResource(config_path=str(config))}
    out: dict[str, float] = {}
    with dg.DagsterInstance.ephemeral() as instance:

        def tick(name: str, cursor: str | None = None) -> tuple[Any, float]:
            sensor = defs.get_sensor_def(name)
            return _timed(lambda: sensor(dg.build_sensor_context(instance=instance, resources=resources, cursor=cursor)))

        _, out["sensor_new_patient_work_first_tick_s"] = tick("new_patient_work")  # includes the store's first use
        registered = ticks = 0
        slowest = 0.0
        while True:
            result, seconds = tick("new_patient_work")
            slowest = max(slowest, seconds)
            if not result.dynamic_partitions_requests:
                break
            keys = list(result.dynamic_partitions_requests[0].partition_keys)
            instance.add_dynamic_partitions(PATIENTS_PARTITION_SET, keys)
            registered += len(keys)
            ticks += 1
        out["sensor_new_patient_work_registered"] = registered
        out["sensor_new_patient_work_ticks_to_register_all"] = ticks
        out["sensor_new_patient_work_slowest_tick_s"] = slowest
        out["sensor_new_patient_work_steady_tick_s"] = seconds

        requested = ticks = 0
        slowest = 0.0
        cursor: str | None = None
        while True:
            result, seconds = tick("patient_archive_outdated", cursor)
            slowest = max(slowest, seconds)
            requested += len(result.run_requests or [])
            ticks += 1
            cursor = result.cursor
            if not cursor:
                break
        out["sensor_archive_outdated_requested"] = requested
        out["sensor_archive_outdated_ticks_per_pass"] = ticks
        out["sensor_archive_outdated_slowest_tick_s"] = slowest
    return {k: round(v, 3) if isinstance(v, float) else v for k, v in out.items()}


# -- entry points --------------------------------------------------------------------------------


def _database(admin_url: str, name: str, create: bool) -> str:
    engine = sa.create_engine(admin_url, isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as conn:
            conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            if create:
                conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
    finally:
        engine.dispose()
    return sa.engine.make_url(admin_url).set(database=name).render_as_string(hide_password=False)


def run_scale_benchmark(pg_admin_url: str | None = None) -> dict[str, float]:
    """Fill a fresh database, measure inventory, its check, claims and sensors; drop it again.

    ``pg_admin_url``: a URL of the PostgreSQL server with the right to create databases (default
    ``$DATABASE_URL``, else the local server on 127.0.0.1:5432).
    """
    admin = pg_admin_url or os.environ.get("DATABASE_URL") or DEFAULT_ADMIN_URL
    name = f"dicom_assets_bench_scale_{os.getpid()}"
    started = time.perf_counter()
    url = _database(admin, name, create=True)
    figures: dict[str, float] = {}
    try:
        with tempfile.TemporaryDirectory(prefix="dicom_assets_bench_") as tmp:
            workdir = Path(tmp)
            figures.update(_fill(url))
            csv = workdir / "inventory.csv"
            inv = _in_child("inventory", url, csv)
            if inv["rows"] != SERIES:
                raise AssertionError(f"the inventory has {inv['rows']} rows, the state DB {SERIES} series")
            figures.update({
                "inventory_s": round(inv["seconds"], 2),
                "inventory_peak_rss_mb": round(inv["peak_rss_mb"], 1),
                "inventory_rows": inv["rows"],
                "inventory_csv_mb": round(inv["bytes"] / 1e6, 1),
            })  # fmt: skip
            check = _in_child("inventory-check", url, csv)
            if check["problems"]:
                raise AssertionError(f"inventory_complete found {check['problems']} problem(s) in a fresh inventory")
            figures.update({
                "inventory_check_s": round(check["seconds"], 2),
                "inventory_check_peak_rss_mb": round(check["peak_rss_mb"], 1),
            })  # fmt: skip
            figures.update(_measure_sensors(url, workdir))
            figures.update(_measure_claims(url))
    finally:
        _database(admin, name, create=False)
    figures["total_s"] = round(time.perf_counter() - started, 1)
    return figures


if __name__ == "__main__":
    if sys.argv[1:2] == ["--child"]:
        _child_main(*sys.argv[2:5])
    else:
        print(json.dumps(run_scale_benchmark(sys.argv[1] if len(sys.argv) > 1 else None), indent=2))
