"""Discovery against the bundled PACS: selection rules, hostile IDs, what gets stored, and what
incremental discovery costs in PACS requests (counted by the PACS itself) on PostgreSQL."""

from __future__ import annotations

from datetime import date, datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Callable, Iterator

import dagster as dg
import pytest
import sqlalchemy as sa
import yaml
from pydicom import dcmread
from pydicom.uid import generate_uid

from dicom_assets.config import DiscoverySettings
from dicom_assets.devpacs import CohortSpec, CohortSummary, DevPacs, add_series, generate_cohort
from dicom_assets.discovery import PassStats, discover_pass, discover_patients, discover_series, discover_studies, plan_pass
from dicom_assets.layout import patient_key
from dicom_assets.pacs.client import PacsClient
from dicom_assets.store import PatientRecord, StateStore, StudyRecord
from dicom_assets_tests.conftest import free_port
from dicom_assets_tests.pacs_fixtures import HOSTILE_PATIENT_IDS, make_settings, small_cohort

TODAY = date.today()
POLICY = DiscoverySettings()


@pytest.fixture
def served(tmp_path: Path, sqlite_url: str):
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
    studies = discover_studies(client, store, ids)  # new patients: one C-FIND each
    series = discover_series(client, store, ids)  # new studies: one C-FIND each
    assert studies.inserted == 3 and studies.patients_queried == 3 and series.inserted == 6
    for generated in cohort.series:
        state = store.get_series(generated.series_instance_uid)
        assert state.patient_id == generated.patient_id
        assert state.study_instance_uid == generated.study_instance_uid
        assert state.expected_instances == generated.instances
        assert state.download_status == "pending"
    before = pacs.requests_served
    again = discover_series(client, store, ids)  # nothing outdated: no association, no C-FIND
    assert again.studies_queried == 0 and again.requests == 0 == pacs.requests_served - before
    refresh = discover_series(client, store, ids, every_study=True)  # a manual refresh asks about every study
    assert refresh.inserted == 0 and refresh.updated == 0
    assert refresh.requests == pacs.requests_served - before == 1 + 3  # association + one C-FIND per study


def test_patient_demographics_are_stored(served) -> None:
    cohort, client, store, _ = served
    discover_patients(client, store, lambda ds: True)
    patient = store.get_patient(cohort.patients[0])
    assert patient.patient_name and patient.patient_sex in ("M", "F", "O")
    assert patient.patient_birth_date and len(patient.patient_birth_date) == 8


# -- incremental discovery ------------------------------------------------------------------------


class Site:
    """A generated cohort served by the bundled PACS, a PostgreSQL state DB, and one discovery
    pass at a time as a sync runs it: the pass, then studies and series over every patient."""

    def __init__(self, root: Path, cohort: CohortSummary, pacs: DevPacs, store: StateStore, client: PacsClient) -> None:
        self.root, self.cohort, self.pacs, self.store, self.client = root, cohort, pacs, store, client

    def sync_discovery(self, rule: Callable[[Any], bool] = lambda ds: True, full: bool = False) -> dict[str, Any]:
        """One pass; returns the requests the PACS served by kind and each step's figures."""
        self.pacs.rescan()
        before = self.pacs.requests_by_kind()
        keys, passed = discover_pass(self.client, self.store, rule, POLICY, force_full=full)
        ids = list(self.store.patient_ids_for_keys(keys).values())
        studies = discover_studies(self.client, self.store, ids)
        series = discover_series(self.client, self.store, ids)
        after = self.pacs.requests_by_kind()
        served = {kind: after.get(kind, 0) - before.get(kind, 0) for kind in ("ASSOCIATION", "C-FIND")}
        assert passed.requests + studies.requests + series.requests == sum(served.values())  # client and PACS agree
        return {**served, "total": sum(served.values()), "pass": passed, "studies": studies, "series": series}

    def add_study(self, patient_id: str, study_date: date) -> tuple[str, str]:
        """A new one-series, one-instance study of the patient dated ``study_date`` (a copy of
        one of its instances with new UIDs); returns (study uid, series uid)."""
        source = next(s for s in self.cohort.series if s.patient_id == patient_id)
        ds = dcmread(self.root / "pacs" / source.study_instance_uid / source.series_instance_uid / f"{source.sop_instance_uids[0]}.dcm")
        study, series, sop = generate_uid(), generate_uid(), generate_uid()
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = study, series, sop
        ds.file_meta.MediaStorageSOPInstanceUID = sop
        ds.StudyDate = ds.SeriesDate = ds.ContentDate = study_date.strftime("%Y%m%d")
        (self.root / "pacs" / study / series).mkdir(parents=True)
        ds.save_as(self.root / "pacs" / study / series / f"{sop}.dcm", enforce_file_format=True)
        return study, series

    def old_study(self, patient_id: str) -> str:
        return next(s.study_instance_uid for s in self.cohort.series if s.patient_id == patient_id)


@pytest.fixture
def make_site(tmp_path: Path, pg_url: str) -> Iterator[Callable[..., Site]]:
    """``make_site(patients, studies_per_patient, max_find_results=0)``: tiny one-slice images."""
    started: list[tuple[DevPacs, StateStore]] = []

    def build(patients: int = 4, studies_per_patient: int = 2, max_find_results: int = 0) -> Site:
        spec = CohortSpec(patients=patients, studies_per_patient=studies_per_patient, series_per_study=2,
                          slices_per_series=1, rows=8, columns=8, patient_id_prefix="P", seed=11)  # fmt: skip
        cohort = generate_cohort(tmp_path / "pacs", spec)
        pacs = DevPacs(tmp_path / "pacs", max_find_results=max_find_results).start()
        store = StateStore(pg_url)
        store.create_schema()
        started.append((pacs, store))
        settings = make_settings(tmp_path, pacs.port, free_port(), pg_url, max_find_results=max_find_results)
        return Site(tmp_path, cohort, pacs, store, PacsClient(settings.pacs))

    yield build
    for pacs, store in started:
        pacs.stop()
        store.dispose()


def test_first_pass_asks_once_per_study_and_an_unchanged_pacs_costs_under_5_percent(make_site) -> None:
    site = make_site(patients=60, studies_per_patient=2)
    first = site.sync_discovery()
    passed: PassStats = first["pass"]
    assert passed.full_pass and passed.windows == 1 and passed.studies_found == 120 and passed.patients_to_check == 0
    # 1 patient query + 1 date window + 1 series query per study; no per-patient study query.
    assert first["C-FIND"] == 1 + 1 + 120
    assert first["ASSOCIATION"] == 2  # the pass's and the series step's (the studies step sent nothing)
    assert first["studies"].patients_queried == 0 and first["series"].studies_queried == 120
    assert len(site.store.all_series_uids()) == len(site.cohort.series) == 240

    second = site.sync_discovery()
    assert not second["pass"].full_pass and second["pass"].studies_found == 0  # the cohort is older than 30 days
    assert (second["C-FIND"], second["ASSOCIATION"]) == (2, 1)  # patient query + one window, one association
    assert second["total"] * 20 <= first["total"]  # 3 of 124 requests: 2.4 %
    assert second["studies"].requests == second["series"].requests == 0


def test_second_pass_finds_a_recent_study_and_a_series_added_to_a_recent_study(make_site) -> None:
    site = make_site(patients=4)
    a, b = site.cohort.patients[:2]
    recent, _ = site.add_study(a, TODAY - timedelta(days=3))
    assert site.sync_discovery()["pass"].studies_found == 9

    new_study, new_series = site.add_study(b, TODAY)
    found = site.sync_discovery()
    assert found["pass"].studies_found == 2 and found["pass"].studies_inserted == 1  # the window holds both recent studies
    assert found["C-FIND"] == 1 + 1 + 1  # patients, the window, the series of the new study
    assert found["studies"].patients_queried == 0  # b's new counts are explained by the window's study
    assert site.store.get_series(new_series).study_instance_uid == new_study

    added = add_series(site.root / "pacs", a, study_instance_uid=recent, slices=2, rows=8, columns=8)
    changed = site.sync_discovery()
    assert changed["C-FIND"] == 1 + 1 + 1  # the study's related counts changed: its series asked for again
    state = site.store.get_series(added.series_instance_uid)
    assert state.study_instance_uid == recent and state.expected_instances == 2 and state.download_status == "pending"


def test_a_series_added_to_an_old_study_is_found(make_site) -> None:
    site = make_site(patients=4)
    a, b = site.cohort.patients[:2]
    site.sync_discovery()

    # Incremental: the window does not reach the study, but the patient's counts changed.
    incremental = add_series(site.root / "pacs", a, study_instance_uid=site.old_study(a), slices=1, rows=8, columns=8)
    found = site.sync_discovery()
    assert not found["pass"].full_pass and found["pass"].patients_to_check == 1
    assert found["C-FIND"] == 1 + 1 + 1 + 1  # patients, window, the patient's studies, that study's series
    assert site.store.get_series(incremental.series_instance_uid) is not None

    # Full: the one window holds every study, so the changed study is seen directly.
    full = add_series(site.root / "pacs", b, study_instance_uid=site.old_study(b), slices=1, rows=8, columns=8)
    found = site.sync_discovery(full=True)
    assert found["pass"].full_pass and found["pass"].patients_to_check == 0
    assert found["C-FIND"] == 1 + 1 + 1  # patients, every study, that study's series
    assert site.store.get_series(full.series_instance_uid).study_instance_uid == site.old_study(b)


def test_a_patient_selected_later_gets_its_old_studies(make_site) -> None:
    site = make_site(patients=4)
    late = site.cohort.patients[-1]
    site.sync_discovery(rule=lambda ds: ds.PatientID != late)
    assert site.store.get_patient(late) is None and len(site.store.all_series_uids()) == 12

    found = site.sync_discovery()  # incremental: the window holds none of its (old) studies
    assert not found["pass"].full_pass and found["pass"].patients_to_check == 1
    assert found["studies"].patients_queried == 1 and found["series"].studies_queried == 2
    assert found["C-FIND"] == 1 + 1 + 1 + 2
    assert sorted(site.store.all_series_uids()) == sorted(s.series_instance_uid for s in site.cohort.series)


def test_capped_windows_are_split_until_complete(make_site) -> None:
    site = make_site(patients=20, studies_per_patient=3, max_find_results=25)  # 20 patients fit, 60 studies do not
    first = site.sync_discovery()
    passed: PassStats = first["pass"]
    assert passed.studies_found == 60 and passed.patients_to_check == 0
    assert passed.windows >= 4  # the whole-range query, then halves until each part is below the cap
    assert first["C-FIND"] == 1 + passed.windows + 60


def test_pass_plan_full_on_first_pass_when_due_or_asked_else_from_watermark(pg_store: StateStore) -> None:
    key = "127.0.0.1:104/PACS"
    policy = DiscoverySettings(recheck_days=10, full_every_days=7)
    assert plan_pass(pg_store, key, policy).full  # no watermark yet
    pg_store.record_discovery_pass(key, "20260301", full_pass=True)
    now = datetime.now(timezone.utc)
    plan = plan_pass(pg_store, key, policy, today=date(2026, 3, 2), now=now)
    assert not plan.full and plan.since == date(2026, 2, 19)
    assert plan_pass(pg_store, key, policy, force_full=True, now=now).full
    assert plan_pass(pg_store, key, policy, today=date(2026, 3, 2), now=now + timedelta(days=7)).full
    pg_store.record_discovery_pass(key, "20260305", full_pass=False)  # an incremental pass keeps the full pass's time
    mark = pg_store.discovery_watermark(key)
    assert mark.watermark == "20260305" and mark.full_pass_at is not None and mark.full_pass_at <= mark.passed_at
    assert plan_pass(pg_store, key, policy, today=date(2026, 3, 6), now=now).since == date(2026, 2, 23)


@pytest.mark.parametrize("record", ["none", "older schema.sql"])
def test_an_existing_database_upgrades_and_checks_everything_once(pg_store: StateStore, record: str) -> None:
    pg_store.upsert_patients([PatientRecord("OLD")])
    pg_store.upsert_studies([StudyRecord("1.2.3", "OLD")])
    with pg_store.engine.begin() as conn:  # the schema before incremental discovery
        conn.exec_driver_sql("DROP TABLE discovery_watermarks")
        if record == "none":  # schema.sql before schema_applied
            conn.exec_driver_sql("DROP TABLE schema_applied")
        else:
            conn.exec_driver_sql("UPDATE schema_applied SET sha256 = 'an older text'")
        for table, column in (("patients", "related_studies"), ("patients", "related_series"), ("patients", "related_instances"),
                              ("patients", "studies_outdated_at"), ("studies", "related_series"),
                              ("studies", "related_instances"), ("studies", "series_outdated_at")):  # fmt: skip
            conn.exec_driver_sql(f"ALTER TABLE {table} DROP COLUMN {column}")
    pg_store.create_schema()
    assert [r.key for r in pg_store.patients_to_query_for_studies(["OLD"])] == ["OLD"]
    assert [r.key for r in pg_store.studies_to_query_for_series(["OLD"])] == ["1.2.3"]
    assert pg_store.discovery_watermark("any") is None


# -- the Dagster layer ----------------------------------------------------------------------------


def test_patients_asset_reports_the_pass_and_the_tag_forces_a_full_one(tmp_path: Path, pg_url: str) -> None:
    from dicom_assets.defs.discovery.assets import FULL_DISCOVERY_TAG, patients
    from dicom_assets.defs.resources import DicomAssetsResource

    small_cohort(tmp_path / "pacs")
    with DevPacs(tmp_path / "pacs") as pacs:
        config = tmp_path / "config.yaml"
        raw = {
            "pacs": {"host": "127.0.0.1", "port": pacs.port, "called_ae_title": "DEVPACS"},
            "paths": {"download_dir": "dl", "archive_dir": "zips", "report_dir": "reports"},
            "database": {"url": pg_url},
        }
        config.write_text(yaml.safe_dump(raw))
        resources = {"dicom": DicomAssetsResource(config_path=str(config))}
        instance = dg.DagsterInstance.ephemeral()

        def metadata(**tags: str) -> dict[str, Any]:
            result = dg.materialize([patients], resources=resources, instance=instance, tags=tags)
            [mat] = result.asset_materializations_for_node("patients")
            return {k: v.value for k, v in mat.metadata.items()}

        first, second = metadata(), metadata()
        forced = metadata(**{FULL_DISCOVERY_TAG: "true"})
    assert (first["full_pass"], second["full_pass"], forced["full_pass"]) == (1, 0, 1)
    assert first["windows"] == 1 and first["studies_found"] == 3 and first["series_to_check"] == 3
    assert second["pacs_requests"] == 3 and second["studies_found"] == 0  # association, patients, one window
    assert forced["studies_found"] == 3 and forced["series_to_check"] == 3  # nothing asked for series yet
    assert first["partitions_added"] == 3 and second["partitions_added"] == 0
    store = StateStore(pg_url)
    try:
        with store.engine.connect() as conn:
            assert conn.execute(sa.text("SELECT count(*) FROM discovery_watermarks")).scalar_one() == 1
    finally:
        store.dispose()
