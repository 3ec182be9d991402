"""The streaming upper layer, end to end: our requestor sends C-STOREs to our storage SCP in
fragments of any size, and what lands on disk is exactly what was sent."""

from __future__ import annotations

import time
from pathlib import Path

import pydicom
import pytest
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pynetdicom import AE
from pynetdicom.presentation import build_context

from dicom_assets.pacs import upper_layer as ul
from dicom_assets.pacs.receiver import STATUS_SUCCESS, StorageReceiver
from dicom_assets.pacs.requestor import AssociationRejected, RequestorAssociation
from dicom_assets_tests.conftest import free_port
from dicom_assets_tests.pacs_fixtures import CT, send_c_store, small_cohort

EXPLICIT_LE = "1.2.840.10008.1.2.1"


@pytest.fixture
def instance(tmp_path: Path):
    cohort = small_cohort(tmp_path / "pacs", patient_ids=("P1",), series=1, slices=1)
    ds = pydicom.dcmread(next((tmp_path / "pacs").rglob("*.dcm")))
    body = DicomBytesIO()
    body.is_implicit_VR, body.is_little_endian = False, True
    write_dataset(body, ds)
    return cohort.series[0], ds, body.getvalue()


def _open(port: int, called: str = "DICOM_ASSETS") -> RequestorAssociation:
    return RequestorAssociation.open(("127.0.0.1", port), "DEVPACS", called, [build_context(CT, [EXPLICIT_LE])], timeout_s=5)


def _status(assoc: RequestorAssociation) -> int | None:
    for _cx, command, _data in assoc._assoc.messages(lambda cx, cmd: None):  # type: ignore[arg-type,return-value]
        return command.ushort(0x00000900)
    return None


@pytest.mark.parametrize("fragment", [7, 1000, 1 << 20])
def test_fragments_of_any_size_land_byte_identical(tmp_path: Path, instance, fragment: int) -> None:
    series, ds, body = instance
    with StorageReceiver("DICOM_ASSETS", "127.0.0.1", free_port(), tmp_path / "downloads", ["DEVPACS"]) as receiver:
        flight = receiver.sink.expect("P1", series.study_instance_uid, series.series_instance_uid)
        assoc = _open(receiver.port)
        send_c_store(assoc, str(ds.SOPInstanceUID), body, fragment)
        assert _status(assoc) == STATUS_SUCCESS
        assoc.release()
    files = list((tmp_path / "downloads").rglob("*"))
    written = [p for p in files if p.is_file()]
    assert [p.name for p in written] == [f"{ds.SOPInstanceUID}.dcm"]
    data = written[0].read_bytes()
    assert data.endswith(body) and data[128:132] == b"DICM"
    assert pydicom.dcmread(written[0]).file_meta.TransferSyntaxUID == EXPLICIT_LE
    assert flight.received == 1 and flight.bytes == len(data)


def test_connection_lost_mid_instance_leaves_no_file(tmp_path: Path, instance) -> None:
    series, ds, body = instance
    with StorageReceiver("DICOM_ASSETS", "127.0.0.1", free_port(), tmp_path / "downloads", ["DEVPACS"]) as receiver:
        flight = receiver.sink.expect("P1", series.study_instance_uid, series.series_instance_uid)
        assoc = _open(receiver.port)
        send_c_store(assoc, str(ds.SOPInstanceUID), body, 256, stop_after=len(body) // 2)
        time.sleep(0.2)  # the receiver has routed it and started the temp file
        partial = [p for p in (tmp_path / "downloads").rglob("*") if p.is_file()]
        assoc._assoc.sock.close()
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and any(p.exists() for p in partial):
            time.sleep(0.05)
    assert len(partial) == 1 and partial[0].name.startswith(".")  # it was streaming to a temp name
    assert not [p for p in (tmp_path / "downloads").rglob("*") if p.is_file()]
    assert flight.received == 0


def test_echo_from_pynetdicom_and_rejections(tmp_path: Path) -> None:
    with StorageReceiver("DICOM_ASSETS", "127.0.0.1", free_port(), tmp_path / "downloads", ["DEVPACS"]) as receiver:
        ae = AE(ae_title="DEVPACS")
        ae.add_requested_context("1.2.840.10008.1.1")
        assoc = ae.associate("127.0.0.1", receiver.port, ae_title="DICOM_ASSETS")
        assert assoc.is_established
        assert assoc.send_c_echo().Status == 0
        assoc.release()
        with pytest.raises(AssociationRejected, match="rejected"):
            _open(receiver.port, called="SOMEONE_ELSE")


def test_unsupported_command_aborts_the_association(tmp_path: Path) -> None:
    with StorageReceiver("DICOM_ASSETS", "127.0.0.1", free_port(), tmp_path / "downloads", ["DEVPACS"]) as receiver:
        assoc = _open(receiver.port)
        inner = assoc._assoc
        inner.send_command(next(iter(inner.contexts)), ul.encode_command({0x00000100: 0x0120, 0x00000110: 1, 0x00000800: 0x0101}))
        with pytest.raises(ul.ConnectionClosed):
            list(inner.messages(lambda cx, cmd: None))  # type: ignore[arg-type,return-value]


def test_command_set_round_trip() -> None:
    raw = ul.encode_command({0x00000002: "1.2.3", 0x00000100: 0x8001, 0x00000600: ul.ae_title("DEST")})
    command = ul.decode_command(raw)
    assert command.uid(0x00000002) == "1.2.3" and command.field == 0x8001
    assert command.elements[0x00000600] == b"DEST" and command.ushort(0x00000000) is not None
    with pytest.raises(ul.ProtocolError):
        ul.decode_command(raw[:-2])


def test_a_repeated_association_request_is_answered_from_the_cache(tmp_path: Path, instance) -> None:
    """A PACS opens one association per C-MOVE with the very same request: the second is
    answered with the first's negotiation, and instances still land; a rejected request is
    never kept (it would skip the AE title check)."""
    series, ds, body = instance
    with StorageReceiver("DICOM_ASSETS", "127.0.0.1", free_port(), tmp_path / "downloads", ["DEVPACS"]) as receiver:
        receiver.sink.expect("P1", series.study_instance_uid, series.series_instance_uid)
        with pytest.raises(AssociationRejected):
            _open(receiver.port, called="SOMEONE_ELSE")
        assert len(receiver._requests._requests) == 0
        contexts = []
        for _ in range(2):
            assoc = _open(receiver.port)
            contexts.append({cx: str(c.transfer_syntax[0]) for cx, c in assoc._assoc.contexts.items()})
            send_c_store(assoc, str(ds.SOPInstanceUID), body, 1 << 20)
            assert _status(assoc) == STATUS_SUCCESS
            assoc.release()
        kept = list(receiver._requests._requests.values())
        assert len(kept) == 1 and kept[0].answer is not None  # one request, answered once, reused
    assert contexts[0] == contexts[1] == {1: EXPLICIT_LE}
    assert [p.name for p in (tmp_path / "downloads").rglob("*.dcm")] == [f"{ds.SOPInstanceUID}.dcm"]
