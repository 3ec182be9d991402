"""Our side of the association to the PACS, against a PACS that sends no Pending responses.

Some PACS answer a C-MOVE only once, after the last instance. The "quiet PACS" here is a real
DICOM peer on loopback (built on the project's upper layer): it sends the series to our storage
SCP slowly, with no Pending response, so the whole C-MOVE takes longer than ``pacs.timeout_s``.
"""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pynetdicom.presentation import build_context

from dicom_assets.config import PacsSettings
from dicom_assets.pacs import upper_layer as ul
from dicom_assets.pacs.client import PacsClient, PacsUnavailable
from dicom_assets.pacs.contexts import MOVE_MODELS
from dicom_assets.pacs.receiver import StorageReceiver
from dicom_assets.pacs.requestor import CollectedDataset, RequestorAssociation
from dicom_assets_tests.conftest import free_port
from dicom_assets_tests.pacs_fixtures import CT, send_c_store, small_cohort

EXPLICIT_LE = "1.2.840.10008.1.2.1"
MOVE = str(MOVE_MODELS["study"])


class QuietPacs:
    """Answers one C-MOVE: sends ``bodies`` to the receiver every ``gap_s`` seconds (after
    ``first_after_s``), then the final Success; never a Pending response.

    A context manager, used inside the receiver's: leaving it stops the thread (its waits end
    at once, nothing more is sent) and joins it, so it never connects to a receiver that is
    gone or writes to a client that gave up. The tests where our side times out abort the
    association midway: once stopping, a connection error ends the thread quietly; before
    that it is an unhandled exception (the test run fails).
    """

    def __init__(self, receiver_port: int, bodies: list[tuple[str, bytes]], gap_s: float, first_after_s: float = 0.0) -> None:
        self.receiver_port, self.bodies, self.gap_s, self.first_after_s = receiver_port, bodies, gap_s, first_after_s
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.stopping = threading.Event()
        self.conn: socket.socket | None = None
        self.thread = threading.Thread(target=self._serve, name="quiet-pacs", daemon=True)
        self.thread.start()

    def __enter__(self) -> QuietPacs:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stopping.set()
        for sock in (self.listener, self.conn):  # unblock accept() and reads
            if sock is not None:
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
        self.thread.join(timeout=15)
        self.listener.close()
        assert not self.thread.is_alive(), "the quiet PACS thread did not stop"

    def _serve(self) -> None:
        try:
            conn, _ = self.listener.accept()
        except OSError:
            if self.stopping.is_set():
                return  # stopped before any client came
            raise
        self.conn = conn
        conn.settimeout(30)
        with conn:
            try:
                request, _raw = ul.read_association_request(conn)
                assoc = ul.accept(conn, request, [build_context(MOVE, [EXPLICIT_LE, "1.2.840.10008.1.2"])])
                for context_id, command, _identifier in assoc.messages(lambda cx, cmd: CollectedDataset()):
                    self._move(assoc, context_id, command)
            except OSError:  # ConnectionClosed included: our side aborted after its timeout
                if not self.stopping.is_set():
                    raise

    def _move(self, assoc: ul.Association, context_id: int, command: ul.Command) -> None:
        if self.stopping.wait(self.first_after_s):
            return
        store = RequestorAssociation.open(("127.0.0.1", self.receiver_port), "QUIET", "DICOM_ASSETS",
                                          [build_context(CT, [EXPLICIT_LE])], timeout_s=10)  # fmt: skip
        try:
            for sop_uid, body in self.bodies:
                send_c_store(store, sop_uid, body, 16384)
                for _cx, _response, _data in store._assoc.messages(lambda cx, cmd: CollectedDataset()):
                    break
                if self.stopping.wait(self.gap_s):
                    return
        finally:
            store.release()  # the receiver is still up: the tests stop this PACS first
        assoc.send_command(context_id, ul.encode_command({
            0x00000002: MOVE, 0x00000100: 0x8021, 0x00000120: command.message_id, 0x00000800: 0x0101,
            0x00000900: 0x0000, 0x00001021: len(self.bodies), 0x00001022: 0, 0x00001023: 0,
        }))  # fmt: skip


@pytest.fixture
def series(tmp_path: Path) -> tuple[Any, list[tuple[str, bytes]]]:
    cohort = small_cohort(tmp_path / "pacs", patient_ids=("P1",), series=1, slices=5)
    bodies = []
    for path in sorted((tmp_path / "pacs").rglob("*.dcm")):
        ds = pydicom.dcmread(path)
        buffer = DicomBytesIO()
        buffer.is_implicit_VR, buffer.is_little_endian = False, True
        write_dataset(buffer, ds)
        bodies.append((str(ds.SOPInstanceUID), buffer.getvalue()))
    return cohort.series[0], bodies


def _move(pacs: QuietPacs, receiver: StorageReceiver, target: Any, timeout_s: float) -> tuple[Any, Any]:
    settings = PacsSettings(host="127.0.0.1", port=pacs.port, called_ae_title="QUIET", calling_ae_title="DICOM_ASSETS",
                            timeout_s=timeout_s, max_attempts=1)  # fmt: skip
    flight = receiver.sink.expect("P1", target.study_instance_uid, target.series_instance_uid)
    with PacsClient(settings).session() as session:
        final = session.move(
            target.study_instance_uid, target.series_instance_uid, "DICOM_ASSETS",
            patience=flight.patience(timeout_s),
        )  # fmt: skip
    return final, flight


def test_a_move_without_pending_responses_outlasts_the_timeout_while_instances_arrive(tmp_path: Path, series) -> None:
    target, bodies = series
    with (
        StorageReceiver("DICOM_ASSETS", "127.0.0.1", free_port(), tmp_path / "downloads", ["QUIET"]) as receiver,
        QuietPacs(receiver.port, bodies, gap_s=0.35) as pacs,
    ):
        started = time.monotonic()
        final, flight = _move(pacs, receiver, target, timeout_s=0.5)
        took = time.monotonic() - started
    assert final.status == 0 and final.completed == len(bodies)
    assert flight.received == len(bodies)
    assert took > 2 * 0.5  # the C-MOVE really lasted longer than the timeout


def test_a_quiet_move_times_out_one_timeout_after_the_last_instance_not_two(tmp_path: Path, series) -> None:
    """One instance at once, then a PACS silent for long: the C-MOVE gives up timeout_s after that
    instance (about 2 s), not after a second full read timeout (4 s and more)."""
    target, bodies = series
    with (
        StorageReceiver("DICOM_ASSETS", "127.0.0.1", free_port(), tmp_path / "downloads", ["QUIET"]) as receiver,
        QuietPacs(receiver.port, bodies[:1], gap_s=8.0) as pacs,
    ):
        started = time.monotonic()
        with pytest.raises(PacsUnavailable, match="dropped the association or timed out"):
            _move(pacs, receiver, target, timeout_s=2.0)
        took = time.monotonic() - started
    assert 2.0 <= took < 3.2, took


def test_a_move_with_nothing_arriving_still_times_out(tmp_path: Path, series) -> None:
    target, bodies = series
    with (
        StorageReceiver("DICOM_ASSETS", "127.0.0.1", free_port(), tmp_path / "downloads", ["QUIET"]) as receiver,
        QuietPacs(receiver.port, bodies, gap_s=0.0, first_after_s=3.0) as pacs,
        pytest.raises(PacsUnavailable, match="dropped the association or timed out"),
    ):
        _move(pacs, receiver, target, timeout_s=0.5)
