"""How the bundled PACS sends what it stores (dicom_assets.devpacs.sending), over real loopback
associations with pynetdicom as the peer.

* As stored whenever the peer accepted the instance's (SOP class, stored syntax), in both modes,
  without decoding anything (every full read of a served file is made to fail).
* A C-GET proposal of one context per class listing every syntax: the PACS accepts Explicit VR
  Little Endian. By default, only a change of element encoding is made (implicit / deflated to
  explicit); the rest fails its sub-operation. With ``transcode_to_explicit=True`` (Orthanc's
  behaviour) pixels are decoded, and what has no decoder ends the C-GET with 0xC000.
* C-MOVE to a storage SCP that refuses compressed syntaxes: the same rules per sub-operation.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.pixels import get_decoder
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, evt
from pynetdicom.dsutils import split_dataset
from pynetdicom.presentation import build_role
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    PatientRootQueryRetrieveInformationModelMove,
    StudyRootQueryRetrieveInformationModelGet,
)

from dicom_assets.devpacs import DevPacs
from dicom_assets.devpacs import server as devpacs_server
from dicom_assets.devpacs.mixed import MixedInstance, generate_mixed_set, missing_tools
from dicom_assets_tests.conftest import free_port, require_service

HOST = "127.0.0.1"
EXPLICIT, IMPLICIT, DEFLATED = "1.2.840.10008.1.2.1", "1.2.840.10008.1.2", "1.2.840.10008.1.2.1.99"
UNCOMPRESSED_LE = (EXPLICIT, IMPLICIT, DEFLATED)
KINDS = ["ct-implicit-le", "ct-explicit-le", "ct-deflated-le", "ct-explicit-be", "ct-jpeg-baseline",
         "ct-jpegls-lossless", "ct-rle", "ct-j2k-lossless", "sc-rgb-rle"]  # fmt: skip
#: Kinds whose pixels are exactly those of ct-explicit-le (the generator's CT phantom).
LOSSLESS_CT = ("ct-implicit-le", "ct-deflated-le", "ct-explicit-be", "ct-jpegls-lossless", "ct-rle", "ct-j2k-lossless")
J2K_DECODABLE = get_decoder("1.2.840.10008.1.2.4.90").is_available  # only with a pylibjpeg/GDCM plugin


@dataclass
class Got:
    """What a peer received: SOP Instance UID -> (transfer syntax, data set bytes)."""

    items: dict[str, tuple[str, bytes]] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def on_store(self, event: evt.Event) -> int:
        with self.lock:
            uid = str(event.request.AffectedSOPInstanceUID)
            self.items[uid] = (str(event.context.transfer_syntax), event.encoded_dataset(include_meta=False))
        return 0x0000

    def dataset(self, uid: str) -> Dataset:
        """A received instance decoded (it came in an uncompressed Little Endian syntax)."""
        syntax, body = self.items[uid]
        ds = pydicom.dcmread(DicomBytesIO(body), force=True)
        ds.file_meta = pydicom.dataset.FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = syntax
        return ds


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, list[MixedInstance]]]:
    missing = missing_tools(KINDS)
    require_service(not missing, f"the mixed set's codecs {missing} (scripts/ensure-services.sh)")
    root = tmp_path_factory.mktemp("served")
    by_kind: dict[str, list[MixedInstance]] = {}
    for inst in generate_mixed_set(root, kinds=KINDS, patient_ids=["SEND0001"], rows=64, columns=64):
        by_kind.setdefault(inst.kind, []).append(inst)
    return root, by_kind


def _body(path: Path) -> bytes:
    _, offset = split_dataset(path)
    return path.read_bytes()[offset:]


@pytest.fixture
def no_full_reads(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any full read of a served file fails: what arrives was sent as stored."""
    real = devpacs_server.dcmread

    def header_only(path: object, **kwargs: object) -> Dataset:
        assert kwargs.get("stop_before_pixels"), "a served file was decoded"
        return real(path, **kwargs)

    monkeypatch.setattr(devpacs_server, "dcmread", header_only)


def _get(port: int, instances: list[MixedInstance], per_syntax: bool) -> tuple[Got, list[Dataset]]:
    """C-GET the series of ``instances``; the storage contexts either one per (class, syntax) or
    one per class listing every syntax (the proposal that lets a PACS transcode)."""
    classes = sorted({i.sop_class_uid for i in instances})
    ae = AE(ae_title="GETTER")
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelGet)
    for sop_class in classes:
        if per_syntax:
            for syntax in ALL_TRANSFER_SYNTAXES:
                ae.add_requested_context(sop_class, [syntax])
        else:
            ae.add_requested_context(sop_class, [EXPLICIT, IMPLICIT] + [s for s in ALL_TRANSFER_SYNTAXES if s not in (EXPLICIT, IMPLICIT)])
    got = Got()
    roles = [build_role(c, scp_role=True) for c in classes]
    assoc = ae.associate(HOST, port, ae_title="DEVPACS", ext_neg=roles, evt_handlers=[(evt.EVT_C_STORE, got.on_store)])
    assert assoc.is_established
    query = Dataset()
    query.QueryRetrieveLevel = "SERIES"
    query.StudyInstanceUID = instances[0].study_instance_uid
    query.SeriesInstanceUID = instances[0].series_instance_uid
    try:
        statuses = [status for status, _ in assoc.send_c_get(query, StudyRootQueryRetrieveInformationModelGet)]
    finally:
        assoc.release()
    return got, statuses


@pytest.mark.parametrize("transcode", [False, True], ids=["as-stored", "transcoding"])
def test_get_proposing_every_class_and_syntax_gets_everything_as_stored(
    served: tuple[Path, dict[str, list[MixedInstance]]], transcode: bool, no_full_reads: None
) -> None:
    root, by_kind = served
    with DevPacs(root, transcode_to_explicit=transcode) as pacs:
        for kind, instances in by_kind.items():
            got, statuses = _get(pacs.port, instances, per_syntax=True)
            assert statuses[-1].Status == 0x0000, kind
            assert got.items == {i.sop_instance_uid: (i.transfer_syntax_uid, _body(i.path)) for i in instances}, kind


def test_get_offering_every_syntax_per_class_by_default_only_reencodes_elements(
    served: tuple[Path, dict[str, list[MixedInstance]]],
) -> None:
    """The behaviour before the transcoding switch, kept as the default: implicit and deflated
    files go out re-encoded as Explicit VR LE (pixels untouched); every other stored syntax
    fails its sub-operation, and the C-GET says which (0xA702, FailedSOPInstanceUIDList)."""
    root, by_kind = served
    reference = {i.sop_instance_uid: pydicom.dcmread(i.path) for i in by_kind["ct-explicit-le"]}
    with DevPacs(root) as pacs:
        for kind, instances in by_kind.items():
            got, statuses = _get(pacs.port, instances, per_syntax=False)
            final = statuses[-1]
            if instances[0].transfer_syntax_uid in UNCOMPRESSED_LE:
                assert final.Status == 0x0000 and set(got.items) == {i.sop_instance_uid for i in instances}, kind
                assert {syntax for syntax, _ in got.items.values()} == {EXPLICIT}
                for inst, ref in zip(instances, reference.values(), strict=True):
                    assert got.dataset(inst.sop_instance_uid).PixelData == ref.PixelData, kind
            else:
                assert (final.Status, final.NumberOfFailedSuboperations, got.items) == (0xA702, len(instances), {}), kind


def test_get_offering_every_syntax_per_class_transcodes_like_orthanc(served: tuple[Path, dict[str, list[MixedInstance]]]) -> None:
    """transcode_to_explicit=True: everything is sent in Explicit VR Little Endian, pixels decoded
    (lossless ones identical, the lossy JPEG decompressed), the SOP Instance UID kept; JPEG 2000
    without a decoder ends the C-GET with 0xC000 "Cannot transcode", nothing of it sent."""
    root, by_kind = served
    reference = [pydicom.dcmread(i.path).pixel_array for i in by_kind["ct-explicit-le"]]
    with DevPacs(root, transcode_to_explicit=True) as pacs:
        for kind, instances in by_kind.items():
            got, statuses = _get(pacs.port, instances, per_syntax=False)
            final = statuses[-1]
            if kind == "ct-j2k-lossless" and not J2K_DECODABLE:
                assert (final.Status, final.NumberOfFailedSuboperations, got.items) == (0xC000, len(instances), {})
                assert final.ErrorComment == "Cannot transcode from 1.2.840.10008.1.2.4.90"
                continue
            assert final.Status == 0x0000 and set(got.items) == {i.sop_instance_uid for i in instances}, kind
            assert {syntax for syntax, _ in got.items.values()} == {EXPLICIT}, kind
            decoded = [got.dataset(i.sop_instance_uid) for i in instances]
            assert [str(ds.SOPInstanceUID) for ds in decoded] == [i.sop_instance_uid for i in instances]
            if kind in LOSSLESS_CT:
                assert all(np.array_equal(ds.pixel_array, ref) for ds, ref in zip(decoded, reference, strict=True)), kind
            if kind == "ct-jpeg-baseline":
                assert all(ds.LossyImageCompression == "01" and ds.BitsAllocated == 8 for ds in decoded)
            if kind == "sc-rgb-rle":
                assert np.array_equal(decoded[0].pixel_array, pydicom.dcmread(instances[0].path).pixel_array)


@contextmanager
def _uncompressed_only_scp(port: int) -> Iterator[Got]:
    """A storage SCP that accepts every storage class in uncompressed Little Endian only."""
    got = Got()
    ae = AE(ae_title="PLAINSCP")
    for cx in AllStoragePresentationContexts:
        ae.add_supported_context(cx.abstract_syntax, [EXPLICIT, IMPLICIT])
    server = ae.start_server((HOST, port), block=False, evt_handlers=[(evt.EVT_C_STORE, got.on_store)])
    try:
        yield got
    finally:
        server.shutdown()


def _move_everything(port: int, patient_id: str, destination: str) -> Dataset:
    ae = AE(ae_title="MOVER")
    ae.add_requested_context(PatientRootQueryRetrieveInformationModelMove)
    assoc = ae.associate(HOST, port, ae_title="DEVPACS")
    assert assoc.is_established
    query = Dataset()
    query.QueryRetrieveLevel = "PATIENT"
    query.PatientID = patient_id
    try:
        return [status for status, _ in assoc.send_c_move(query, destination, PatientRootQueryRetrieveInformationModelMove)][-1]
    finally:
        assoc.release()


@pytest.mark.parametrize("transcode", [False, True], ids=["as-stored", "transcoding"])
def test_move_to_a_peer_refusing_compressed_syntaxes(served: tuple[Path, dict[str, list[MixedInstance]]], transcode: bool) -> None:
    """C-MOVE proposes each (class, stored syntax) (and, when transcoding, Explicit VR LE per
    class): the peer refuses the compressed ones. Uncompressed Little Endian instances arrive
    as stored either way; the others fail their sub-operation (the C-MOVE goes on), or, when
    transcoding, arrive decoded in Explicit VR LE, except JPEG 2000 without a decoder."""
    root, by_kind = served
    instances = [i for members in by_kind.values() for i in members]
    port = free_port()
    pacs = DevPacs(root, move_destinations={"PLAINSCP": (HOST, port)}, transcode_to_explicit=transcode)
    with _uncompressed_only_scp(port) as got, pacs:
        final = _move_everything(pacs.port, "SEND0001", "PLAINSCP")
    as_stored = {i.sop_instance_uid for i in instances if i.transfer_syntax_uid in (EXPLICIT, IMPLICIT)}
    assert all(got.items[uid] == (i.transfer_syntax_uid, _body(i.path)) for i in instances if (uid := i.sop_instance_uid) in as_stored)
    if transcode:
        lost = {i.sop_instance_uid for i in by_kind["ct-j2k-lossless"]} if not J2K_DECODABLE else set()
    else:  # deflated is re-encoded (lossless); the rest cannot go without transcoding
        lost = {i.sop_instance_uid for i in instances if i.transfer_syntax_uid not in UNCOMPRESSED_LE}
    assert set(got.items) == {i.sop_instance_uid for i in instances} - lost
    assert (final.Status, final.NumberOfFailedSuboperations) == ((0xB000, len(lost)) if lost else (0x0000, 0))
    converted = {uid: syntax for uid, (syntax, _) in got.items.items() if uid not in as_stored}
    assert converted and set(converted.values()) <= {EXPLICIT, IMPLICIT}  # pynetdicom picks among the accepted
    reference = [pydicom.dcmread(i.path).pixel_array for i in by_kind["ct-explicit-le"]]
    for kind in LOSSLESS_CT:
        for inst, ref in zip(by_kind[kind], reference, strict=True):
            if inst.sop_instance_uid in converted:
                assert np.array_equal(got.dataset(inst.sop_instance_uid).pixel_array, ref), kind
