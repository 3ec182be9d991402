"""The locked-down storage SCP, attacked with crafted C-STOREs from a real pynetdicom SCU."""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pynetdicom import AE, StoragePresentationContexts

from dicom_assets.config import receiver_allowed_ae_titles
from dicom_assets.pacs.receiver import STATUS_CANNOT_UNDERSTAND, STATUS_NOT_EXPECTED, StorageReceiver
from dicom_assets_tests.conftest import free_port
from dicom_assets_tests.pacs_fixtures import make_settings, small_cohort


@pytest.fixture
def instance(tmp_path: Path):
    cohort = small_cohort(tmp_path / "pacs", patient_ids=("P1",), series=1, slices=1)
    ds = pydicom.dcmread(next((tmp_path / "pacs").rglob("*.dcm")))
    return cohort.series[0], ds


def _receiver(tmp_path: Path, **kwargs: Any) -> StorageReceiver:
    return StorageReceiver("DICOM_ASSETS", "127.0.0.1", free_port(), tmp_path / "downloads", **kwargs)


def _store(port: int, datasets: list, calling: str = "DEVPACS") -> list[int | None]:
    ae = AE(ae_title=calling)
    ae.requested_contexts = StoragePresentationContexts
    assoc = ae.associate("127.0.0.1", port, ae_title="DICOM_ASSETS")
    if not assoc.is_established:
        return [None] * len(datasets)
    try:
        return [int(assoc.send_c_store(ds).get("Status", -1)) for ds in datasets]
    finally:
        assoc.release()


def _files(root: Path) -> list[Path]:
    return [p for p in root.parent.rglob("*") if p.is_file() and "pacs" not in p.parts]


def test_late_straggler_after_the_retrieve_finished_is_refused_and_not_written(tmp_path: Path, instance) -> None:
    series, ds = instance
    with _receiver(tmp_path, allowed_ae_titles=["DEVPACS"]) as receiver:
        flight = receiver.sink.expect("P1", series.study_instance_uid, series.series_instance_uid)
        receiver.sink.done(flight)  # the C-MOVE was abandoned / judged
        assert _store(receiver.port, [ds]) == [STATUS_NOT_EXPECTED]
        assert receiver.sink.refused == 1
    assert not (tmp_path / "downloads").exists() or not any((tmp_path / "downloads").rglob("*"))


@pytest.mark.parametrize(
    ("keyword", "value"),
    [
        ("SOPInstanceUID", "../../../../etc/passwd"),
        ("SOPInstanceUID", "/tmp/evil"),
        ("SOPInstanceUID", "1.2.3\x00.4"),
        ("SeriesInstanceUID", "1." + "2" * 63),  # 65 characters (pynetdicom will not send a 65-char SOP UID)
        ("StudyInstanceUID", "1.2.3\x00"),
        ("SOPInstanceUID", "1.2.abc"),
        ("SOPInstanceUID", ".."),
        ("SeriesInstanceUID", "../.."),
        ("StudyInstanceUID", "/"),
    ],
)
def test_hostile_uids_are_refused_and_nothing_leaves_download_dir(tmp_path: Path, instance, keyword: str, value: str) -> None:
    series, ds = instance
    hostile = copy.deepcopy(ds)
    setattr(hostile, keyword, value)
    if keyword == "SOPInstanceUID":
        hostile.file_meta.MediaStorageSOPInstanceUID = value
    with _receiver(tmp_path, allowed_ae_titles=["DEVPACS"]) as receiver:
        receiver.sink.expect("P1", series.study_instance_uid, series.series_instance_uid)  # a retrieve in flight
        statuses = _store(receiver.port, [hostile, ds])
        assert statuses[0] in (STATUS_CANNOT_UNDERSTAND, STATUS_NOT_EXPECTED)
        assert statuses[1] == 0x0000  # the genuine instance of the same series still lands
    written = [p for p in (tmp_path / "downloads").rglob("*") if p.is_file()]
    assert [p.name for p in written] == [f"{ds.SOPInstanceUID}.dcm"]
    outside = {p for p in tmp_path.rglob("*") if p.is_file()} - set(written) - set((tmp_path / "pacs").rglob("*"))
    assert outside == set()
    assert not os.path.exists("/tmp/evil.dcm")


def test_only_the_pacs_ae_title_may_associate(tmp_path: Path, instance, caplog: pytest.LogCaptureFixture) -> None:
    series, ds = instance
    settings = make_settings(tmp_path, 104, free_port(), "sqlite://")
    assert receiver_allowed_ae_titles(settings) == ["DEVPACS"]  # default: pacs.called_ae_title
    with StorageReceiver.from_settings(settings) as receiver:
        receiver.sink.expect("P1", series.study_instance_uid, series.series_instance_uid)
        assert _store(receiver.port, [ds], calling="INTRUDER") == [None]
        assert _store(receiver.port, [ds], calling="DEVPACS") == [0x0000]
    assert "rejected association from AE 'INTRUDER'" in caplog.text


def test_allowed_ae_titles_override_the_pacs_title(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, 104, free_port(), "sqlite://")
    settings.receiver.allowed_ae_titles = ["ROUTER1", "ROUTER2"]
    assert receiver_allowed_ae_titles(settings) == ["ROUTER1", "ROUTER2"]


def test_allowed_hosts_refuses_other_addresses(tmp_path: Path, instance, caplog: pytest.LogCaptureFixture) -> None:
    series, ds = instance
    with _receiver(tmp_path, allowed_ae_titles=["DEVPACS"], allowed_hosts=["10.11.12.13"]) as receiver:
        receiver.sink.expect("P1", series.study_instance_uid, series.series_instance_uid)
        assert _store(receiver.port, [ds]) == [None]
    assert "not in receiver.allowed_hosts" in caplog.text
    assert not any((tmp_path / "downloads").rglob("*.dcm"))
    with _receiver(tmp_path, allowed_ae_titles=["DEVPACS"], allowed_hosts=["127.0.0.1"]) as receiver:
        receiver.sink.expect("P1", series.study_instance_uid, series.series_instance_uid)
        assert _store(receiver.port, [ds]) == [0x0000]


def test_file_meta_is_what_pynetdicom_writes() -> None:
    from pynetdicom.dsutils import create_file_meta, encode_file_meta

    from dicom_assets.pacs.receiver import file_meta

    for sop_class, sop_uid, syntax in [
        ("1.2.840.10008.5.1.4.1.1.2", "1.2.3.4", "1.2.840.10008.1.2.1"),
        ("1.2.840.10008.5.1.4.1.1.4", "1.2.3.45", "1.2.840.10008.1.2.4.50"),
    ]:
        expected = encode_file_meta(create_file_meta(sop_class_uid=sop_class, sop_instance_uid=sop_uid, transfer_syntax=syntax))
        assert file_meta(sop_class, sop_uid, syntax) == b"\x00" * 128 + b"DICM" + expected
