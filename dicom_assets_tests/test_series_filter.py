"""Series filters (``selection.series``) and the ``skipped`` status: the filter and its reasons,
config errors, the store (PostgreSQL and SQLite), SOP class look-ups against the bundled PACS and
Orthanc, and a whole sync that skips a localizer and fetches it once the filter is removed."""

from __future__ import annotations

import csv
import sqlite3
import zipfile
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
import yaml

from dicom_assets.config import ConfigError, load_settings, settings_from_dict
from dicom_assets.config_selection import SOP_CLASS_GROUPS, SeriesFilterSettings
from dicom_assets.devpacs import DevPacs
from dicom_assets.devpacs.request_cohort import (
    PlannedSeries,
    PlannedStudy,
    WrittenCohort,
    write_planned_cohort,
)
from dicom_assets.discovery import discover_patients, discover_series, discover_studies
from dicom_assets.layout import archive_name, series_dir
from dicom_assets.pacs.client import PacsClient
from dicom_assets.series_filter import (
    DOSE_REPORTS,
    SeriesFacts,
    SeriesFilter,
    sop_class_group,
)
from dicom_assets.series_selection import apply_series_selection
from dicom_assets.store import (
    ArchiveRecord,
    PatientRecord,
    SeriesRecord,
    StateStore,
    StudyRecord,
)
from dicom_assets_tests.conftest import free_port
from dicom_assets_tests.pacs_fixtures import make_settings

CT = "1.2.840.10008.5.1.4.1.1.2"
ENHANCED_SR = "1.2.840.10008.5.1.4.1.1.88.22"
BASIC_TEXT_SR = "1.2.840.10008.5.1.4.1.1.88.11"
XRAY_DOSE_SR = "1.2.840.10008.5.1.4.1.1.88.67"
GSPS = "1.2.840.10008.5.1.4.1.1.11.1"
KOS = "1.2.840.10008.5.1.4.1.1.88.59"
RAW = "1.2.840.10008.5.1.4.1.1.66"
SEGMENTATION = "1.2.840.10008.5.1.4.1.1.66.4"
MINIMAL = {"pacs": {"host": "127.0.0.1", "port": 104, "called_ae_title": "PACS"},
           "paths": {"download_dir": "dl", "archive_dir": "zips", "report_dir": "reports"}}  # fmt: skip


def _filter(**series: Any) -> SeriesFilter:
    return SeriesFilter(SeriesFilterSettings.model_validate(series))


def _facts(**kw: Any) -> SeriesFacts:
    base: dict[str, Any] = {"series_instance_uid": "1.2.3", "study_instance_uid": "1.2", "patient_id": "P", "modality": "CT",
                            "series_description": "Axial 5.0 mm", "series_number": 2, "expected_instances": 40}  # fmt: skip
    return SeriesFacts(**{**base, **kw})


# -- the filter --------------------------------------------------------------------------------------


def test_no_filter_by_default_keeps_every_series() -> None:
    settings = settings_from_dict(MINIMAL)
    assert not settings.selection.series.active
    keep_all = SeriesFilter(settings.selection.series)
    for facts in (_facts(), _facts(modality="SR"), _facts(series_description="Localizer", expected_instances=1)):
        assert keep_all.skip_reason(facts) is None and not keep_all.needs_sop_classes(facts)


@pytest.mark.parametrize(
    ("series", "facts", "reason"),
    [
        ({"exclude": {"series_description": "localizer|scout"}}, {"series_description": "Localizer"},
         "exclude series_description /localizer|scout/ matched 'Localizer'"),
        ({"exclude": {"series_description": "localizer|scout"}}, {"series_description": "SCOUT 2"},
         "exclude series_description /localizer|scout/ matched 'SCOUT 2'"),
        ({"exclude": {"series_description": "localizer"}}, {"series_description": None}, None),
        ({"include": {"series_description": "axial"}}, {"series_description": "Coronal"},
         "series_description 'Coronal' does not match include series_description /axial/"),
        ({"include": {"modality": ["CT", "MR"]}}, {"modality": "SR"}, "modality SR not in include modality [CT, MR]"),
        ({"include": {"modality": "ct"}}, {"modality": "CT"}, None),
        ({"exclude": {"modality": ["SR", "PR"]}}, {"modality": "PR"}, "exclude modality [SR, PR] matched PR"),
        ({"include": {"series_number": [1, 2]}}, {"series_number": 99}, "series_number 99 not in include series_number [1, 2]"),
        ({"exclude": {"series_number": 99}}, {"series_number": 99}, "exclude series_number [99] matched 99"),
        ({"min_instances": 5}, {"expected_instances": 2}, "2 instances < min_instances 5"),
        ({"max_instances": 500}, {"expected_instances": 600}, "600 instances > max_instances 500"),
        ({"min_instances": 5}, {"expected_instances": None}, None),  # the PACS gave no count: kept
        ({"exclude": {"sop_class_groups": ["structured_reports"]}}, {"modality": "SR", "sop_classes": (ENHANCED_SR,)},
         f"SOP class group structured_reports excluded ({ENHANCED_SR})"),
        ({"exclude": {"sop_class_groups": ["presentation_states"]}}, {"modality": "PR"},
         "SOP class group presentation_states excluded (modality PR)"),
        ({"exclude": {"sop_class_groups": ["key_objects"]}}, {"modality": "KO"}, "SOP class group key_objects excluded (modality KO)"),
        ({"exclude": {"sop_class_groups": ["structured_reports"]}}, {"modality": "KO"}, None),  # a KOS is no report
        ({"exclude": {"sop_class_groups": ["structured_reports", "dose_reports"]}}, {"modality": "SR"},
         "SOP class groups dose_reports, structured_reports excluded (modality SR)"),
        ({"include": {"sop_class_groups": ["presentation_states"]}}, {"sop_classes": (CT,)},
         "SOP class group none (image classes) not in include sop_class_groups [presentation_states]"),
        # Only series holding nothing but excluded classes are skipped: a CT series with one raw object stays.
        ({"exclude": {"sop_class_groups": ["raw_data"]}}, {"sop_classes": (CT, RAW)}, None),
        ({"exclude": {"sop_class_groups": ["raw_data"]}}, {"sop_classes": (RAW,)}, f"SOP class group raw_data excluded ({RAW})"),
    ],
)  # fmt: skip
def test_skip_reasons_name_the_rule(series: dict[str, Any], facts: dict[str, Any], reason: str | None) -> None:
    assert _filter(**series).skip_reason(_facts(**facts)) == reason


def test_include_needs_every_key_and_exclude_any() -> None:
    rule = _filter(include={"modality": ["CT"], "series_description": "axial"}, exclude={"series_number": [3]})
    assert rule.skip_reason(_facts(modality="CT", series_description="AXIAL 1 mm")) is None
    assert rule.skip_reason(_facts(modality="MR", series_description="axial")).startswith("modality MR not in include")
    assert rule.skip_reason(_facts(modality="CT", series_description="Coronal")).startswith("series_description 'Coronal'")
    assert rule.skip_reason(_facts(modality="CT", series_description="axial", series_number=3)) == (
        "exclude series_number [3] matched 3"
    )


def test_sop_class_groups_by_uid() -> None:
    expected = {
        **dict.fromkeys(DOSE_REPORTS, "dose_reports"),
        ENHANCED_SR: "structured_reports",
        BASIC_TEXT_SR: "structured_reports",
        GSPS: "presentation_states",
        KOS: "key_objects",
        RAW: "raw_data",
        SEGMENTATION: "",
        CT: "",
    }
    assert {uid: sop_class_group(uid) for uid in expected} == expected
    assert len(DOSE_REPORTS) == 4
    assert set(SOP_CLASS_GROUPS) == {"structured_reports", "presentation_states", "key_objects", "raw_data", "dose_reports"}


def test_sop_classes_are_asked_for_only_where_they_decide() -> None:
    dose = _filter(exclude={"sop_class_groups": ["dose_reports"]})
    unknown_sr = _facts(modality="SR")
    assert dose.needs_sop_classes(unknown_sr) and dose.skip_reason(unknown_sr) is None  # unknown: fetched
    assert not dose.needs_sop_classes(_facts(modality="CT"))  # dose reports are SR
    # The study's SOPClassesInStudy settles it: no dose class in the study, or only dose SRs.
    assert not dose.needs_sop_classes(_facts(modality="SR", study_sop_classes=(CT, ENHANCED_SR)))
    assert dose.skip_reason(_facts(modality="SR", study_sop_classes=(CT, ENHANCED_SR))) is None
    only_dose = _facts(modality="SR", study_sop_classes=(CT, XRAY_DOSE_SR))
    assert not dose.needs_sop_classes(only_dose)
    assert dose.skip_reason(only_dose) == "SOP class group dose_reports excluded (modality SR and the study's SOP classes)"
    assert dose.needs_sop_classes(_facts(modality="SR", study_sop_classes=(CT, ENHANCED_SR, XRAY_DOSE_SR)))
    asked = _facts(modality="SR", sop_classes=(XRAY_DOSE_SR,))
    assert not dose.needs_sop_classes(asked) and dose.skip_reason(asked) == f"SOP class group dose_reports excluded ({XRAY_DOSE_SR})"
    refused = _facts(modality="SR", sop_classes=())  # asked, the PACS listed none: never asked again, fetched
    assert not dose.needs_sop_classes(refused) and dose.skip_reason(refused) is None
    # Both SR groups excluded: the Modality is enough.
    reports = _filter(exclude={"sop_class_groups": ["structured_reports", "dose_reports"]})
    assert not reports.needs_sop_classes(unknown_sr) and reports.skip_reason(unknown_sr) is not None
    # Raw data can hide in any series: asked unless the study says it holds none.
    raw = _filter(exclude={"sop_class_groups": ["raw_data"]})
    assert raw.needs_sop_classes(_facts()) and raw.skip_reason(_facts()) is None
    assert not raw.needs_sop_classes(_facts(study_sop_classes=(CT,)))
    assert raw.needs_sop_classes(_facts(study_sop_classes=(CT, RAW)))
    assert not raw.needs_sop_classes(_facts(modality="PR"))


# -- configuration -----------------------------------------------------------------------------------


def _config_error(series: Any) -> str:
    with pytest.raises(ConfigError) as caught:
        settings_from_dict({**MINIMAL, "selection": {"series": series}})
    return str(caught.value)


def test_config_errors_name_the_key_and_the_fix() -> None:
    message = _config_error({"exclude": {"series_description": "localizer|(scout"}})
    assert "selection.series.exclude.series_description: 'localizer|(scout' is not a valid Python regular expression" in message
    assert 'e.g. "localizer|scout"' in message
    message = _config_error({"include": {"sop_class_groups": ["structured_reports", "srs"]}})
    assert "selection.series.include.sop_class_groups: unknown SOP class group 'srs'; the known groups are " \
           "structured_reports, presentation_states, key_objects, raw_data, dose_reports" in message  # fmt: skip
    assert "selection.series: min_instances (9) must be <= max_instances (3)" in _config_error({"min_instances": 9, "max_instances": 3})
    assert "selection.series.exclude.description: unknown key" in _config_error({"exclude": {"description": "x"}})
    assert "selection.series.include.modality: 'C/T' is not a Modality code" in _config_error({"include": {"modality": ["C/T"]}})
    assert "selection.series.min_instances: Input should be greater than or equal to 0" in _config_error({"min_instances": -1})


def test_config_shapes_empty_blocks_and_scalars() -> None:
    series = settings_from_dict({**MINIMAL, "selection": {"series": None}}).selection.series
    assert not series.active
    series = settings_from_dict({**MINIMAL, "selection": {"series": {"exclude": None, "include": {"modality": "ct"}}}}).selection.series
    assert series.active and series.include.modality == ["CT"] and series.exclude.empty


def test_the_recommended_block_of_the_sample_config_works(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """config-sample.yaml ships the recommended filter commented out; uncommented, it loads and
    skips localizers and reports."""
    monkeypatch.setenv("DICOM_ASSETS_DB_PASSWORD", "secret")
    lines = (Path(__file__).resolve().parents[1] / "config-sample.yaml").read_text().splitlines()
    start = lines.index(next(line for line in lines if line.startswith("  # series:")))
    end = next(i for i in range(start, len(lines)) if not lines[i].startswith("  #"))
    lines[start:end] = [line[:2] + line[4:] for line in lines[start:end]]
    (tmp_path / "config.yaml").write_text("\n".join(lines) + "\n")
    rule = SeriesFilter(load_settings(tmp_path / "config.yaml").selection.series)
    assert rule.skip_reason(_facts(series_description="Topogram 0.6 T20f")) is not None
    for modality in ("SR", "PR", "KO"):
        assert rule.skip_reason(_facts(modality=modality, series_description="x")) is not None
    assert rule.skip_reason(_facts()) is None


# -- the store (PostgreSQL and SQLite) ---------------------------------------------------------------


def _seed(store: StateStore, patient_id: str, uids: list[str], study: str | None = None, **series: Any) -> None:
    study = study or f"9.{ord(patient_id[0])}"
    store.upsert_patients([PatientRecord(patient_id)])
    store.upsert_studies([StudyRecord(study, patient_id, sop_classes_in_study=series.pop("study_classes", None))])
    store.upsert_series([SeriesRecord(uid, study, patient_id, series_number=n, expected_instances=1, **series)
                         for n, uid in enumerate(uids, start=1)])  # fmt: skip


def _status(store: StateStore, uid: str) -> tuple[str, str | None]:
    s = store.get_series(uid)
    assert s is not None
    return s.download_status, s.skip_reason


def _set_status(store: StateStore, uid: str, status: str) -> None:
    with store.engine.begin() as conn:
        conn.execute(sa.text("UPDATE series SET download_status = :s WHERE series_instance_uid = :u"), {"s": status, "u": uid})


def test_skips_change_only_what_holds_nothing_finished(store: StateStore) -> None:
    uids = ["1.1", "1.2", "1.3", "1.4", "1.5", "1.6"]
    _seed(store, "A", uids)
    for uid, status in zip(uids, ("pending", "incomplete", "failed", "complete", "in_progress", "pending")):
        _set_status(store, uid, status)
    counts = store.apply_series_skips({uid: "rule X" for uid in uids[:5]} | {"1.6": None, "9.9.9": "unknown series"})
    assert (counts.skipped, counts.reason_changed, counts.unskipped, counts.held) == (3, 0, 0, 2)
    assert [_status(store, u) for u in uids] == [("skipped", "rule X")] * 3 + [("complete", None), ("in_progress", None),
                                                                                 ("pending", None)]  # fmt: skip
    # Same decisions again: nothing to write; a new rule updates the reason; None unskips.
    again = store.apply_series_skips({uid: "rule X" for uid in uids[:3]})
    assert (again.skipped, again.reason_changed, again.unskipped) == (0, 0, 0)
    changed = store.apply_series_skips({"1.1": "rule Y", "1.2": None})
    assert (changed.skipped, changed.reason_changed, changed.unskipped) == (0, 1, 1)
    assert _status(store, "1.1") == ("skipped", "rule Y") and _status(store, "1.2") == ("pending", None)
    assert store.status_counts()["skipped"] == 2


def test_skipped_series_are_never_claimed_retried_or_archived(store: StateStore) -> None:
    _seed(store, "A", ["1.1", "1.2"])
    _seed(store, "B", ["2.1"])
    _set_status(store, "1.2", "failed")
    store.apply_series_skips({"1.2": "rule", "2.1": "rule"})
    claimed = store.claim_next_series(["A", "B"], "w", 60)
    assert claimed is not None and claimed.series_instance_uid == "1.1"
    assert store.claim_next_series(["A", "B"], "w", 60) is None and not store.has_claimable_series(["A", "B"])
    assert store.series_to_retry(["failed", "incomplete"]) == []
    assert store.finish_series("1.1", "w", "complete", 1, 10)
    # A holds one series (its zip's N is 1); B holds none: no archive, and not pending either.
    [candidate] = store.archive_candidates()
    assert (candidate.patient_id, candidate.series_count) == ("A", 1)
    store.record_archive(ArchiveRecord("A", "A__seriesCount1.zip", 1, 1, 10, "x"))
    assert store.archive_candidates() == [] and store.patient_counts() == {"patients": 2, "archived": 1, "pending": 0}
    # Unskipped: pending (not a candidate until fetched), then complete: the held count 2 differs from the zip's.
    store.apply_series_skips({"1.2": None})
    assert store.archive_candidates() == [] and store.patient_counts()["pending"] == 1
    claimed = store.claim_next_series(["A"], "w", 60)
    assert claimed is not None and store.finish_series(claimed.series_instance_uid, "w", "complete", 1, 10)
    assert [(c.patient_id, c.series_count, c.archived_series_count) for c in store.archive_candidates()] == [("A", 2, 1)]


def test_a_patient_whose_series_are_all_skipped_gets_no_zip(store: StateStore, tmp_path: Path) -> None:
    from dicom_assets.archive import ArchiveNotReady, build_patient_archive

    _seed(store, "A", ["1.1", "1.2"])
    store.apply_series_skips({"1.1": "rule", "1.2": "rule"})
    with pytest.raises(ArchiveNotReady, match="all 2 of its series are skipped"):
        build_patient_archive(store, tmp_path / "dl", tmp_path / "zips", "A")
    assert not (tmp_path / "zips").exists() or not list((tmp_path / "zips").iterdir())


def test_series_facts_and_sop_classes(store: StateStore) -> None:
    _seed(store, "A", ["1.1", "1.2"], modality="SR", series_description="Dose Report", study_classes=f"{CT}\\{XRAY_DOSE_SR}")
    assert store.record_series_sop_classes({"1.1": XRAY_DOSE_SR, "1.2": ""}) == 2
    first, second = store.series_facts(["A", "nobody"])
    assert first == SeriesFacts("1.1", "9.65", "A", "SR", "Dose Report", 1, 1, (XRAY_DOSE_SR,), (CT, XRAY_DOSE_SR), "pending")
    assert second.sop_classes == () and second.series_number == 2
    inventory = [dict(zip([c.name for c in store.inventory_query().selected_columns], row))
                 for rows in store.iter_inventory_rows() for row in rows]  # fmt: skip
    assert [r["skip_reason"] for r in inventory] == [None, None]
    store.apply_series_skips({"1.1": "dose"})
    inventory = [dict(zip([c.name for c in store.inventory_query().selected_columns], row))
                 for rows in store.iter_inventory_rows() for row in rows]  # fmt: skip
    assert (inventory[0]["skip_reason"], inventory[0]["download_status"]) == ("dose", "skipped")


def test_an_old_sqlite_state_db_accepts_skipped(tmp_path: Path) -> None:
    """A SQLite state DB made before 'skipped' has the old CHECK; create_schema widens it once,
    in place (writable_schema), keeping every row, index and constraint."""
    fresh = StateStore(f"sqlite:///{tmp_path / 'fresh.sqlite'}")
    fresh.create_schema()
    with fresh.engine.connect() as conn:
        schema = [(n, sql) for n, sql in conn.exec_driver_sql(
            "SELECT name, sql FROM sqlite_master WHERE sql IS NOT NULL AND name NOT LIKE 'sqlite_%' "
            "ORDER BY CASE type WHEN 'table' THEN 0 WHEN 'index' THEN 1 ELSE 2 END")]  # fmt: skip
    fresh.dispose()
    old = sqlite3.connect(tmp_path / "old.sqlite")
    for _, sql in schema:  # the schema as it was: no 'skipped', no skip_reason / sop_classes columns
        for new in (", 'skipped'", ", \n\tskip_reason TEXT", ", \n\tsop_classes TEXT", ", \n\tsop_classes_in_study TEXT"):
            sql = sql.replace(new, "")
        old.execute(sql)
    assert "'skipped'" not in old.execute("SELECT sql FROM sqlite_master WHERE name = 'series'").fetchone()[0]
    old.execute("INSERT INTO patients (patient_id, partition_key) VALUES ('A', 'A')")
    old.execute("INSERT INTO studies (study_instance_uid, patient_id) VALUES ('1', 'A')")
    old.execute("INSERT INTO series (series_instance_uid, study_instance_uid, patient_id, download_status) "
                "VALUES ('1.1', '1', 'A', 'complete'), ('1.2', '1', 'A', 'pending')")  # fmt: skip
    old.commit()
    with pytest.raises(sqlite3.IntegrityError):
        old.execute("UPDATE series SET download_status = 'skipped' WHERE series_instance_uid = '1.2'")
    old.close()

    store = StateStore(f"sqlite:///{tmp_path / 'old.sqlite'}")
    store.create_schema()
    assert store.apply_series_skips({"1.2": "rule"}).skipped == 1
    assert _status(store, "1.2") == ("skipped", "rule") and _status(store, "1.1") == ("complete", None)
    with pytest.raises(sa.exc.IntegrityError):
        _set_status(store, "1.1", "bogus")
    store.create_schema()  # once: the stored SQL now has every status
    with store.engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA integrity_check").scalar_one() == "ok"
        sql = conn.exec_driver_sql("SELECT sql FROM sqlite_master WHERE name = 'series'").scalar_one()
    assert sql.count("'skipped'") == 1
    store.dispose()


def test_status_counts_skipped_series_and_retry_ignores_them(tmp_path: Path) -> None:
    import os
    import subprocess
    import sys

    from dicom_assets_tests.pacs_fixtures import offline_config

    config = offline_config(tmp_path / "c.yaml", "sqlite:///state.sqlite")
    store = StateStore(f"sqlite:///{tmp_path / 'state.sqlite'}")
    store.create_schema()
    _seed(store, "A", ["1.1", "1.2"])
    _seed(store, "B", ["2.1"])
    _set_status(store, "1.2", "failed")
    store.apply_series_skips({"1.2": "exclude modality [SR] matched SR", "2.1": "exclude modality [SR] matched SR"})
    store.dispose()
    env = {**os.environ, "DICOM_ASSETS_CONFIG": str(config)}

    def cli(*args: str) -> str:
        done = subprocess.run([sys.executable, "-m", "dicom_assets.cli", *args], cwd=tmp_path, env=env, capture_output=True,
                              text=True, timeout=120, check=False)  # fmt: skip
        assert done.returncode == 0, done.stderr
        return done.stdout

    status = cli("status")
    assert "skipped      2" in status and "pending      1" in status
    assert "patients     2 (0 archived, 1 pending, 1 with every series skipped)" in status
    assert "0 series would be made claimable again" in cli("retry", "--failed", "--incomplete", "--dry-run")


# -- against a PACS ----------------------------------------------------------------------------------

#: One patient: a CT study with a localizer, a CT series, a text SR and a dose SR; and a CT study
#: with a text SR only (no dose class in the study).
REPORTS = (
    PlannedStudy("SF-001", "20230105", "ACC-SF-1", "CT CHEST",
                 [PlannedSeries("CT", kind="localizer", slices=2), PlannedSeries("CT", slices=3),
                  PlannedSeries("SR", kind="sr"), PlannedSeries("SR", kind="dose_sr")], "mixed"),
    PlannedStudy("SF-001", "20230901", "ACC-SF-2", "CT HEAD", [PlannedSeries("CT", slices=2), PlannedSeries("SR", kind="sr")],
                 "no-dose"),
)  # fmt: skip


def _discover_all(client: PacsClient, store: StateStore) -> list[str]:
    discover_patients(client, store, lambda ds: True)
    ids = ["SF-001"]
    discover_studies(client, store, ids, every_patient=True)
    discover_series(client, store, ids, every_study=True)
    return ids


def _check_dose_filter(cohort: WrittenCohort, client: PacsClient, store: StateStore) -> bool:
    """Exclude dose reports: only SR series whose study may hold one are asked about, once; the
    dose SR is skipped naming its class, the text SRs are kept. Returns whether the PACS gave
    SOPClassesInStudy."""
    ids = _discover_all(client, store)
    mixed, no_dose = cohort.study("mixed"), cohort.study("no-dose")
    in_study = {s.study_instance_uid: s.sop_classes_in_study for s in store.studies_of("SF-001")}
    answered = in_study[mixed.study_instance_uid] is not None
    if answered:
        assert set(in_study[mixed.study_instance_uid].split("\\")) == set(mixed.sop_classes)
        assert set(in_study[no_dose.study_instance_uid].split("\\")) == set(no_dose.sop_classes)
    rule = SeriesFilter(SeriesFilterSettings.model_validate({"exclude": {"sop_class_groups": ["dose_reports"]}}))
    stats = apply_series_selection(store, client, ids, rule)
    assert stats.sop_class_queries == (2 if answered else 3)  # the mixed study's two SRs (+ the other SR without it)
    dose_sr = mixed.series[3]
    assert _status(store, dose_sr.series_instance_uid) == ("skipped", f"SOP class group dose_reports excluded ({XRAY_DOSE_SR})")
    assert stats.series_skipped == 1 and stats.skipped_total == 1 and stats.series_checked == 6
    for series in (mixed.series[2], no_dose.series[1]):
        assert _status(store, series.series_instance_uid) == ("pending", None)
    again = apply_series_selection(store, client, ids, rule)
    assert again.sop_class_queries == 0 and again.pacs_requests == 0 and again.series_skipped == 0
    asked = {f.series_instance_uid: f.sop_classes for f in store.series_facts(ids) if f.sop_classes is not None}
    assert asked[dose_sr.series_instance_uid] == (XRAY_DOSE_SR,) and asked[mixed.series[2].series_instance_uid] == (BASIC_TEXT_SR,)
    # No filter any more: the dose report goes back to pending; nothing is asked.
    unskipped = apply_series_selection(store, client, ids, SeriesFilter(SeriesFilterSettings()))
    assert unskipped.series_unskipped == 1 and unskipped.pacs_requests == 0
    assert _status(store, dose_sr.series_instance_uid) == ("pending", None)
    return answered


def test_sop_class_lookups_against_the_bundled_pacs(tmp_path: Path, pg_url: str) -> None:
    cohort = write_planned_cohort(tmp_path / "pacs", REPORTS, seed=11)
    store = StateStore(pg_url)
    store.create_schema()
    try:
        with DevPacs(tmp_path / "pacs") as pacs:
            settings = make_settings(tmp_path, pacs.port, free_port(), pg_url)
            _check_dose_filter(cohort, PacsClient(settings.pacs), store)
    finally:
        store.dispose()


def test_orthanc_answers_sop_classes_in_study(tmp_path: Path, pg_url: str) -> None:
    """Orthanc 1.10.1 computes SOPClassesInStudy: a study without a dose report costs no look-up."""
    from dicom_assets_tests.orthanc import ORTHANC_AET, RECEIVER_AET, running_orthanc

    cohort = write_planned_cohort(tmp_path / "cohort", REPORTS, seed=12)
    store = StateStore(pg_url)
    store.create_schema()
    try:
        with running_orthanc(tmp_path, free_port()) as orthanc:
            assert orthanc.load(tmp_path / "cohort") == cohort.instances
            settings = make_settings(tmp_path, orthanc.dicom_port, free_port(), pg_url, called_ae_title=ORTHANC_AET,
                                     calling_ae_title=RECEIVER_AET)  # fmt: skip
            assert _check_dose_filter(cohort, PacsClient(settings.pacs), store)
    finally:
        store.dispose()


# -- a whole sync through Dagster ----------------------------------------------------------------------


def _sync_config(path: Path, pacs_port: int, receiver_port: int, db_url: str, series: dict[str, Any] | None) -> None:
    selection: dict[str, Any] = {"patient_id_regex": "^SEL"}
    if series is not None:
        selection["series"] = series
    path.write_text(yaml.safe_dump({
        "pacs": {"host": "127.0.0.1", "port": pacs_port, "called_ae_title": "DEVPACS", "timeout_s": 10, "straggler_timeout_s": 1},
        "receiver": {"ae_title": "DICOM_ASSETS", "bind_address": "127.0.0.1", "port": receiver_port},
        "selection": selection,
        "paths": {"download_dir": "downloads", "archive_dir": "archives", "report_dir": "reports"},
        "database": {"url": db_url},
    }))  # fmt: skip


def _csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def _series_metadata() -> dict[str, Any]:
    import dagster as dg

    event = dg.DagsterInstance.get().get_latest_materialization_event(dg.AssetKey("series"))
    assert event is not None and event.asset_materialization is not None
    return {k: v.value for k, v in event.asset_materialization.metadata.items()}


def test_sync_skips_a_localizer_then_fetches_it_once_the_filter_is_removed(
    tmp_path: Path, pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from dicom_assets.sync import run_sync

    study = PlannedStudy("SEL-001", "20240102", "ACC-SEL", "CT CHEST",
                         [PlannedSeries("CT", kind="localizer", slices=2), PlannedSeries("CT", "Axial 5.0 mm", slices=3)])  # fmt: skip
    cohort = write_planned_cohort(tmp_path / "pacs", [study], seed=5)
    localizer, axial = cohort.series
    assert localizer.series_description == "Localizer"
    receiver_port = free_port()
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "dagster_home"))
    config = tmp_path / "config.yaml"
    monkeypatch.setenv("DICOM_ASSETS_CONFIG", str(config))
    reason = "exclude series_description /localizer|scout/ matched 'Localizer'"
    with DevPacs(tmp_path / "pacs", move_destinations={"DICOM_ASSETS": ("127.0.0.1", receiver_port)}) as pacs:
        _sync_config(config, pacs.port, receiver_port, pg_url, {"exclude": {"series_description": "localizer|scout"}})
        report = run_sync(config, progress=False)
        assert report.ok, report
        assert (report.status_counts["complete"], report.status_counts["skipped"]) == (1, 1)
        metadata = _series_metadata()
        assert (metadata["series_skipped"], metadata["series_unskipped"], metadata["sop_class_queries"]) == (1, 0, 0)

        zips = sorted(p.name for p in (tmp_path / "archives").glob("*.zip"))
        assert zips == [archive_name("SEL-001", "__seriesCount", 1)] == ["SEL-001__seriesCount1.zip"]
        with zipfile.ZipFile(tmp_path / "archives" / zips[0]) as zf:
            assert {name.split("/")[2] for name in zf.namelist()} == {axial.series_instance_uid}
        assert not series_dir(tmp_path / "downloads", "SEL-001", localizer.study_instance_uid, localizer.series_instance_uid).exists()
        inventory = {r["series_instance_uid"]: r for r in _csv(tmp_path / "reports" / "inventory.csv")}
        assert (inventory[localizer.series_instance_uid]["download_status"], inventory[localizer.series_instance_uid]["skip_reason"]) == (
            "skipped", reason)
        assert (inventory[axial.series_instance_uid]["download_status"], inventory[axial.series_instance_uid]["skip_reason"]) == (
            "complete", "")
        validation = {r["series_instance_uid"]: r for r in _csv(tmp_path / "reports" / "validation" / "SEL-001.csv")}
        assert (validation[localizer.series_instance_uid]["outcome"], validation[localizer.series_instance_uid]["skip_reason"]) == (
            "skipped", reason)
        assert validation[axial.series_instance_uid]["outcome"] == "ok"
        assert report.check_failures == 0

        # The filter goes: the localizer is wanted again, fetched, and the zip rebuilt with N = 2.
        _sync_config(config, pacs.port, receiver_port, pg_url, None)
        again = run_sync(config, progress=False)
        assert again.ok, again
        assert (again.status_counts["complete"], again.status_counts["skipped"]) == (2, 0)
        assert _series_metadata()["series_unskipped"] == 1
    assert sorted(p.name for p in (tmp_path / "archives").glob("*.zip")) == ["SEL-001__seriesCount2.zip"]
    with zipfile.ZipFile(tmp_path / "archives" / "SEL-001__seriesCount2.zip") as zf:
        assert len(zf.namelist()) == localizer.instances + axial.instances
    inventory = {r["series_instance_uid"]: r for r in _csv(tmp_path / "reports" / "inventory.csv")}
    assert inventory[localizer.series_instance_uid]["download_status"] == "complete"
    assert inventory[localizer.series_instance_uid]["skip_reason"] == ""

