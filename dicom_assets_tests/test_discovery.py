"""Discovery against the bundled PACS: selection rules, hostile IDs, what gets stored."""

from __future__ import annotations

from pathlib import Path

import pytest

from dicom_assets.discovery import discover_patients, discover_series, discover_studies
from dicom_assets.layout import patient_key
from dicom_assets.pacs.client import PacsClient
from dicom_assets.store import StateStore
from dicom_assets_tests.conftest import free_port
from dicom_assets_tests.pacs_fixtures import HOSTILE_PATIENT_IDS, make_settings, small_cohort


@pytest.fixture
def served(tmp_path: Path, sqlite_url: str):
    from dicom_assets.devpacs import DevPacs

    cohort = small_cohort(tmp_path / "pacs")
    with DevPacs(tmp_path / "pacs") as pacs:
        settings = make_settings(tmp_path, pacs.port, free_port(), sqlite_url)
        store = StateStore(sqlite_url)
        store.create_schema()
        yield cohort, PacsClient(settings.pacs), store, pacs
        store.dispose()


def test_a_rule_that_raises_skips_only_that_patient(served) -> None:
    cohort, client, store, _ = served

    def picky(identifier) -> bool:  # noqa: ANN001 - a user's rule
        if "/" in identifier.PatientID:
            raise ValueError("unexpected ID format")
        return True

    keys, stats = discover_patients(client, store, picky)
    assert stats.found == 3 and stats.kept == 2
    assert stats.skipped == ["PAT 002/.."]
    assert keys == sorted(patient_key(p) for p in HOSTILE_PATIENT_IDS if "/" not in p)
    assert store.get_patient("PAT 002/..") is None


def test_studies_and_series_are_keyed_by_uid_with_expected_counts(served) -> None:
    cohort, client, store, pacs = served
    discover_patients(client, store, lambda ds: True)
    ids = list(cohort.patients)
    studies = discover_studies(client, store, ids)
    series = discover_series(client, store, ids)
    assert studies.inserted == 3 and series.inserted == 6
    for generated in cohort.series:
        state = store.get_series(generated.series_instance_uid)
        assert state.patient_id == generated.patient_id
        assert state.study_instance_uid == generated.study_instance_uid
        assert state.expected_instances == generated.instances
        assert state.download_status == "pending"
    before = pacs.requests_served
    again = discover_series(client, store, ids)
    assert again.inserted == 0 and again.updated == 0
    assert again.requests == pacs.requests_served - before == 1 + 3  # association + one C-FIND per study


def test_patient_demographics_are_stored(served) -> None:
    cohort, client, store, _ = served
    discover_patients(client, store, lambda ds: True)
    patient = store.get_patient(cohort.patients[0])
    assert patient.patient_name and patient.patient_sex in ("M", "F", "O")
    assert patient.patient_birth_date and len(patient.patient_birth_date) == 8
