"""Crash safety with real processes: ``dicom-assets sync`` killed, the network reset, the state DB restarted.

Everything is real: ``dicom-assets sync`` runs as a subprocess with its own ``DAGSTER_HOME``, the
bundled PACS serves a generated cohort on loopback (as a ``dicom-assets pacs serve`` subprocess
where it must survive the kills, in-process where the test reads its counters), instances go to
real files and the state DB is PostgreSQL (the shared server's ``pg_url``, or a throwaway cluster
for the restart test, so the machine's PostgreSQL is never restarted).

1. ``kill -9`` at random moments (seeded), K times, then ``sync`` again: everything complete,
   every file valid, one verified zip per patient, no stale claim.
2. The PACS aborts every association every second (``drop_every_s``): ``sync`` still ends with
   every series complete.
3. A throwaway PostgreSQL cluster is restarted while ``sync`` retrieves: that run completes or
   fails with a clear message, and the next one completes without fetching anything already on
   disk.

Figures are printed (``pytest -s`` shows them).
"""

from __future__ import annotations

import glob
import os
import random
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import zipfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import pydicom
import pytest
import sqlalchemy as sa
import yaml
from sqlalchemy.pool import NullPool

from dicom_assets.devpacs import CohortSpec, CohortSummary, DevPacs, add_series, generate_cohort
from dicom_assets.layout import archive_name, instances_on_disk, patient_key
from dicom_assets_tests.conftest import free_port, require_service

RECEIVER_AE = "DICOM_ASSETS"
HIDDEN_DCM_PART = re.compile(r"^\.[0-9.]{1,64}\.dcm\.[0-9a-f]+\.part$")
HIDDEN_ZIP_PART = re.compile(r"^\..+\.zip\.[0-9a-f]+\.part$|^\.[0-9a-f]{32}\.zip\.[0-9a-f]+\.part$")


# ------------------------------------------------------------------------------------------
# Helpers


def _cohort(directory: Path, patients: int, series: int, slices: int, size: int, seed: int) -> CohortSummary:
    spec = CohortSpec(
        patients=patients, studies_per_patient=1, series_per_study=series, slices_per_series=slices,
        rows=size, columns=size, patient_id_prefix="CRASH", seed=seed,
    )  # fmt: skip
    return generate_cohort(directory, spec)


def _write_config(root: Path, pacs_port: int, receiver_port: int, db_url: str, **pacs: Any) -> Path:
    config = {
        "pacs": {"host": "127.0.0.1", "port": pacs_port, "called_ae_title": "DEVPACS", "calling_ae_title": RECEIVER_AE,
                 "timeout_s": 10, "straggler_timeout_s": 1, **pacs},
        "receiver": {"ae_title": RECEIVER_AE, "bind_address": "127.0.0.1", "port": receiver_port},
        "selection": {"patient_id_regex": "^CRASH"},
        "paths": {"download_dir": "downloads", "archive_dir": "archives", "report_dir": "reports"},
        "database": {"url": db_url},
    }  # fmt: skip
    path = root / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _dagster_home(root: Path) -> Path:
    home = root / "dagster_home"
    home.mkdir(exist_ok=True)
    (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    return home


def _start_sync(root: Path, config: Path, log: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, "DAGSTER_HOME": str(_dagster_home(root)), "PYTHONUNBUFFERED": "1"}
    with open(log, "wb") as out:  # the child keeps its own descriptor
        return subprocess.Popen(
            [sys.executable, "-m", "dicom_assets.cli", "sync", "--config", str(config), "--no-progress"],
            cwd=root, env=env, stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip


def _finish(proc: subprocess.Popen[bytes], log: Path, timeout: float) -> tuple[int, str]:
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        pytest.fail(f"dicom-assets sync did not end within {timeout} s:\n{log.read_text(errors='replace')[-4000:]}")
    return proc.returncode, log.read_text(errors="replace")


def _run_sync(root: Path, config: Path, name: str, timeout: float = 120) -> tuple[int, str]:
    log = root / f"{name}.log"
    return _finish(_start_sync(root, config, log), log, timeout)


def _engine(url: str) -> sa.engine.Engine:
    return sa.create_engine(url, poolclass=NullPool, connect_args={"connect_timeout": 5})


def _series_rows(url: str) -> list[dict[str, Any]]:
    engine = _engine(url)
    try:
        with engine.connect() as conn:
            rows = conn.execute(sa.text(
                "SELECT series_instance_uid, patient_id, download_status, attempts, claimed_by, expected_instances, "
                "downloaded_instances, last_error FROM series ORDER BY series_instance_uid"
            ))  # fmt: skip
            return [dict(r._mapping) for r in rows]
    finally:
        engine.dispose()


def _wait_for_port(port: int, proc: subprocess.Popen[bytes] | None = None, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"the process meant to listen on {port} exited with {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    pytest.fail(f"nothing listens on 127.0.0.1:{port} after {timeout} s")


@contextmanager
def _pacs_subprocess(cohort_dir: Path, receiver_port: int, log: Path) -> Iterator[tuple[subprocess.Popen[bytes], int]]:
    """``dicom-assets pacs serve`` in its own process: it outlives every killed sync."""
    port = free_port()
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "dicom_assets.cli", "pacs", "serve", "--dir", str(cohort_dir), "--port", str(port),
             "--move-destination", f"{RECEIVER_AE}=127.0.0.1:{receiver_port}"],
            stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        _wait_for_port(port, proc)
        yield proc, port
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _check_complete(url: str, cohort: CohortSummary) -> list[dict[str, Any]]:
    rows = _series_rows(url)
    assert sorted(r["series_instance_uid"] for r in rows) == sorted(s.series_instance_uid for s in cohort.series)
    bad = [r for r in rows if r["download_status"] != "complete" or r["claimed_by"] is not None]
    assert not bad, f"series not complete, or still claimed: {bad}"
    expected = {s.series_instance_uid: s.instances for s in cohort.series}
    assert {r["series_instance_uid"]: r["downloaded_instances"] for r in rows} == expected
    return rows


def _check_downloads(download_dir: Path, cohort: CohortSummary) -> list[Path]:
    """Every ``.dcm`` parses and is named by its SOPInstanceUID; every instance is there. Returns
    the temp files left behind (each must be a hidden ``.…part`` file that is never counted)."""
    wanted = {
        (patient_key(s.patient_id), s.study_instance_uid, s.series_instance_uid, sop)
        for s in cohort.series
        for sop in s.sop_instance_uids
    }
    found = set()
    for path in download_dir.rglob("*.dcm"):
        assert not path.name.startswith("."), path
        ds = pydicom.dcmread(path)  # whole file, pixel data included: a truncated file raises
        assert ds.SOPInstanceUID == path.stem, path
        assert ds.SeriesInstanceUID == path.parent.name and ds.StudyInstanceUID == path.parent.parent.name, path
        assert len(ds.PixelData) == ds.Rows * ds.Columns * ds.SamplesPerPixel * (ds.BitsAllocated // 8), path
        found.add((path.parent.parent.parent.name, path.parent.parent.name, path.parent.name, path.stem))
    assert found == wanted, f"{len(wanted - found)} missing, {len(found - wanted)} unexpected"
    leftovers = [p for p in download_dir.rglob("*") if p.is_file() and not p.name.endswith(".dcm")]
    for p in leftovers:
        assert HIDDEN_DCM_PART.match(p.name), f"unexpected file in the download directory: {p}"
    for s in cohort.series:  # a leftover temp file is never counted as an instance
        directory = download_dir / patient_key(s.patient_id) / s.study_instance_uid / s.series_instance_uid
        assert sorted(instances_on_disk(directory)) == sorted(s.sop_instance_uids)
    return leftovers


def _check_archives(archive_dir: Path, cohort: CohortSummary) -> list[Path]:
    """Exactly one zip per patient, intact (``unzip -t`` and zipfile), holding every instance.
    Returns temp files left behind (hidden ``.…part``)."""
    names = sorted(p.name for p in archive_dir.glob("*.zip"))
    per_patient: dict[str, list[Any]] = {}
    for s in cohort.series:
        per_patient.setdefault(s.patient_id, []).append(s)
    assert names == sorted(archive_name(pid, "__seriesCount", len(series)) for pid, series in per_patient.items())
    unzip = shutil.which("unzip")
    for pid, series in per_patient.items():
        path = archive_dir / archive_name(pid, "__seriesCount", len(series))
        with zipfile.ZipFile(path) as zf:
            assert zf.testzip() is None, path
            members = sorted(n for n in zf.namelist() if not n.endswith("/"))
        key = patient_key(pid)
        assert members == sorted(
            f"{key}/{s.study_instance_uid}/{s.series_instance_uid}/{sop}.dcm" for s in series for sop in s.sop_instance_uids
        ), path
        if unzip:
            done = subprocess.run([unzip, "-tq", str(path)], capture_output=True, text=True, timeout=60)
            assert done.returncode == 0, done.stdout + done.stderr
    leftovers = [p for p in archive_dir.iterdir() if not p.name.endswith(".zip")]
    for p in leftovers:
        assert HIDDEN_ZIP_PART.match(p.name), f"unexpected file in the archive directory: {p}"
    return leftovers


def _port_bindable(port: int, reuse: bool) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        if reuse:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def _phase(log_text: str) -> str:
    if "writing the inventory" in log_text:
        return "inventory"
    if "running the per-patient pipeline" in log_text:
        return "pipeline"
    if "discovering patients" in log_text:
        return "discovery"
    return "startup"


# ------------------------------------------------------------------------------------------
# 1. kill -9 at any moment, then sync again

KILLS = 6
SEED = 20261125
CLAIM_WAIT_S = 6.0
KILL_SIZE = 256  # 4 x 3 x 20 slices of 256x256 (31 MB): retrieval takes a few seconds
ADDED_SLICES = 40  # the series a patient gains before each round


def _wait_for_claim(url: str, pid: int, proc: subprocess.Popen[bytes], timeout: float) -> bool:
    """Poll the state DB until this sync holds a series claim (it is retrieving)."""
    deadline = time.monotonic() + timeout
    engine = _engine(url)
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                with engine.connect() as conn:
                    held = conn.execute(
                        sa.text("SELECT count(*) FROM series WHERE download_status = 'in_progress' AND claimed_by LIKE :p"),
                        {"p": f"%:{pid}:%"},
                    ).scalar()
            except sa.exc.ProgrammingError:  # the schema is not there yet
                held = 0
            if held:
                return True
            time.sleep(0.05)
    finally:
        engine.dispose()
    return False


def test_sync_survives_repeated_kill_9(tmp_path: Path, pg_url: str) -> None:
    cohort = _cohort(tmp_path / "pacs", patients=4, series=3, slices=20, size=KILL_SIZE, seed=11)
    receiver_port = free_port()
    rng = random.Random(SEED)
    # Kills alternate between a random time after the first series claim (so they land
    # mid-retrieval) and a random time after the start, spread over a sync's duration (startup,
    # discovery, pipeline, archive, inventory). Retrieval is fast on loopback, so before every
    # round a patient gains a series on the PACS: each round has something to retrieve, and an
    # archive to rebuild (its superseded zip to replace).
    lo, hi = 0.3, 9.0
    starts = KILLS // 2
    width = (hi - lo) / starts
    spread = [lo + i * width + rng.uniform(0, width) for i in range(starts)]
    rng.shuffle(spread)
    plan = [("after first claim", rng.uniform(0.0, 0.5)) if i % 2 == 0 else ("after start", spread.pop()) for i in range(KILLS)]
    kills: list[dict[str, Any]] = []
    with _pacs_subprocess(tmp_path / "pacs", receiver_port, tmp_path / "pacs.log") as (pacs, pacs_port):
        config = _write_config(tmp_path, pacs_port, receiver_port, pg_url, max_attempts=KILLS + 5)
        added = []
        for i, (mode, delay) in enumerate(plan):
            patient = cohort.patients[i % len(cohort.patients)]
            added.append(add_series(tmp_path / "pacs", patient, slices=ADDED_SLICES, rows=KILL_SIZE, columns=KILL_SIZE, seed=100 + i))
            log = tmp_path / f"killed-{i}.log"
            proc = _start_sync(tmp_path, config, log)
            started = time.monotonic()
            if mode == "after start":
                deadline = started + delay
                while time.monotonic() < deadline and proc.poll() is None:
                    time.sleep(0.02)
            elif _wait_for_claim(pg_url, proc.pid, proc, timeout=CLAIM_WAIT_S):
                time.sleep(delay)
            # else: nothing was claimed within CLAIM_WAIT_S (nothing left to retrieve): kill now
            if proc.poll() is not None:
                kills.append({"mode": mode, "delay": round(delay, 2), "where": f"finished first (exit {proc.returncode})"})
                continue
            proc.kill()  # SIGKILL
            proc.wait()
            after = time.monotonic() - started
            rows = _series_rows(pg_url) if "pipeline" in _phase(log.read_text(errors="replace")) else []
            claims = [r for r in rows if r["download_status"] == "in_progress" and f":{proc.pid}:" in (r["claimed_by"] or "")]
            where = "mid-retrieval" if claims else _phase(log.read_text(errors="replace"))
            if where == "pipeline":
                where = "pipeline, no claim held (studies/series/archive/validation)"
            kills.append({
                "mode": mode, "delay": round(delay, 2), "killed_at_s": round(after, 2), "where": where,
                "claims": len(claims), "dcm_on_disk": sum(1 for _ in (tmp_path / "downloads").rglob("*.dcm")),
                "zip_temps": sum(1 for _ in (tmp_path / "archives").glob(".*.part")),
                "reuseaddr_bind": _port_bindable(receiver_port, reuse=True),
                "plain_bind": _port_bindable(receiver_port, reuse=False),
            })  # fmt: skip
            # The receiver port of the killed sync is free again for the next one (pynetdicom sets
            # SO_REUSEADDR), and the PACS, a separate process, lived through it.
            assert kills[-1]["reuseaddr_bind"], kills[-1]
            assert pacs.poll() is None
        cohort = CohortSummary(series=cohort.series + tuple(added))
        before_final = _series_rows(pg_url)
        code, output = _run_sync(tmp_path, config, "final")
        assert code == 0, output[-4000:]
        assert pacs.poll() is None

    rows = _check_complete(pg_url, cohort)
    dcm_parts = _check_downloads(tmp_path / "downloads", cohort)
    zip_parts = _check_archives(tmp_path / "archives", cohort)
    mid = [k for k in kills if k["where"] == "mid-retrieval"]
    killed = [k for k in kills if not k["where"].startswith("finished")]
    print(f"\n[kill -9] cohort (with the added series) {len(cohort.series)} series / {cohort.instances} instances; kills:")
    for k in kills:
        print(f"  {k}")
    print(
        f"[kill -9] {len(kills)} tried, {len(killed)} killed: {len(mid)} mid-retrieval, {len(killed) - len(mid)} elsewhere; "
        f"before the final sync: {sum(r['download_status'] == 'complete' for r in before_final)} series complete; "
        f"attempts max {max(r['attempts'] for r in rows)}; leftover temp files: {len(dcm_parts)} .dcm.part, "
        f"{len(zip_parts)} .zip.part"
    )
    assert len(killed) >= KILLS // 2
    assert mid, f"no kill landed mid-retrieval: {kills}"


# ------------------------------------------------------------------------------------------
# 2. Periodic network resets during retrieval

DROP_EVERY_S = 0.4


def test_sync_completes_through_periodic_drops(tmp_path: Path, pg_url: str) -> None:
    cohort = _cohort(tmp_path / "pacs", patients=3, series=3, slices=40, size=256, seed=12)
    receiver_port = free_port()
    with DevPacs(
        tmp_path / "pacs", move_destinations={RECEIVER_AE: ("127.0.0.1", receiver_port)}, drop_every_s=DROP_EVERY_S
    ) as pacs:
        config = _write_config(
            tmp_path, pacs.port, receiver_port, pg_url,
            retry_initial_s=0.1, retry_max_s=0.5, max_attempts=30, wait_for_pacs_s=30,
        )  # fmt: skip
        drops_before, aborted_before = pacs.drops, pacs.associations_aborted
        started = time.monotonic()
        syncs = []
        for i in range(2):  # one sync, and a second only if the first did not finish the job
            code, output = _run_sync(tmp_path, config, f"sync-{i}")
            syncs.append(code)
            if code == 0:
                break
        seconds = time.monotonic() - started
        drops, aborted = pacs.drops - drops_before, pacs.associations_aborted - aborted_before
        moves = pacs.requests_by_kind().get("C-MOVE", 0)
    assert syncs[-1] == 0, output[-4000:]
    rows = _check_complete(pg_url, cohort)
    _check_downloads(tmp_path / "downloads", cohort)
    _check_archives(tmp_path / "archives", cohort)
    attempts = sum(r["attempts"] for r in rows)
    print(
        f"\n[drops] {cohort.instances} instances in {len(cohort.series)} series retrieved in {seconds:.1f} s by "
        f"{len(syncs)} sync(s) (exit codes {syncs}); drops every {DROP_EVERY_S} s: {drops}, associations aborted: "
        f"{aborted}; series attempts {attempts} (max {max(r['attempts'] for r in rows)} for one series); C-MOVEs {moves}"
    )
    assert drops >= 2
    assert aborted >= 1, "no association was ever aborted: the drops tested nothing"


# ------------------------------------------------------------------------------------------
# 3. PostgreSQL restarted mid-run (a throwaway cluster, never the shared server)


class _CountingPacs(DevPacs):
    """DevPacs that notes every instance a C-MOVE/C-GET hands to its sending association (one
    it only planned to send, before the association went away, is not noted)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.sent: list[tuple[str, str]] = []  # (SeriesInstanceUID, SOPInstanceUID)

    def _sub_operations(self, event: Any, instances: Any) -> Iterator[Any]:  # type: ignore[override]
        for status, dataset in DevPacs._sub_operations(event, instances):
            if dataset is not None:
                ids = dataset.devpacs_instance.ids
                self.sent.append((ids[2], ids[3]))
            yield status, dataset


def _pg_bin(name: str) -> str | None:
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    return found[-1] if found else shutil.which(name)


@pytest.fixture
def throwaway_pg() -> Iterator[tuple[str, Any]]:
    """A PostgreSQL cluster of its own on a free loopback port, run as the ``postgres`` user;
    yields its URL and a function that restarts it (stop, a pause, start)."""
    initdb, pg_ctl, runuser = _pg_bin("initdb"), _pg_bin("pg_ctl"), shutil.which("runuser")
    why = None
    if not (initdb and pg_ctl):
        why = "initdb/pg_ctl (Debian's postgresql package)"
    elif os.geteuid() != 0 or not runuser:
        why = "a throwaway PostgreSQL cluster (needs root to run initdb as the postgres user)"
    else:
        try:
            import pwd

            pw = pwd.getpwnam("postgres")
        except KeyError:
            why = "the postgres OS user"
    require_service(why is None, why or "")
    data = Path(tempfile.mkdtemp(prefix="dicom_assets_pg_", dir="/tmp"))
    os.chown(data, pw.pw_uid, pw.pw_gid)
    port = free_port()
    opts = f"-p {port} -k {data} -c listen_addresses=127.0.0.1 -c fsync=off"

    def as_postgres(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run([runuser, "-u", "postgres", "--", *args], capture_output=True, text=True, timeout=timeout)

    def pg_ctl_do(action: str, *extra: str) -> subprocess.CompletedProcess[str]:
        return as_postgres(pg_ctl, "-D", str(data / "db"), "-l", str(data / "log"), "-o", opts, "-w", "-t", "30", *extra, action)

    try:
        done = as_postgres(initdb, "-D", str(data / "db"), "-A", "trust", "-U", "postgres", "--no-sync")
        started = pg_ctl_do("start") if done.returncode == 0 else done
        require_service(
            done.returncode == 0 and started.returncode == 0,
            f"a throwaway PostgreSQL cluster ({started.stdout[-500:]}{started.stderr[-1000:]})",
        )

        def restart(down_s: float) -> float:
            """Stop (fast: every session is terminated), stay down ``down_s``, start again."""
            t0 = time.monotonic()
            done = pg_ctl_do("stop", "-m", "fast")
            assert done.returncode == 0, done.stdout + done.stderr
            time.sleep(down_s)
            done = pg_ctl_do("start")
            assert done.returncode == 0, done.stdout + done.stderr
            return time.monotonic() - t0

        yield f"postgresql://postgres@127.0.0.1:{port}/postgres", restart
    finally:
        if (data / "db" / "postmaster.pid").exists():
            pg_ctl_do("stop", "-m", "immediate")
        shutil.rmtree(data, ignore_errors=True)


PG_DOWN_S = 2.0


def test_postgres_restart_mid_run(tmp_path: Path, throwaway_pg: tuple[str, Any]) -> None:
    url, restart = throwaway_pg
    cohort = _cohort(tmp_path / "pacs", patients=3, series=3, slices=20, size=128, seed=13)
    receiver_port = free_port()
    with _CountingPacs(tmp_path / "pacs", move_destinations={RECEIVER_AE: ("127.0.0.1", receiver_port)}) as pacs:
        config = _write_config(tmp_path, pacs.port, receiver_port, url)
        log = tmp_path / "sync-1.log"
        proc = _start_sync(tmp_path, config, log)
        retrieving = _wait_for_claim(url, proc.pid, proc, timeout=60)
        assert retrieving, f"the sync never started retrieving:\n{log.read_text(errors='replace')[-3000:]}"
        restart_s = restart(PG_DOWN_S)
        code1, out1 = _finish(proc, log, timeout=120)
        if code1 != 0:
            # It failed: it must say so plainly (which run failed), not hang or exit silently.
            # (Seen: the run's steps fail with psycopg's "connection ... failed: Connection refused",
            # then the CLI itself ends on an uncaught OperationalError traceback.)
            assert "failed runs:" in out1 or "OperationalError" in out1, out1[-4000:]
        rows1 = {r["series_instance_uid"]: r for r in _series_rows(url)}
        on_disk1 = {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in (tmp_path / "downloads").rglob("*.dcm")}
        sops_on_disk1 = {p.stem for p in on_disk1}
        complete1 = {uid for uid, r in rows1.items() if r["download_status"] == "complete"}
        sent1, moves1 = len(pacs.sent), pacs.requests_by_kind().get("C-MOVE", 0)
        pacs.sent.clear()

        code2, out2 = _run_sync(tmp_path, config, "sync-2")
        moves2 = pacs.requests_by_kind().get("C-MOVE", 0) - moves1
        sent2 = list(pacs.sent)

    assert code2 == 0, out2[-4000:]
    _check_complete(url, cohort)
    _check_downloads(tmp_path / "downloads", cohort)
    _check_archives(tmp_path / "archives", cohort)
    # Nothing already on disk was asked for again, no complete series was moved again, and the
    # files of the first run are untouched (same inode, same mtime).
    again = [sop for _, sop in sent2 if sop in sops_on_disk1]
    assert not again, f"{len(again)} instances already on disk were sent again"
    assert not {series for series, _ in sent2} & complete1
    # Every missing instance was fetched, and nothing else. (The same missing instance may be
    # sent twice when a retrieve in the second sync is retried; that fetches nothing on disk.)
    missing = {sop for ids in cohort.series for sop in ids.sop_instance_uids} - sops_on_disk1
    assert {sop for _, sop in sent2} == missing
    resent = len(sent2) - len({sop for _, sop in sent2})
    for path, ident in on_disk1.items():
        assert (path.stat().st_ino, path.stat().st_mtime_ns) == ident, path
    first = "completed" if code1 == 0 else f"failed (exit {code1}): " + next(
        (line for line in reversed(out1.splitlines()) if "failed runs" in line or "Error" in line), out1[-300:]
    )
    print(
        f"\n[pg restart] restart took {restart_s:.1f} s while retrieving; first sync {first}; after it "
        f"{len(complete1)}/{len(cohort.series)} series complete, {len(on_disk1)}/{cohort.instances} instances on disk "
        f"({sent1} sent, {moves1} C-MOVEs); second sync: exit {code2}, {moves2} C-MOVEs, {len(sent2)} instances sent ({resent} of them twice)"
    )
