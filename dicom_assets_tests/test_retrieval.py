"""Retrieval with the state DB: completeness rules, resume, and both retrieve methods."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from dicom_assets.discovery import discover_patients, discover_series, discover_studies
from dicom_assets.layout import instances_on_disk, series_dir
from dicom_assets.pacs.client import PacsClient
from dicom_assets.retrieval import OutcomeWriter, retrieve_patients
from dicom_assets.store import StateStore
from dicom_assets_tests.conftest import free_port
from dicom_assets_tests.pacs_fixtures import make_settings, small_cohort


@pytest.fixture
def world(tmp_path: Path, db_url: str):
    """A served cohort, discovered into a fresh state DB (PostgreSQL and SQLite)."""
    from dicom_assets.devpacs import DevPacs

    cohort = small_cohort(tmp_path / "pacs")
    receiver_port = free_port()
    with DevPacs(tmp_path / "pacs", move_destinations={"DICOM_ASSETS": ("127.0.0.1", receiver_port)}) as pacs:
        settings = make_settings(tmp_path, pacs.port, receiver_port, db_url)
        store = StateStore(db_url)
        store.create_schema()
        client = PacsClient(settings.pacs)
        discover_patients(client, store, lambda ds: True)
        ids = list(cohort.patients)
        discover_studies(client, store, ids)
        discover_series(client, store, ids)
        yield cohort, settings, store, client, pacs
        store.dispose()


def _sql(store: StateStore, statement: str) -> None:
    """Put the state DB in a situation a test needs (as a crash or the PACS would)."""
    with store.engine.begin() as conn:
        conn.exec_driver_sql(statement)


def _dir(settings, s) -> Path:
    return series_dir(settings.paths.download_dir, s.patient_id, s.study_instance_uid, s.series_instance_uid)


@pytest.mark.parametrize("method", ["c-move", "c-get"])
def test_every_series_complete_with_every_instance(world, method: str) -> None:
    cohort, settings, store, client, _ = world
    settings.pacs.retrieve_method = method
    stats = retrieve_patients(settings, client, store, list(cohort.patients))
    assert stats.count("complete") == len(cohort.series)
    for s in cohort.series:
        assert sorted(instances_on_disk(_dir(settings, s))) == sorted(s.sop_instance_uids)
        state = store.get_series(s.series_instance_uid)
        assert state.download_status == "complete" and state.downloaded_instances == s.instances
        assert state.attempts == 0 and state.claimed_by is None  # complete: no attempt counted


def test_partial_series_fetches_only_the_missing_instances(world) -> None:
    cohort, settings, store, client, _ = world
    retrieve_patients(settings, client, store, list(cohort.patients))
    target = cohort.series[0]
    directory = _dir(settings, target)
    files = sorted(directory.glob("*.dcm"))
    kept = {f: os.stat(f).st_ino for f in files[2:]}
    for f in files[:2]:
        f.unlink()
    _sql(store, f"UPDATE series SET download_status = 'incomplete' WHERE series_instance_uid = '{target.series_instance_uid}'")
    stats = retrieve_patients(settings, client, store, [target.patient_id])
    assert [o.status for o in stats.outcomes] == ["complete"]
    assert len(instances_on_disk(directory)) == target.instances
    assert stats.bytes_received == sum(os.stat(f).st_size for f in files[:2])  # only the two missing came
    assert all(os.stat(f).st_ino == ino for f, ino in kept.items())  # existing files untouched


def test_complete_series_on_disk_are_not_fetched_again(world) -> None:
    cohort, settings, store, client, pacs = world
    retrieve_patients(settings, client, store, list(cohort.patients))
    before = pacs.requests_served
    stats = retrieve_patients(settings, client, store, list(cohort.patients))
    assert stats.outcomes == []  # nothing retrievable: all complete
    assert pacs.requests_served == before


def test_unknown_expected_count_falls_back_to_image_level(world) -> None:
    cohort, settings, store, client, _ = world
    target = cohort.series[1]
    # The PACS gave no NumberOfSeriesRelatedInstances for this series:
    _sql(store, f"UPDATE series SET expected_instances = NULL WHERE series_instance_uid = '{target.series_instance_uid}'")
    stats = retrieve_patients(settings, client, store, [target.patient_id])
    assert all(o.status == "complete" for o in stats.outcomes)
    assert store.get_series(target.series_instance_uid).expected_instances == target.instances


def test_more_expected_than_the_pacs_has_is_incomplete_not_complete(world) -> None:
    cohort, settings, store, client, _ = world
    target = cohort.series[0]
    _sql(store, f"UPDATE series SET expected_instances = 99 WHERE series_instance_uid = '{target.series_instance_uid}'")
    stats = retrieve_patients(settings, client, store, [target.patient_id])
    outcome = next(o for o in stats.outcomes if o.series_instance_uid == target.series_instance_uid)
    # The first attempt fetched the whole series and found it short of 99 (incomplete, but
    # progress: no attempt counted); the next one asked at IMAGE level, which lists them all.
    assert outcome.status == "complete" and outcome.new_instances == target.instances
    state = store.get_series(target.series_instance_uid)
    assert state.expected_instances == target.instances and state.attempts == 0


def test_pacs_down_waits_then_stops_without_burning_attempts(world, tmp_path: Path) -> None:
    from dicom_assets.pacs.client import PacsUnreachable

    cohort, settings, store, client, pacs = world
    pacs.stop()
    settings.pacs.timeout_s = 2
    settings.pacs.wait_for_pacs_s = 1.0
    settings.pacs.retry_initial_s = 0.2
    settings.pacs.retry_max_s = 0.4
    patient = cohort.series[0].patient_id
    with pytest.raises(PacsUnreachable, match="made no progress for 1 s"):
        retrieve_patients(settings, PacsClient(settings.pacs), store, [patient])
    for s in cohort.series:
        state = store.get_series(s.series_instance_uid)
        assert state.download_status == "pending" and state.attempts == 0  # nothing claimed


def test_claims_of_a_killed_process_are_released_at_once(world) -> None:
    import socket
    import subprocess

    from dicom_assets.retrieval import release_dead_claims

    cohort, settings, store, client, _ = world
    dead = subprocess.Popen(["true"])
    dead.wait()
    holder = f"{socket.gethostname()}:{dead.pid}:1"
    claimed = store.claim_next_series(list(cohort.patients), holder, lease_s=3600)
    alive = store.claim_next_series(list(cohort.patients), f"{socket.gethostname()}:{os.getpid()}:1", lease_s=3600)
    assert release_dead_claims(store) == 1
    assert store.get_series(claimed.series_instance_uid).download_status == "incomplete"
    assert store.get_series(alive.series_instance_uid).download_status == "in_progress"


def test_a_run_over_more_patients_than_a_claim_block_claims_every_series_once(store: StateStore) -> None:
    """A run of 1,250 patients claims in blocks of 500, in the run's order: every series once,
    then nothing; a series another run held when this one passed its block (and then gave
    back) is found again before the run says it is done."""
    from dicom_assets.retrieval import CLAIM_BLOCK, RunClaims
    from dicom_assets.store.records import PatientRecord, SeriesRecord, StudyRecord

    ids = [f"BLK{n:05d}" for n in range(1250)]
    store.upsert_patients([PatientRecord(p) for p in ids])
    store.upsert_studies([StudyRecord(f"1.2.9.{n}", p) for n, p in enumerate(ids)])
    store.upsert_series([SeriesRecord(f"1.2.9.{n}.1", f"1.2.9.{n}", p, expected_instances=1) for n, p in enumerate(ids)])
    held = store.claim_next_series([ids[-5]], "another-run", lease_s=600)  # in this run's first block
    assert held is not None
    claims = RunClaims(store, list(reversed(ids)), max_attempts=3)
    assert [len(b) for b in claims._blocks] == [CLAIM_BLOCK, CLAIM_BLOCK, 250]
    claimed = []
    for _ in range(1249):
        series = claims.next("w")
        assert series is not None
        claimed.append(series.patient_id)
        store.finish_series(series.series_instance_uid, "w", "complete", 1, 1)
    assert set(claimed[:499]) == set(ids[750:]) - {ids[-5]}  # the first block: the run's first 500 patients
    assert store.release_claim(held.series_instance_uid, "another-run", "stopped")  # the other run gives it back
    last = claims.next("w")  # the first block, looked at again
    assert last is not None and last.series_instance_uid == held.series_instance_uid
    store.finish_series(last.series_instance_uid, "w", "complete", 1, 1)
    assert claims.next("w") is None
    assert sorted(claimed + [last.patient_id]) == sorted(ids)


def test_the_outcome_writer_keeps_order_waits_for_every_write_and_raises_the_first_failure() -> None:
    """Complete series are recorded on the writer's thread: in order, all of them before the run
    returns, and a failed write (the state DB gone) ends the run instead of being lost."""
    written: list[int] = []
    writer = OutcomeWriter()
    for n in range(50):
        writer.submit(lambda n=n: written.append(n))
    writer.close()
    assert written == list(range(50))

    def state_db_gone() -> None:
        raise OSError("connection to the state DB lost")

    failing = OutcomeWriter()
    failing.submit(state_db_gone)
    failing.submit(lambda: written.append(99))
    with pytest.raises(RuntimeError, match="state DB lost"):
        failing.close()
    assert 99 not in written  # nothing after the failure: the run ends with it
    with pytest.raises(RuntimeError, match="recording a complete series"):
        failing.submit(lambda: None)  # a worker meets it at its next series
    quiet = OutcomeWriter()
    quiet.submit(state_db_gone)
    quiet.close(raise_failure=False)  # the run already ends with an error of its own
