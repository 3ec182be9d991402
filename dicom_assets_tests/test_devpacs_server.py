"""The development PACS over real DICOM networking on 127.0.0.1, with pynetdicom as the client."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pydicom
import pynetdicom.association
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, evt
from pynetdicom.association import Association
from pynetdicom.dsutils import split_dataset
from pynetdicom.presentation import build_role
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    PatientRootQueryRetrieveInformationModelFind as PATIENT_FIND,
    PatientRootQueryRetrieveInformationModelMove as PATIENT_MOVE,
    StudyRootQueryRetrieveInformationModelFind as STUDY_FIND,
    StudyRootQueryRetrieveInformationModelGet as STUDY_GET,
    StudyRootQueryRetrieveInformationModelMove as STUDY_MOVE,
    Verification,
)

from dicom_assets.config import PacsSettings
from dicom_assets.devpacs import CohortSpec, CohortSummary, DevPacs, GeneratedSeries, add_series, generate_cohort
from dicom_assets.devpacs import server as devpacs_server
from dicom_assets.pacs.client import PacsClient
from dicom_assets.pacs.receiver import StorageReceiver
from dicom_assets_tests.conftest import free_port

HOST = "127.0.0.1"
LONG_ID = "a long id/" + "x" * 54
HOSTILE_IDS = ("a b/c", "..", "*", "José/Ñ", LONG_ID)
PATIENT_IDS = ("DEMO0001", "DEMO0002", *HOSTILE_IDS)
SPEC = CohortSpec(patient_ids=PATIENT_IDS, studies_per_patient=2, series_per_study=2, slices_per_series=3, rows=32, columns=32)
QUERY_MODELS = [PATIENT_FIND, STUDY_FIND, PATIENT_MOVE, STUDY_MOVE, Verification]


@dataclass
class Served:
    """A running DevPacs, the folder it serves and what was generated into it."""

    pacs: DevPacs
    root: Path
    summary: CohortSummary

    def path_of(self, sop_uid: str) -> Path:
        return next(self.root.rglob(f"{sop_uid}.dcm"))

    def series_of(self, patient_id: str) -> list[GeneratedSeries]:
        return [s for s in self.summary.series if s.patient_id == patient_id]


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """One PACS for the read-only tests (nothing here adds files or counts requests)."""
    root = tmp_path_factory.mktemp("pacs")
    summary = generate_cohort(root, SPEC)
    with DevPacs(root, ae_title="DEVPACS") as pacs:
        yield Served(pacs, root, summary)


# --------------------------------------------------------------------------------------------
# A pynetdicom client and a storage SCP for C-MOVE.


@contextmanager
def associate(port: int, contexts: list = QUERY_MODELS, **kwargs) -> Iterator[Association]:  # type: ignore[type-arg]
    ae = AE(ae_title="TESTSCU")
    for context in contexts:
        if isinstance(context, tuple):
            ae.add_requested_context(*context)
        else:
            ae.add_requested_context(context)
    assoc = ae.associate(HOST, port, ae_title="DEVPACS", **kwargs)
    assert assoc.is_established
    try:
        yield assoc
    finally:
        assoc.release()


def find(port: int, model: str, level: str, **keys: object) -> tuple[list[Dataset], int]:
    """C-FIND ``keys`` at ``level``; returns the matches and the final status."""
    query = Dataset()
    if any(isinstance(v, str) and not v.isascii() for v in keys.values()):
        query.SpecificCharacterSet = "ISO_IR 192"
    query.QueryRetrieveLevel = level
    for keyword, value in keys.items():
        setattr(query, keyword, value)
    matches, final = [], -1
    with associate(port) as assoc:
        for status, identifier in assoc.send_c_find(query, model):
            if status.Status in (0xFF00, 0xFF01):
                matches.append(identifier)
            else:
                final = status.Status
    return matches, final


@dataclass
class Receiver:
    """A storage SCP on a loopback port: keeps the dataset bytes exactly as they arrived."""

    port: int
    ae_title: str = "RECEIVER"
    received: dict[str, bytes] = field(default_factory=dict)
    refuse: set[str] = field(default_factory=set)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def on_store(self, event: evt.Event) -> int:
        sop_uid = event.request.AffectedSOPInstanceUID
        if sop_uid in self.refuse:
            return 0xA700
        with self.lock:
            self.received[sop_uid] = event.encoded_dataset(include_meta=False)
        return 0x0000


@pytest.fixture
def receiver(port: int, served: Served) -> Iterator[Receiver]:
    rcv = Receiver(port)
    ae = AE(ae_title=rcv.ae_title)
    for cx in AllStoragePresentationContexts:
        ae.add_supported_context(cx.abstract_syntax, ALL_TRANSFER_SYNTAXES)
    ae.start_server((HOST, port), block=False, evt_handlers=[(evt.EVT_C_STORE, rcv.on_store)])
    served.pacs.add_move_destination(rcv.ae_title, HOST, port)
    try:
        yield rcv
    finally:
        ae.shutdown()


@pytest.fixture
def no_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make any full read of a DICOM file fail, so "sent as stored" is really what happened."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("a file was decoded instead of being sent as stored")

    real = devpacs_server.dcmread
    monkeypatch.setattr(pynetdicom.association, "dcmread", refuse)
    monkeypatch.setattr(
        devpacs_server, "dcmread", lambda path, **kw: real(path, **kw) if kw.get("stop_before_pixels") else refuse()
    )


def stored_bytes(path: Path) -> bytes:
    """A file's dataset bytes after its file meta: what must arrive unchanged."""
    _, offset = split_dataset(path)
    return path.read_bytes()[offset:]


def move(port: int, model: str, destination: str, level: str, **keys: object) -> list[Dataset]:
    query = Dataset()
    query.QueryRetrieveLevel = level
    for keyword, value in keys.items():
        setattr(query, keyword, value)
    with associate(port) as assoc:
        return [status for status, _ in assoc.send_c_move(query, destination, model)]


# --------------------------------------------------------------------------------------------
# C-ECHO and C-FIND.


def test_echo_and_bound_port(tmp_path: Path, port: int) -> None:
    with DevPacs(tmp_path, port=port) as pacs:
        assert pacs.port == port
        with associate(port) as assoc:
            assert assoc.send_c_echo().Status == 0x0000
    with pytest.raises(Exception), associate(port):
        pass  # stopped: nothing listens any more


def test_patient_level_returns_every_patient_with_counts(served: Served) -> None:
    found, final = find(
        served.pacs.port, PATIENT_FIND, "PATIENT", PatientID="", PatientName="", PatientSex="",
        NumberOfPatientRelatedStudies="", NumberOfPatientRelatedSeries="", NumberOfPatientRelatedInstances="",
    )  # fmt: skip
    assert final == 0x0000
    assert sorted(ds.PatientID for ds in found) == sorted(PATIENT_IDS)
    for ds in found:
        assert ds.QueryRetrieveLevel == "PATIENT"
        assert str(ds.PatientName) and ds.PatientSex in ("M", "F")
        assert (ds.NumberOfPatientRelatedStudies, ds.NumberOfPatientRelatedSeries) == (2, 4)
        assert ds.NumberOfPatientRelatedInstances == 12


@pytest.mark.parametrize("patient_id", HOSTILE_IDS)
def test_hostile_patient_ids_round_trip(served: Served, patient_id: str) -> None:
    found, final = find(served.pacs.port, PATIENT_FIND, "STUDY", PatientID=patient_id, StudyInstanceUID="")
    assert final == 0x0000
    if patient_id == "*":  # "*" is the universal match in DICOM: every study, including this patient's
        assert len(found) == served.summary.studies and patient_id in {ds.PatientID for ds in found}
        return
    assert {ds.PatientID for ds in found} == {patient_id}
    assert {ds.StudyInstanceUID for ds in found} == {s.study_instance_uid for s in served.series_of(patient_id)}
    if not patient_id.isascii():
        assert all(ds.SpecificCharacterSet == "ISO_IR 192" for ds in found)


def test_study_root_study_level_with_computed_attributes(served: Served) -> None:
    found, final = find(
        served.pacs.port, STUDY_FIND, "STUDY", StudyInstanceUID="", StudyDate="", AccessionNumber="",
        ModalitiesInStudy="", NumberOfStudyRelatedSeries="", NumberOfStudyRelatedInstances="", PatientName="",
    )  # fmt: skip
    assert final == 0x0000
    assert len(found) == served.summary.studies == 14
    assert {ds.StudyInstanceUID for ds in found} == {s.study_instance_uid for s in served.summary.series}
    for ds in found:
        assert ds.ModalitiesInStudy == "CT" and ds.PatientID in PATIENT_IDS  # unique keys always come back
        assert (ds.NumberOfStudyRelatedSeries, ds.NumberOfStudyRelatedInstances) == (2, 6)
        assert len(ds.StudyDate) == 8 and ds.AccessionNumber.startswith("ACC") and str(ds.PatientName)


def test_series_level_narrowed_by_study(served: Served) -> None:
    series = served.summary.series[0]
    found, _ = find(
        served.pacs.port, STUDY_FIND, "SERIES", StudyInstanceUID=series.study_instance_uid, SeriesInstanceUID="",
        SeriesNumber="", Modality="", SeriesDescription="", NumberOfSeriesRelatedInstances="",
    )  # fmt: skip
    expected = {s.series_instance_uid: s for s in served.summary.series if s.study_instance_uid == series.study_instance_uid}
    assert {ds.SeriesInstanceUID for ds in found} == set(expected)
    for ds in found:
        assert ds.StudyInstanceUID == series.study_instance_uid and ds.QueryRetrieveLevel == "SERIES"
        assert ds.Modality == "CT" and ds.SeriesNumber == expected[ds.SeriesInstanceUID].series_number
        assert ds.NumberOfSeriesRelatedInstances == 3


@pytest.mark.parametrize("model", [PATIENT_FIND, STUDY_FIND])
def test_image_level_in_both_models(served: Served, model: str) -> None:
    series = served.summary.series[-1]
    keys: dict[str, object] = dict(SeriesInstanceUID=series.series_instance_uid, SOPInstanceUID="", InstanceNumber="")
    if model == PATIENT_FIND:
        keys |= dict(PatientID=series.patient_id, StudyInstanceUID=series.study_instance_uid)
    found, final = find(served.pacs.port, model, "IMAGE", **keys)
    assert final == 0x0000
    assert [ds.SOPInstanceUID for ds in found] == list(series.sop_instance_uids)  # in InstanceNumber order
    assert [ds.InstanceNumber for ds in found] == [1, 2, 3]
    assert all(ds.SeriesInstanceUID == series.series_instance_uid and ds.PatientID == series.patient_id for ds in found)


def test_uid_list_matching(served: Served) -> None:
    wanted = [served.summary.series[1].series_instance_uid, served.summary.series[6].series_instance_uid]
    found, _ = find(served.pacs.port, STUDY_FIND, "SERIES", SeriesInstanceUID=wanted)
    assert sorted(ds.SeriesInstanceUID for ds in found) == sorted(wanted)


def test_study_root_refuses_patient_level(served: Served) -> None:
    found, final = find(served.pacs.port, STUDY_FIND, "PATIENT", PatientID="")
    assert found == [] and final == 0xA900


def test_wildcards(served: Served) -> None:
    port = served.pacs.port
    found, _ = find(port, PATIENT_FIND, "PATIENT", PatientID="DEMO*")
    assert sorted(ds.PatientID for ds in found) == ["DEMO0001", "DEMO0002"]
    found, _ = find(port, PATIENT_FIND, "PATIENT", PatientID="DEMO000?")
    assert len(found) == 2
    found, _ = find(port, PATIENT_FIND, "PATIENT", PatientID="a?b/*")
    assert [ds.PatientID for ds in found] == ["a b/c"]
    found, _ = find(port, PATIENT_FIND, "PATIENT", PatientID="Jos*")
    assert [ds.PatientID for ds in found] == ["José/Ñ"]
    found, _ = find(port, STUDY_FIND, "SERIES", SeriesDescription="Axial 1*")
    assert len(found) == len(PATIENT_IDS) * 2  # the second series of every study
    found, _ = find(port, STUDY_FIND, "SERIES", SeriesDescription="Axial 5.0 mm")
    assert len(found) == len(PATIENT_IDS) * 2


def test_date_ranges(served: Served) -> None:
    port = served.pacs.port
    everything, _ = find(port, STUDY_FIND, "STUDY", StudyDate="")
    dates = sorted(ds.StudyDate for ds in everything)
    middle = dates[len(dates) // 2]
    assert dates[0] < middle < dates[-1]
    for query, expected in [
        (f"{dates[0]}-{dates[-1]}", dates),
        (f"{middle}-", [d for d in dates if d >= middle]),
        (f"-{middle}", [d for d in dates if d <= middle]),
        (f"{middle}-{middle}", [middle] * dates.count(middle)),
        (middle, [middle] * dates.count(middle)),
        ("20000101-20181231", []),
    ]:
        found, _ = find(port, STUDY_FIND, "STUDY", StudyDate=query)
        assert sorted(ds.StudyDate for ds in found) == expected, query


def test_result_cap(served: Served) -> None:
    with DevPacs(served.root, max_find_results=3) as capped:
        found, final = find(capped.port, PATIENT_FIND, "PATIENT", PatientID="")
        assert len(found) == 3 and final == 0x0000
        found, _ = find(capped.port, STUDY_FIND, "IMAGE", SOPInstanceUID="")
        assert len(found) == 3


# --------------------------------------------------------------------------------------------
# C-MOVE and C-GET.


def test_move_series_sends_files_as_stored(served: Served, receiver: Receiver, no_decoding: None) -> None:
    series = served.series_of("José/Ñ")[1]
    statuses = move(
        served.pacs.port, STUDY_MOVE, receiver.ae_title, "SERIES",
        StudyInstanceUID=series.study_instance_uid, SeriesInstanceUID=series.series_instance_uid,
    )  # fmt: skip
    pending, final = statuses[:-1], statuses[-1]
    assert [s.Status for s in pending] == [0xFF00] * 3
    assert [s.NumberOfRemainingSuboperations for s in pending] == [2, 1, 0]
    assert [s.NumberOfCompletedSuboperations for s in pending] == [1, 2, 3]
    assert final.Status == 0x0000 and final.NumberOfCompletedSuboperations == 3
    assert final.NumberOfFailedSuboperations == 0 and final.NumberOfWarningSuboperations == 0
    assert set(receiver.received) == set(series.sop_instance_uids)
    for sop_uid, data in receiver.received.items():
        assert data == stored_bytes(served.path_of(sop_uid))


def test_move_image_level_uid_list(served: Served, receiver: Receiver, no_decoding: None) -> None:
    series = served.series_of("a b/c")[0]
    wanted = [series.sop_instance_uids[0], series.sop_instance_uids[2]]
    statuses = move(
        served.pacs.port, PATIENT_MOVE, receiver.ae_title, "IMAGE", PatientID="a b/c",
        StudyInstanceUID=series.study_instance_uid, SeriesInstanceUID=series.series_instance_uid, SOPInstanceUID=wanted,
    )  # fmt: skip
    assert statuses[-1].Status == 0x0000 and statuses[-1].NumberOfCompletedSuboperations == 2
    assert sorted(receiver.received) == sorted(wanted)
    assert all(receiver.received[uid] == stored_bytes(served.path_of(uid)) for uid in wanted)


def test_move_patient_level(served: Served, receiver: Receiver) -> None:
    statuses = move(served.pacs.port, PATIENT_MOVE, receiver.ae_title, "PATIENT", PatientID="..")
    expected = {uid for s in served.series_of("..") for uid in s.sop_instance_uids}
    assert statuses[-1].Status == 0x0000 and statuses[-1].NumberOfCompletedSuboperations == 12
    assert set(receiver.received) == expected


def test_move_with_failed_sub_operations_is_a_warning(served: Served, receiver: Receiver) -> None:
    series = served.series_of("DEMO0001")[0]
    receiver.refuse.add(series.sop_instance_uids[1])
    statuses = move(served.pacs.port, STUDY_MOVE, receiver.ae_title, "SERIES", SeriesInstanceUID=series.series_instance_uid)
    final = statuses[-1]
    assert final.Status == 0xB000
    assert (final.NumberOfCompletedSuboperations, final.NumberOfFailedSuboperations) == (2, 1)
    assert len(receiver.received) == 2


def test_move_to_unknown_destination(served: Served) -> None:
    series = served.summary.series[0]
    statuses = move(served.pacs.port, STUDY_MOVE, "NOBODY", "SERIES", SeriesInstanceUID=series.series_instance_uid)
    assert [s.Status for s in statuses] == [0xA801]


def test_retrieve_with_a_bad_identifier_fails_cleanly(served: Served, receiver: Receiver) -> None:
    statuses = move(served.pacs.port, STUDY_MOVE, receiver.ae_title, "PATIENT", PatientID="DEMO0001")
    assert statuses[-1].Status == 0xA900 and receiver.received == {}
    query = Dataset()
    query.QueryRetrieveLevel = "VOLUME"
    with associate(served.pacs.port, [STUDY_GET]) as assoc:
        assert [s.Status for s, _ in assoc.send_c_get(query, STUDY_GET)][-1] == 0xA900


def _get(port: int, series: GeneratedSeries, syntaxes: list[str]) -> tuple[dict[str, bytes], Dataset]:
    received: dict[str, bytes] = {}

    def on_store(event: evt.Event) -> int:
        received[event.request.AffectedSOPInstanceUID] = event.encoded_dataset(include_meta=False)
        return 0x0000

    query = Dataset()
    query.QueryRetrieveLevel = "SERIES"
    query.StudyInstanceUID = series.study_instance_uid
    query.SeriesInstanceUID = series.series_instance_uid
    contexts = [STUDY_GET, (CTImageStorage, syntaxes)]
    role = build_role(CTImageStorage, scp_role=True)
    with associate(port, contexts, ext_neg=[role], evt_handlers=[(evt.EVT_C_STORE, on_store)]) as assoc:
        statuses = [status for status, _ in assoc.send_c_get(query, STUDY_GET)]
    return received, statuses[-1]


def test_get_series_as_stored(served: Served, no_decoding: None) -> None:
    series = served.series_of("*")[0]
    received, final = _get(served.pacs.port, series, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    assert final.Status == 0x0000 and final.NumberOfCompletedSuboperations == 3
    assert set(received) == set(series.sop_instance_uids)
    assert all(data == stored_bytes(served.path_of(uid)) for uid, data in received.items())


def test_get_converts_when_the_stored_syntax_is_refused(served: Served) -> None:
    series = served.series_of("DEMO0002")[1]
    received, final = _get(served.pacs.port, series, [ImplicitVRLittleEndian])
    assert final.Status == 0x0000 and set(received) == set(series.sop_instance_uids)
    for uid, data in received.items():
        original = pydicom.dcmread(served.path_of(uid))
        converted = pydicom.dcmread(pydicom.filebase.DicomBytesIO(data), force=True)
        assert converted.SOPInstanceUID == uid
        assert converted.PixelData == original.PixelData


# --------------------------------------------------------------------------------------------
# C-MOVE sub-operations and pynetdicom's reactor thread.


class _CheckpointPassedTooEarly(threading.Event):
    """A reactor checkpoint as ``send_c_store`` finds it when the reactor has just gone past it.

    ``send_c_store`` pauses the sub-association's reactor with ``_reactor_checkpoint.clear()``,
    then goes ahead once ``_is_paused`` reads True. The reactor sets ``_is_paused`` True, passes
    ``wait()`` and only then sets it False and polls the DIMSE queue: a pause that comes in
    between is late for that loop. Here it is late on every loop (``clear`` does nothing), and
    the reactor is scheduled out for a moment after passing the checkpoint.
    """

    def clear(self) -> None:
        pass

    def wait(self, timeout: float | None = None) -> bool:
        time.sleep(0.002)
        return True


def test_move_sub_operation_response_is_not_taken_by_the_reactor(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A C-STORE-RSP taken by the sub-association's reactor left the C-MOVE waiting for
    pynetdicom's DIMSE timeout (30 s) with nothing sent, so our requestor waited
    ``pacs.timeout_s`` and gave up. Forced here: the reactor polls while its pause is late and
    the sender waits for the response a moment after sending the C-STORE. (Our own requestor
    and storage SCP: what is measured is the wait a retrieval sees.)"""
    summary = generate_cohort(tmp_path / "pacs", CohortSpec(patients=1, series_per_study=1, slices_per_series=5, rows=32, columns=32))
    target = summary.series[0]
    polls_with_a_response_waiting = 0
    associate_as_before = devpacs_server._DevPacsAE.associate

    def associate_with_a_late_pause(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        assoc = associate_as_before(self, *args, **kwargs)
        assoc._reactor_checkpoint = _CheckpointPassedTooEarly()
        get_msg = assoc.dimse.get_msg

        def late_sender_and_eager_reactor(block: bool = False):  # type: ignore[no-untyped-def]
            nonlocal polls_with_a_response_waiting
            if block:  # send_c_store, scheduled out between sending the C-STORE and waiting
                time.sleep(0.2)
            elif assoc.dimse.msg_queue.qsize():  # the reactor, with the response in the queue
                polls_with_a_response_waiting += 1
            return get_msg(block)

        assoc.dimse.get_msg = late_sender_and_eager_reactor
        return assoc

    monkeypatch.setattr(devpacs_server._DevPacsAE, "associate", associate_with_a_late_pause)
    timeout_s = 20.0
    receiver_port = free_port()
    with (
        StorageReceiver("DICOM_ASSETS", HOST, receiver_port, tmp_path / "downloads", ["DEVPACS"]) as receiver,
        DevPacs(tmp_path / "pacs", move_destinations={"DICOM_ASSETS": (HOST, receiver_port)}) as pacs,
    ):
        settings = PacsSettings(host=HOST, port=pacs.port, called_ae_title="DEVPACS", calling_ae_title="DICOM_ASSETS",
                                timeout_s=timeout_s, max_attempts=1)  # fmt: skip
        flight = receiver.sink.expect(target.patient_id, target.study_instance_uid, target.series_instance_uid)
        started = time.monotonic()
        with PacsClient(settings).session() as session:
            final = session.move(
                target.study_instance_uid, target.series_instance_uid, "DICOM_ASSETS",
                patience=flight.patience(timeout_s),
            )  # fmt: skip
        took = time.monotonic() - started
    assert polls_with_a_response_waiting >= 1, "the reactor never polled with a response waiting: nothing was forced"
    assert took < timeout_s / 2, f"the C-MOVE took {took:.1f} s ({final.describe()}): the PACS sat out a DIMSE timeout"
    assert (final.status, final.completed, final.failed) == (0x0000, 5, 0)
    assert flight.received == 5


# --------------------------------------------------------------------------------------------
# The live index and request counting.


def test_files_added_while_running_are_found_and_only_new_files_parsed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    generate_cohort(tmp_path, CohortSpec(patients=1, series_per_study=1, slices_per_series=2, rows=32, columns=32))
    parsed: list[Path] = []
    original = devpacs_server._parse_instance

    def counting(path: Path):  # type: ignore[no-untyped-def]
        parsed.append(path)
        return original(path)

    monkeypatch.setattr(devpacs_server, "_parse_instance", counting)
    with DevPacs(tmp_path) as pacs:
        before, _ = find(pacs.port, STUDY_FIND, "SERIES", PatientID="DEMO0001", NumberOfStudyRelatedInstances="")
        assert len(before) == 1 and before[0].NumberOfStudyRelatedInstances == 2
        assert len(parsed) == 2
        added = add_series(tmp_path, "DEMO0001", slices=3, rows=32, columns=32)
        (tmp_path / "notes.txt").write_text("not DICOM")  # ignored, and not reparsed every scan
        time.sleep(0.6)  # the rescan interval
        after, _ = find(pacs.port, STUDY_FIND, "SERIES", PatientID="DEMO0001", NumberOfStudyRelatedInstances="")
        assert {ds.SeriesInstanceUID for ds in after} == {before[0].SeriesInstanceUID, added.series_instance_uid}
        assert {ds.NumberOfStudyRelatedInstances for ds in after} == {5}
        assert len(parsed) == 2 + 3 + 1
        time.sleep(0.6)
        assert pacs.rescan() == 5 and len(parsed) == 6


def test_requests_served_counts_associations_and_requests(served: Served, receiver: Receiver) -> None:
    with DevPacs(served.root, move_destinations={receiver.ae_title: (HOST, receiver.port)}) as pacs:
        assert pacs.requests_served == 0
        with associate(pacs.port) as assoc:
            assoc.send_c_echo()
            query = Dataset()
            query.QueryRetrieveLevel = "PATIENT"
            query.PatientID = "DEMO0001"
            list(assoc.send_c_find(query, PATIENT_FIND))
            list(assoc.send_c_find(query, PATIENT_FIND))
            list(assoc.send_c_move(query, receiver.ae_title, PATIENT_MOVE))
        assert pacs.requests_served == 5
        assert pacs.requests_by_kind() == {"ASSOCIATION": 1, "C-ECHO": 1, "C-FIND": 2, "C-MOVE": 1}
        assert len(receiver.received) == 12, "outgoing sub-operation associations are not counted"


def test_serve_forever_stops_on_sigterm(tmp_path: Path, port: int) -> None:
    code = (
        "import sys; from pathlib import Path; from dicom_assets.devpacs import serve_forever; "
        f"serve_forever(Path(sys.argv[1]), {port})"
    )
    proc = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], env={**os.environ, "PYTHONWARNINGS": "ignore"})
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                with associate(port, [Verification]) as assoc:
                    assert assoc.send_c_echo().Status == 0x0000
                break
            except AssertionError:
                assert proc.poll() is None and time.monotonic() < deadline, "server did not come up"
                time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
