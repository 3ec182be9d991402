"""Real-PACS faults: outages, overload statuses, Warning finals, asynchronous C-MOVE, pending
responses without counts, C-FIND caps, blackout windows and an unusable download directory.

Faults come from real DICOM peers on loopback: the bundled PACS (stopped and restarted on its
port) or :class:`FaultyPacs`, a small pynetdicom Q/R SCP answering the statuses a test chooses.
Every timeout and backoff is tiny so the whole file runs in seconds.
"""

from __future__ import annotations

import threading
import time
from datetime import datetime, timedelta
from datetime import time as dtime
from pathlib import Path
from typing import Any, Iterator

import pydicom
import pytest
from pydicom.dataset import Dataset
from pynetdicom import AE, AllStoragePresentationContexts, evt
from pynetdicom.dimse_primitives import C_MOVE
from pynetdicom.sop_class import (
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelMove,
    Verification,
)

from dicom_assets.devpacs import DevPacs
from dicom_assets.discovery import discover_series
from dicom_assets.layout import instances_on_disk, series_dir
from dicom_assets.pacs.client import PacsClient, PacsUnreachable, RequestGate
from dicom_assets.retrieval import retrieve_patients
from dicom_assets.store import PatientRecord, SeriesRecord, StateStore, StudyRecord
from dicom_assets_tests.conftest import free_port
from dicom_assets_tests.pacs_fixtures import make_settings, small_cohort

FAST = {"timeout_s": 2, "straggler_timeout_s": 0.5, "retry_initial_s": 0.05, "retry_max_s": 0.2, "wait_for_pacs_s": 5}


class FaultyPacs:
    """A Q/R SCP that serves one cohort's files and misbehaves as ``move_mode`` says."""

    def __init__(self, root: Path, receiver_port: int, ae_title: str = "FAULTY") -> None:
        self.files = [pydicom.dcmread(p) for p in sorted(root.rglob("*.dcm"))]
        self.receiver_port = receiver_port
        self.ae_title = ae_title
        self.move_mode = "normal"
        self.series_without_count = False
        self.image_level_status: int | None = None
        self.moves: list[float] = []
        self._server: Any = None

    def start(self) -> "FaultyPacs":
        ae = AE(ae_title=self.ae_title)
        ae.add_supported_context(Verification)
        ae.add_supported_context(StudyRootQueryRetrieveInformationModelFind)
        ae.add_supported_context(StudyRootQueryRetrieveInformationModelMove)
        ae.requested_contexts = AllStoragePresentationContexts[:100]
        handlers = [(evt.EVT_C_MOVE, self._on_move), (evt.EVT_C_FIND, self._on_find)]
        self._ae = ae
        self._server = ae.start_server(("127.0.0.1", 0), block=False, evt_handlers=handlers)
        self.port = self._server.server_address[1]
        return self

    def stop(self) -> None:
        self._ae.shutdown()

    def __enter__(self) -> "FaultyPacs":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def series_files(self, series_uid: str) -> list[Dataset]:
        return [ds for ds in self.files if ds.SeriesInstanceUID == series_uid]

    def _on_find(self, event: Any) -> Iterator[tuple[int, Dataset | None]]:
        ident = event.identifier
        if ident.QueryRetrieveLevel == "IMAGE" and self.image_level_status is not None:
            yield self.image_level_status, None
            return
        if ident.QueryRetrieveLevel == "SERIES":
            seen: dict[str, Dataset] = {}
            for ds in self.files:
                if ds.StudyInstanceUID == ident.StudyInstanceUID and ds.SeriesInstanceUID not in seen:
                    rsp = Dataset()
                    rsp.QueryRetrieveLevel = "SERIES"
                    rsp.StudyInstanceUID, rsp.SeriesInstanceUID = ds.StudyInstanceUID, ds.SeriesInstanceUID
                    rsp.Modality, rsp.SeriesNumber = ds.Modality, ds.SeriesNumber
                    if not self.series_without_count:
                        rsp.NumberOfSeriesRelatedInstances = len(self.series_files(ds.SeriesInstanceUID))
                    seen[ds.SeriesInstanceUID] = rsp
            for rsp in seen.values():
                yield 0xFF00, rsp
        yield 0x0000, None

    def _pending_without_counts(self, event: Any) -> None:
        """Send a Pending C-MOVE response with no sub-operation counts (some PACS do)."""
        rsp = C_MOVE()
        rsp.MessageIDBeingRespondedTo = event.request.MessageID
        rsp.AffectedSOPClassUID = event.request.AffectedSOPClassUID
        rsp.Status = 0xFF00
        event.assoc.dimse.send_msg(rsp, event.context.context_id)

    def _store_later(self, datasets: list[Dataset], delay: float) -> None:
        """C-STOREs on another association after the C-MOVE final (an asynchronous PACS)."""

        def run() -> None:
            time.sleep(delay)
            ae = AE(ae_title=self.ae_title)
            ae.requested_contexts = AllStoragePresentationContexts[:100]
            assoc = ae.associate("127.0.0.1", self.receiver_port, ae_title="DICOM_ASSETS")
            for ds in datasets:
                assoc.send_c_store(ds)
            assoc.release()

        threading.Thread(target=run, daemon=True).start()

    def _on_move(self, event: Any) -> Iterator[Any]:
        self.moves.append(time.monotonic())
        files = self.series_files(str(event.identifier.SeriesInstanceUID))
        mode = self.move_mode
        if mode == "async":
            self._pending_without_counts(event)
            self._store_later(files, delay=0.3)
            self._pending_without_counts(event)
        yield "127.0.0.1", self.receiver_port
        if mode == "a702":
            yield 1
            yield 0xA702, None
        elif mode == "c000_cannot_send":  # tried, could not send (Orthanc: "Cannot transcode ...")
            yield len(files)
            yield 0xC000, None
        elif mode == "async":
            yield 0
            yield 0x0000, None  # success before any C-STORE arrived
        elif mode == "b000_all":  # every instance sent, but the final is a Warning
            yield len(files) + 1
            for ds in files:
                yield 0xFF00, ds
            yield 0xB000, None
        elif mode == "b000_missing":  # the last instance never sent; Warning final
            yield len(files)
            for ds in files[:-1]:
                yield 0xFF00, ds
            yield 0xB000, None
        else:
            yield len(files)
            for ds in files:
                yield 0xFF00, ds


@pytest.fixture
def faulty(tmp_path: Path, sqlite_url: str):
    """A FaultyPacs serving a 1-patient, 2-series cohort; its series are in the state DB."""
    cohort = small_cohort(tmp_path / "pacs", patient_ids=("P1",), series=2, slices=3)
    receiver_port = free_port()
    with FaultyPacs(tmp_path / "pacs", receiver_port) as pacs:
        settings = make_settings(tmp_path, pacs.port, receiver_port, sqlite_url, called_ae_title="FAULTY", **FAST)
        store = StateStore(sqlite_url)
        store.create_schema()
        store.upsert_patients([PatientRecord("P1")])
        store.upsert_studies([StudyRecord(cohort.series[0].study_instance_uid, "P1")])
        store.upsert_series(
            SeriesRecord(s.series_instance_uid, s.study_instance_uid, "P1", expected_instances=s.instances)
            for s in cohort.series
        )
        yield cohort, settings, store, pacs
        store.dispose()


def _dir(settings: Any, s: Any) -> Path:
    return series_dir(settings.paths.download_dir, s.patient_id, s.study_instance_uid, s.series_instance_uid)


def test_a702_is_retried_with_backoff_then_given_up_and_not_claimed_again(faulty) -> None:
    cohort, settings, store, pacs = faulty
    settings.pacs.max_attempts = 3
    settings.pacs.max_concurrent_associations = 1
    pacs.move_mode = "a702"
    target = cohort.series[0]
    stats = retrieve_patients(settings, PacsClient(settings.pacs), store, ["P1"])
    assert [o.status for o in stats.outcomes] == ["failed", "failed"]
    assert len(pacs.moves) == 6  # 3 attempts per series, never more
    gaps = [b - a for a, b in zip(pacs.moves, pacs.moves[1:])]
    assert min(gaps[0], gaps[1]) >= 0.05  # backoff between the attempts of one series
    state = store.get_series(target.series_instance_uid)
    assert state.download_status == "failed" and state.attempts == 3
    assert "gave up after 3 attempts" in state.last_error and "0xA702" in state.last_error
    again = retrieve_patients(settings, PacsClient(settings.pacs), store, ["P1"])
    assert again.outcomes == [] and len(pacs.moves) == 6  # no longer claimed automatically
    settings.pacs.max_attempts = 4  # the documented way to retry it: raise pacs.max_attempts
    pacs.move_mode = "normal"
    retry = retrieve_patients(settings, PacsClient(settings.pacs), store, ["P1"])
    assert [o.status for o in retry.outcomes] == ["complete", "complete"]
    assert store.get_series(target.series_instance_uid).last_error is None


def test_c000_with_failed_sub_operations_is_tried_once_per_run_not_five_times(faulty) -> None:
    """The PACS tried to send and could not (0xC000 with failed sub-operations): the same request
    at once would fail the same way, so it is an answer of the PACS, counted, left to the next run."""
    cohort, settings, store, pacs = faulty
    settings.pacs.max_attempts = 5
    pacs.move_mode = "c000_cannot_send"
    stats = retrieve_patients(settings, PacsClient(settings.pacs), store, ["P1"])
    assert [o.status for o in stats.outcomes] == ["incomplete", "incomplete"]
    assert len(pacs.moves) == 2  # one C-MOVE per series, not five
    state = store.get_series(cohort.series[0].series_instance_uid)
    assert state.attempts == 1 and "0xC000" in state.last_error


def test_async_move_success_before_the_stores_and_pending_without_counts(faulty) -> None:
    cohort, settings, store, pacs = faulty
    settings.pacs.straggler_timeout_s = 2
    pacs.move_mode = "async"
    stats = retrieve_patients(settings, PacsClient(settings.pacs), store, ["P1"])
    assert [o.status for o in stats.outcomes] == ["complete", "complete"]
    for s in cohort.series:
        assert sorted(instances_on_disk(_dir(settings, s))) == sorted(s.sop_instance_uids)
        assert store.get_series(s.series_instance_uid).attempts == 0  # complete: nothing counted


def test_warning_final_with_every_instance_on_disk_is_complete(faulty) -> None:
    cohort, settings, store, pacs = faulty
    pacs.move_mode = "b000_all"
    stats = retrieve_patients(settings, PacsClient(settings.pacs), store, ["P1"])
    assert [o.status for o in stats.outcomes] == ["complete", "complete"]


def test_warning_final_with_an_instance_missing_is_incomplete_with_reason(faulty) -> None:
    cohort, settings, store, pacs = faulty
    pacs.move_mode = "b000_missing"
    stats = retrieve_patients(settings, PacsClient(settings.pacs), store, ["P1"])
    assert [o.status for o in stats.outcomes] == ["incomplete", "incomplete"]
    state = store.get_series(cohort.series[0].series_instance_uid)
    # The first attempt brought 2 (progress, not counted), the retry nothing new: counted once,
    # and a B000 is not retried again in this run.
    assert state.download_status == "incomplete" and state.attempts == 1
    assert "0xB000" in state.last_error and "only 2 of 3 instances" in state.last_error


def test_missing_counts_and_refused_image_level_mean_unknown_not_a_crash(faulty, tmp_path: Path) -> None:
    cohort, settings, store, pacs = faulty
    pacs.series_without_count = True
    pacs.image_level_status = 0xA900  # this PACS answers no IMAGE-level query
    client = PacsClient(settings.pacs)
    discover_series(client, store, ["P1"])
    # discovery never overwrites a known count with NULL: simulate a fresh DB's view
    with store.engine.begin() as conn:
        conn.exec_driver_sql("UPDATE series SET expected_instances = NULL")
    stats = retrieve_patients(settings, client, store, ["P1"])
    assert [o.status for o in stats.outcomes] == ["complete", "complete"]  # clean Success, count unknown
    state = store.get_series(cohort.series[0].series_instance_uid)
    assert state.expected_instances is None and state.downloaded_instances == 3


def test_pacs_restarting_mid_run_is_waited_for_without_burning_attempts(tmp_path: Path, sqlite_url: str) -> None:
    small_cohort(tmp_path / "pacs", patient_ids=("P1",), series=2, slices=3)
    receiver_port = free_port()
    destinations = {"DICOM_ASSETS": ("127.0.0.1", receiver_port)}
    pacs = DevPacs(tmp_path / "pacs", move_destinations=destinations).start()
    port = pacs.port
    settings = make_settings(tmp_path, port, receiver_port, sqlite_url, **FAST)
    store = StateStore(sqlite_url)
    store.create_schema()
    client = PacsClient(settings.pacs)
    from dicom_assets.discovery import discover_patients, discover_studies

    discover_patients(client, store, lambda ds: True)
    discover_studies(client, store, ["P1"])
    discover_series(client, store, ["P1"])
    pacs.stop()
    restarted: list[DevPacs] = []
    timer = threading.Timer(1.0, lambda: restarted.append(DevPacs(tmp_path / "pacs", port=port, move_destinations=destinations).start()))
    timer.start()
    try:
        started = time.monotonic()
        stats = retrieve_patients(settings, PacsClient(settings.pacs), store, ["P1"])
        assert time.monotonic() - started >= 0.9  # it waited for the PACS
    finally:
        timer.join()
        for p in restarted:
            p.stop()
        store.dispose()
    assert [o.status for o in stats.outcomes] == ["complete", "complete"]
    assert all(o.attempts == 0 for o in stats.outcomes)  # the outage cost no attempt


def test_pacs_that_never_comes_back_stops_the_run_after_wait_for_pacs_s(faulty) -> None:
    cohort, settings, store, pacs = faulty
    pacs.stop()
    settings.pacs.wait_for_pacs_s = 0.5
    started = time.monotonic()
    with pytest.raises(PacsUnreachable, match="pacs.wait_for_pacs_s"):
        retrieve_patients(settings, PacsClient(settings.pacs), store, ["P1"])
    assert time.monotonic() - started < 10
    assert all(s.attempts == 0 for s in store.series_of("P1"))


def test_series_directory_that_cannot_be_created_fails_naming_the_path(faulty) -> None:
    cohort, settings, store, pacs = faulty
    patient_dir = _dir(settings, cohort.series[0]).parent.parent
    patient_dir.parent.mkdir(parents=True, exist_ok=True)
    patient_dir.write_text("a file where the patient's directory must go")
    stats = retrieve_patients(settings, PacsClient(settings.pacs), store, ["P1"])
    assert [o.status for o in stats.outcomes] == ["failed", "failed"]
    assert pacs.moves == []  # nothing asked of the PACS for a series that cannot be stored
    state = store.get_series(cohort.series[0].series_instance_uid)
    assert state.download_status == "failed" and str(patient_dir) in state.last_error
    assert "the series directory" in state.last_error and "Not a directory" in state.last_error


def test_download_dir_that_is_a_file_stops_the_run_with_its_path(faulty) -> None:
    cohort, settings, store, pacs = faulty
    settings.paths.download_dir.parent.mkdir(parents=True, exist_ok=True)
    settings.paths.download_dir.write_text("not a directory")
    from dicom_assets.retrieval import DownloadDirError

    with pytest.raises(DownloadDirError, match=str(settings.paths.download_dir)):
        retrieve_patients(settings, PacsClient(settings.pacs), store, ["P1"])
    assert all(s.download_status == "pending" and s.attempts == 0 for s in store.series_of("P1"))


def test_find_cap_splits_study_queries_by_date_and_derives_patients(tmp_path: Path) -> None:
    from dicom_assets.devpacs import CohortSpec, generate_cohort

    spec = CohortSpec(patients=3, studies_per_patient=3, series_per_study=1, slices_per_series=1, rows=8, columns=8, seed=5)
    cohort = generate_cohort(tmp_path / "pacs", spec)
    with DevPacs(tmp_path / "pacs", max_find_results=2) as pacs:
        settings = make_settings(tmp_path, pacs.port, free_port(), "sqlite://", max_find_results=2)
        with PacsClient(settings.pacs).session() as session:
            patients = session.find_patients()
            assert sorted(str(p.PatientID) for p in patients) == sorted(cohort.patients)
            for pid in cohort.patients:
                studies = session.find_studies(pid)
                expected = {s.study_instance_uid for s in cohort.series if s.patient_id == pid}
                assert {str(s.StudyInstanceUID) for s in studies} == expected
                assert len(studies) == 3


def test_blackout_window_holds_requests_until_it_ends(tmp_path: Path) -> None:
    small_cohort(tmp_path / "pacs", patient_ids=("P1",), series=1, slices=1)
    now = datetime.now()
    window = f"{(now - timedelta(seconds=5)):%H:%M:%S}-{(now + timedelta(seconds=3)):%H:%M:%S}"
    with DevPacs(tmp_path / "pacs") as pacs:
        settings = make_settings(tmp_path, pacs.port, free_port(), "sqlite://", blackout=[window])
        started = time.monotonic()
        with PacsClient(settings.pacs).session() as session:
            session.echo()
        assert time.monotonic() - started >= 1.5
        assert pacs.requests_served == 2


def test_blackout_windows_cross_midnight() -> None:
    gate = RequestGate([(dtime(23, 50), dtime(0, 10)), (dtime(2, 50), dtime(3, 20))])
    at = lambda h, m: datetime(2024, 1, 1, h, m)  # noqa: E731
    assert gate.blackout_remaining(at(23, 55)) == 15 * 60
    assert gate.blackout_remaining(at(0, 5)) == 5 * 60
    assert gate.blackout_remaining(at(3, 0)) == 20 * 60
    assert gate.blackout_remaining(at(0, 10)) == 0 and gate.blackout_remaining(at(12, 0)) == 0


def test_gate_waits_for_the_window_with_an_injected_clock() -> None:
    clock = {"now": datetime(2024, 1, 1, 2, 58)}
    slept: list[float] = []

    def sleep(seconds: float) -> None:
        slept.append(seconds)
        clock["now"] += timedelta(seconds=seconds)

    gate = RequestGate([(dtime(2, 50), dtime(3, 20))], now=lambda: clock["now"], sleep=sleep)
    assert gate.wait() == pytest.approx(22 * 60)
    assert max(slept) <= 60  # re-evaluated at least every minute
    assert clock["now"].time() == dtime(3, 20)
