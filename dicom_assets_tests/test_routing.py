"""Routing UIDs read from the first bytes of a dataset, in every encoding the receiver meets."""

from __future__ import annotations

import zlib

import pytest
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.sequence import Sequence

from dicom_assets.pacs.routing import MalformedDataset, routing_uids

EXPLICIT_LE, IMPLICIT_LE, EXPLICIT_BE = "1.2.840.10008.1.2.1", "1.2.840.10008.1.2", "1.2.840.10008.1.2.2"
DEFLATED = "1.2.840.10008.1.2.1.99"
UIDS = {"SOPInstanceUID": "1.2.3.4", "StudyInstanceUID": "1.2.3.5", "SeriesInstanceUID": "1.2.3.6"}


def _dataset(nested: bool = True) -> Dataset:
    ds = Dataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    ds.SOPInstanceUID = UIDS["SOPInstanceUID"]
    if nested:  # sequences before group 0020, items within items
        inner = Dataset()
        inner.ReferencedSOPInstanceUID = "9.9.9"
        item = Dataset()
        item.ReferencedSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
        item.ReferencedSOPInstanceUID = "9.9.8"
        item.SourceImageSequence = Sequence([inner])
        ds.ReferencedImageSequence = Sequence([item, Dataset()])
    ds.PatientID = "P1"
    ds.StudyInstanceUID = UIDS["StudyInstanceUID"]
    ds.SeriesInstanceUID = UIDS["SeriesInstanceUID"]
    ds.InstanceNumber = 1
    ds.BitsAllocated = 16
    ds.PixelData = b"\x01\x02" * 5000
    return ds


def _encode(ds: Dataset, syntax: str, undefined_lengths: bool = True) -> bytes:
    for elem in ds.iterall():
        if elem.VR == "SQ":
            elem.is_undefined_length = undefined_lengths
            for item in elem.value:
                item.is_undefined_length_sequence_item = undefined_lengths
    buffer = DicomBytesIO()
    buffer.is_implicit_VR, buffer.is_little_endian = syntax == IMPLICIT_LE, syntax != EXPLICIT_BE
    write_dataset(buffer, ds)
    return buffer.getvalue()


@pytest.mark.parametrize("syntax", [EXPLICIT_LE, IMPLICIT_LE, EXPLICIT_BE])
@pytest.mark.parametrize("undefined", [True, False])
def test_uids_found_once_their_bytes_arrived_and_not_before(syntax: str, undefined: bool) -> None:
    data = _encode(_dataset(), syntax, undefined)
    assert routing_uids(data, syntax, complete=True) == UIDS
    # Every prefix either says "need more" or already has all three UIDs, never a wrong value.
    answers = [routing_uids(data[:n], syntax) for n in range(0, 400)]
    first = next(n for n, a in enumerate(answers) if a is not None)
    assert all(a is None for a in answers[:first]) and all(a == UIDS for a in answers[first:])
    assert first < 400 and first < len(data) // 10  # routed from the head, not the whole instance


def test_deflated_dataset_is_routed_only_when_complete() -> None:
    raw = _encode(_dataset(), EXPLICIT_LE)
    packer = zlib.compressobj(6, zlib.DEFLATED, -zlib.MAX_WBITS)
    deflated = packer.compress(raw) + packer.flush()
    assert routing_uids(deflated[:50], DEFLATED) is None
    assert routing_uids(deflated, DEFLATED, complete=True) == UIDS


def test_dataset_without_routing_uids_returns_what_it_has_when_complete() -> None:
    ds = Dataset()
    ds.SOPInstanceUID = "1.2.3"
    ds.PatientID = "P"
    data = _encode(ds, EXPLICIT_LE)
    assert routing_uids(data, EXPLICIT_LE) is None
    assert routing_uids(data, EXPLICIT_LE, complete=True) == {"SOPInstanceUID": "1.2.3"}


def test_broken_structures_raise() -> None:
    data = _encode(_dataset(), EXPLICIT_LE)
    with pytest.raises(MalformedDataset):
        routing_uids(data[:37], EXPLICIT_LE, complete=True)  # ends inside an element
    # An undefined-length element whose "items" are garbage
    garbage = b"\x08\x00\x40\x11SQ\x00\x00\xff\xff\xff\xff" + b"\x10\x00\x20\x00LO\x02\x00P1"
    with pytest.raises(MalformedDataset):
        routing_uids(garbage, EXPLICIT_LE, complete=True)
