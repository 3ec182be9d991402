"""The mixed-content generator: every kind written, parseable, in the syntax it claims, lossless
encodings decoding to the same pixels, deterministic, streamed in bounded memory.

Real DCMTK and GDCM binaries (``scripts/ensure-services.sh`` installs them); without them the
tests that need them are skipped, or fail under ``CI=true``.
"""

from __future__ import annotations

import tracemalloc
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.pixels import get_decoder

from dicom_assets.devpacs.mixed import MIXED_KINDS, MixedInstance, MixedToolMissing, generate_mixed_set, missing_tools
from dicom_assets.devpacs.transcode import CannotTranscode, decode_to_native
from dicom_assets_tests.conftest import require_service

CT, SC = "1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.5.1.4.1.1.7"
#: kind -> (transfer syntax, SOP class, lossy): written down independently of the generator.
EXPECTED = {
    "ct-implicit-le": ("1.2.840.10008.1.2", CT, False),
    "ct-explicit-le": ("1.2.840.10008.1.2.1", CT, False),
    "ct-explicit-be": ("1.2.840.10008.1.2.2", CT, False),
    "ct-deflated-le": ("1.2.840.10008.1.2.1.99", CT, False),
    "ct-jpeg-baseline": ("1.2.840.10008.1.2.4.50", CT, True),
    "ct-jpeg-extended": ("1.2.840.10008.1.2.4.51", CT, True),
    "ct-jpeg-lossless-sv1": ("1.2.840.10008.1.2.4.70", CT, False),
    "ct-jpegls-lossless": ("1.2.840.10008.1.2.4.80", CT, False),
    "ct-jpegls-near-lossless": ("1.2.840.10008.1.2.4.81", CT, True),
    "ct-rle": ("1.2.840.10008.1.2.5", CT, False),
    "ct-j2k-lossless": ("1.2.840.10008.1.2.4.90", CT, False),
    "ct-j2k-lossy": ("1.2.840.10008.1.2.4.91", CT, True),
    "pdf": ("1.2.840.10008.1.2.1", "1.2.840.10008.5.1.4.1.1.104.1", False),
    "sr-text": ("1.2.840.10008.1.2.1", "1.2.840.10008.5.1.4.1.1.88.11", False),
    "sc-from-jpeg": ("1.2.840.10008.1.2.4.50", SC, True),
    "sc-rgb-rle": ("1.2.840.10008.1.2.5", SC, False),
    "us-cine-jpeg": ("1.2.840.10008.1.2.4.50", "1.2.840.10008.5.1.4.1.1.3.1", True),
    "enhanced-ct": ("1.2.840.10008.1.2.1", "1.2.840.10008.5.1.4.1.1.2.1", False),
    "large-multiframe": ("1.2.840.10008.1.2.1", "1.2.840.10008.5.1.4.1.1.7.3", False),
    "private-big-ob": ("1.2.840.10008.1.2.1", CT, False),
}
CT_SLICES = 2
LARGE_BYTES = 3 * 1024 * 1024 + 5  # not a whole number of 512 KiB frames: rounded up to 7
PRIVATE_OB_BYTES = 1024 * 1024 + 1  # odd: rounded up to even


def _require_codecs(kinds: list[str] | None = None) -> None:
    missing = missing_tools(kinds)
    require_service(not missing, f"the mixed set's codecs {missing} (scripts/ensure-services.sh)")


@pytest.fixture(scope="module")
def generated(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[MixedInstance]]:
    _require_codecs()
    root = tmp_path_factory.mktemp("mixed")
    made = generate_mixed_set(root, seed=5, ct_slices=CT_SLICES, large_bytes=LARGE_BYTES, private_ob_bytes=PRIVATE_OB_BYTES)
    return root, made


def _by_kind(instances: list[MixedInstance]) -> dict[str, list[MixedInstance]]:
    out: dict[str, list[MixedInstance]] = {}
    for inst in instances:
        out.setdefault(inst.kind, []).append(inst)
    return out


def test_every_kind_is_written_in_its_own_series(generated: tuple[Path, list[MixedInstance]]) -> None:
    root, made = generated
    kinds = _by_kind(made)
    assert list(kinds) == list(MIXED_KINDS) and set(MIXED_KINDS) == set(EXPECTED)
    assert {k: len(v) for k, v in kinds.items()} == {k: CT_SLICES if k.startswith("ct-") else 1 for k in EXPECTED}
    series = {k: {i.series_instance_uid for i in v} for k, v in kinds.items()}
    assert all(len(s) == 1 for s in series.values()) and len(set().union(*series.values())) == len(EXPECTED)
    # Two patients: the CT encodings in the first one's study, everything else in the second's.
    assert {(k.startswith("ct-"), i.patient_id) for k, v in kinds.items() for i in v} == {(True, "MIXED0001"), (False, "MIXED0002")}
    assert len({i.study_instance_uid for i in made}) == 2
    for inst in made:
        assert inst.path == root / inst.study_instance_uid / inst.series_instance_uid / f"{inst.sop_instance_uid}.dcm"
        assert inst.size == inst.path.stat().st_size > 0
    files = sorted(p for p in root.rglob("*") if p.is_file())
    assert files == sorted(i.path for i in made)  # no work file, no hidden leftover
    assert not [p for p in root.rglob(".*")]


def test_every_file_parses_and_is_in_the_syntax_it_claims(generated: tuple[Path, list[MixedInstance]]) -> None:
    _, made = generated
    for inst in made:
        syntax, sop_class, lossy = EXPECTED[inst.kind]
        ds = pydicom.dcmread(inst.path)  # the whole file, pixel data included
        assert (inst.transfer_syntax_uid, str(ds.file_meta.TransferSyntaxUID)) == (syntax, syntax), inst.kind
        assert inst.sop_class_uid == str(ds.SOPClassUID) == str(ds.file_meta.MediaStorageSOPClassUID) == sop_class
        assert inst.sop_instance_uid == str(ds.SOPInstanceUID) == str(ds.file_meta.MediaStorageSOPInstanceUID)
        assert (inst.study_instance_uid, inst.series_instance_uid) == (ds.StudyInstanceUID, ds.SeriesInstanceUID)
        assert (inst.patient_id, ds.SeriesDescription) == (ds.PatientID, inst.kind)
        assert inst.lossy is lossy and (ds.get("LossyImageCompression") == "01") is lossy, inst.kind
        if "PixelData" in ds:
            encapsulated = ds.PixelData[:4] == b"\xfe\xff\x00\xe0"  # the Basic Offset Table item
            assert encapsulated is pydicom.uid.UID(syntax).is_compressed, inst.kind


def _pixels(inst: MixedInstance) -> np.ndarray:
    """The instance's pixels: pydicom decodes what it can, the PACS's transcoder the rest."""
    ds = decode_to_native(inst.path, inst.transfer_syntax_uid, pydicom.dcmread)
    return ds.pixel_array


def test_lossless_ct_encodings_decode_to_the_same_pixels(generated: tuple[Path, list[MixedInstance]]) -> None:
    kinds = _by_kind(generated[1])
    reference = [pydicom.dcmread(i.path).pixel_array for i in kinds["ct-explicit-le"]]
    for kind in ("ct-implicit-le", "ct-explicit-be", "ct-deflated-le", "ct-rle", "ct-jpeg-lossless-sv1", "ct-jpegls-lossless"):
        for inst, expected in zip(kinds[kind], reference, strict=True):
            assert np.array_equal(_pixels(inst), expected), kind
    near = [_pixels(inst).astype(int) - expected for inst, expected in zip(kinds["ct-jpegls-near-lossless"], reference, strict=True)]
    assert all(0 < np.abs(diff).max() <= 2 for diff in near)  # JPEG-LS NEAR=2 (dcmcjpls' default)
    baseline = _pixels(kinds["ct-jpeg-baseline"][0])
    assert baseline.dtype == np.uint8 and baseline.shape == reference[0].shape  # 8-bit lossy
    for inst, expected in zip(kinds["ct-j2k-lossless"], reference, strict=True):
        if get_decoder(inst.transfer_syntax_uid).is_available:  # a pylibjpeg/GDCM plugin is installed
            assert np.array_equal(_pixels(inst), expected)
        else:
            with pytest.raises(CannotTranscode, match="JPEG 2000"):
                _pixels(inst)


def test_multi_frame_objects_and_the_streamed_elements(generated: tuple[Path, list[MixedInstance]]) -> None:
    kinds = _by_kind(generated[1])
    large = pydicom.dcmread(kinds["large-multiframe"][0].path)
    frame_bytes = 512 * 512 * 2
    assert large.NumberOfFrames == -(-LARGE_BYTES // frame_bytes) == 7
    assert len(large.PixelData) == large.NumberOfFrames * frame_bytes >= LARGE_BYTES
    assert large.pixel_array.shape == (7, 512, 512) and int(large.pixel_array.max()) < 4096
    private = pydicom.dcmread(kinds["private-big-ob"][0].path)
    blob = private[0x0009, 0x1010]
    assert private[0x0009, 0x0010].value == "DICOM_ASSETS MIXED"
    assert (blob.VR, len(blob.value)) == ("OB", PRIVATE_OB_BYTES + 1)
    assert private.pixel_array.shape == (128, 128)  # the elements after the streamed one are intact
    enhanced = pydicom.dcmread(kinds["enhanced-ct"][0].path)
    assert enhanced.NumberOfFrames == len(enhanced.PerFrameFunctionalGroupsSequence) == 4
    assert enhanced.pixel_array.shape == (4, 128, 128)
    cine = pydicom.dcmread(kinds["us-cine-jpeg"][0].path)
    assert cine.NumberOfFrames == 8 and cine.SamplesPerPixel == 3
    document = pydicom.dcmread(kinds["pdf"][0].path)
    assert document.EncapsulatedDocument.startswith(b"%PDF-1.4") and document.EncapsulatedDocument.rstrip(b"\0").endswith(b"%%EOF\n")
    report = pydicom.dcmread(kinds["sr-text"][0].path)
    assert "belüftet" in report.ContentSequence[1].TextValue


#: Kinds whose tools would invent UIDs or times, or whose bytes are streamed.
_DETERMINISM_KINDS = ["ct-j2k-lossy", "ct-jpegls-near-lossless", "pdf", "sc-from-jpeg", "private-big-ob"]


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*.dcm")}


def test_same_seed_same_bytes_and_another_seed_other_uids(tmp_path: Path) -> None:
    _require_codecs(_DETERMINISM_KINDS)
    small = {"kinds": _DETERMINISM_KINDS, "ct_slices": 1, "private_ob_bytes": 4096}
    first = generate_mixed_set(tmp_path / "a", seed=3, **small)
    generate_mixed_set(tmp_path / "b", seed=3, **small)
    other = generate_mixed_set(tmp_path / "c", seed=4, **small)
    assert _tree(tmp_path / "a") == _tree(tmp_path / "b") and len(_tree(tmp_path / "a")) == len(first) == 5
    uids = lambda made: {u for i in made for u in (i.sop_instance_uid, i.series_instance_uid, i.study_instance_uid)}  # noqa: E731
    assert not uids(first) & uids(other)


def test_large_objects_are_written_in_bounded_memory(tmp_path: Path) -> None:
    """128 MiB of pixel data and private OB, streamed: Python's peak allocation stays far below."""
    size = 64 * 1024 * 1024
    tracemalloc.start()
    try:
        made = generate_mixed_set(tmp_path, kinds=["large-multiframe", "private-big-ob"], large_bytes=size, private_ob_bytes=size)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert sum(i.size for i in made) > 2 * size
    assert peak < 24 * 1024 * 1024, f"peak {peak / 2**20:.0f} MiB while writing {2 * size / 2**20:.0f} MiB"


def test_a_missing_codec_is_named_with_its_package_before_anything_is_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    empty = tmp_path / "no-tools"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    assert missing_tools(["ct-j2k-lossless", "pdf", "sr-text"]) == {"gdcmconv": "libgdcm-tools", "pdf2dcm": "dcmtk"}
    with pytest.raises(MixedToolMissing, match="apt-get install dcmtk libgdcm-tools") as raised:
        generate_mixed_set(tmp_path / "set", kinds=["sr-text", "ct-j2k-lossless", "pdf"])
    assert raised.value.missing == {"gdcmconv": "libgdcm-tools", "pdf2dcm": "dcmtk"}
    assert not (tmp_path / "set").exists()
    # The kinds pydicom writes alone need no program at all.
    made = generate_mixed_set(tmp_path / "set", kinds=["sr-text", "enhanced-ct"], patient_ids=["ONLY"])
    assert [(i.kind, i.patient_id) for i in made] == [("sr-text", "ONLY"), ("enhanced-ct", "ONLY")]


def test_unknown_kinds_and_bad_sizes_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown kinds"):
        generate_mixed_set(tmp_path, kinds=["ct-jpeg-xl"])
    with pytest.raises(ValueError, match="positive"):
        generate_mixed_set(tmp_path, kinds=["sr-text"], large_bytes=0)
    with pytest.raises(ValueError, match="one or two"):
        generate_mixed_set(tmp_path, kinds=["sr-text"], patient_ids=["A", "B", "C"])
