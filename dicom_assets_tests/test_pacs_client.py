"""The PACS client and the storage SCP against the bundled PACS on loopback (real DICOM network)."""

from __future__ import annotations

from pathlib import Path

import pydicom
import pytest

from dicom_assets.layout import instances_on_disk, series_dir
from dicom_assets.pacs.client import MoveDestinationUnknown, PacsClient, PacsUnavailable
from dicom_assets.pacs.receiver import InstanceSink, StorageReceiver
from dicom_assets_tests.conftest import free_port
from dicom_assets_tests.pacs_fixtures import HOSTILE_PATIENT_IDS, make_settings, small_cohort


@pytest.fixture
def served(tmp_path: Path):
    from dicom_assets.devpacs import DevPacs

    cohort = small_cohort(tmp_path / "pacs")
    receiver_port = free_port()
    with DevPacs(tmp_path / "pacs", move_destinations={"DICOM_ASSETS": ("127.0.0.1", receiver_port)}) as pacs:
        settings = make_settings(tmp_path, pacs.port, receiver_port, "sqlite://")
        yield cohort, settings, pacs


def _source_files(root: Path) -> dict[str, Path]:
    return {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID): p for p in root.rglob("*.dcm")}


def test_find_every_level_with_hostile_patient_ids(served) -> None:
    cohort, settings, _ = served
    with PacsClient(settings.pacs).session() as session:
        patients = session.find_patients()
        assert sorted(str(p.PatientID) for p in patients) == sorted(HOSTILE_PATIENT_IDS)
        studies = session.find_studies("PAT*3 José")
        assert len(studies) == 1  # the '*' in the ID did not match the other patients
        series = session.find_series(str(studies[0].StudyInstanceUID))
        assert len(series) == 2
        assert all(int(s.NumberOfSeriesRelatedInstances) == 4 for s in series)
        uids = session.find_instance_uids(str(studies[0].StudyInstanceUID), str(series[0].SeriesInstanceUID))
        assert len(uids) == 4
        assert session.requests == 5  # association + 4 C-FINDs on one association


def test_c_move_writes_instances_as_received(served, tmp_path: Path) -> None:
    cohort, settings, _ = served
    target = cohort.series[0]
    r = settings.receiver
    with StorageReceiver(r.ae_title, r.bind_address, r.port, settings.paths.download_dir) as receiver:
        flight = receiver.sink.expect(target.patient_id, target.study_instance_uid, target.series_instance_uid)
        with PacsClient(settings.pacs).session() as session:
            final = session.move(target.study_instance_uid, target.series_instance_uid, "DICOM_ASSETS")
        flight.wait_for_stragglers(lambda: flight.received >= target.instances, 2)
    assert final.succeeded and final.completed == target.instances
    directory = series_dir(settings.paths.download_dir, target.patient_id, target.study_instance_uid, target.series_instance_uid)
    on_disk = instances_on_disk(directory)
    assert sorted(on_disk) == sorted(target.sop_instance_uids)
    sources = _source_files(tmp_path / "pacs")
    for sop in on_disk:
        received = pydicom.dcmread(directory / f"{sop}.dcm")
        original = pydicom.dcmread(sources[sop])
        assert received.PixelData == original.PixelData
        assert received.SOPInstanceUID == sop
    assert not list(directory.glob(".*.part"))


def test_receiver_refuses_what_nobody_asked_for(served) -> None:
    cohort, settings, _ = served
    target = cohort.series[0]
    r = settings.receiver
    with StorageReceiver(r.ae_title, r.bind_address, r.port, settings.paths.download_dir) as receiver:
        with PacsClient(settings.pacs).session() as session:
            final = session.move(target.study_instance_uid, target.series_instance_uid, "DICOM_ASSETS")
        assert receiver.sink.refused == target.instances
    assert not final.succeeded and final.failed == target.instances
    assert not settings.paths.download_dir.exists() or not any(settings.paths.download_dir.rglob("*.dcm"))


def test_receiver_rejects_unknown_calling_ae(served) -> None:
    cohort, settings, _ = served
    target = cohort.series[0]
    r = settings.receiver
    with StorageReceiver(r.ae_title, r.bind_address, r.port, settings.paths.download_dir, allowed_ae_titles=["REALPACS"]) as receiver:
        receiver.sink.expect(target.patient_id, target.study_instance_uid, target.series_instance_uid)
        with PacsClient(settings.pacs).session() as session:
            # The PACS cannot associate with our receiver, which it reports as A801.
            with pytest.raises(MoveDestinationUnknown, match="cannot connect"):
                session.move(target.study_instance_uid, target.series_instance_uid, "DICOM_ASSETS")
    assert not list(settings.paths.download_dir.rglob("*.dcm"))


def test_unknown_move_destination_names_the_ae_title(served) -> None:
    cohort, settings, _ = served
    target = cohort.series[0]
    with PacsClient(settings.pacs).session() as session:
        with pytest.raises(MoveDestinationUnknown, match="'NOT_REGISTERED'.*register"):
            session.move(target.study_instance_uid, target.series_instance_uid, "NOT_REGISTERED")


def test_c_get_series_and_image_level_subset(served) -> None:
    cohort, settings, _ = served
    target = cohort.series[1]
    sink = InstanceSink(settings.paths.download_dir)
    flight = sink.expect(target.patient_id, target.study_instance_uid, target.series_instance_uid)
    wanted = list(target.sop_instance_uids[:2])
    with PacsClient(settings.pacs).session(sink=sink) as session:
        final = session.get(target.study_instance_uid, target.series_instance_uid, wanted)
    assert final.succeeded
    assert sorted(instances_on_disk(flight.directory)) == sorted(wanted)
    assert flight.received == 2


def test_unreachable_pacs_is_pacs_unavailable(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, free_port(), free_port(), "sqlite://", timeout_s=2)
    with PacsClient(settings.pacs).session() as session:
        with pytest.raises(PacsUnavailable, match="cannot associate"):
            session.echo()
