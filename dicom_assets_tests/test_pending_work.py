"""Patients with work no pipeline run has seen (store/pending_work.py), on PostgreSQL and SQLite:
what the sensor new_patient_work asks runs for, once per change."""

from __future__ import annotations

import time

from dicom_assets.store import PatientRecord, SeriesRecord, StudyRecord
from dicom_assets.store.incremental import RelatedCounts


def _keys(store) -> list[str]:  # noqa: ANN001
    return [w.patient_id for w in store.patients_with_unseen_work()]


def _tick() -> None:
    """Let the clock move on (SQLite's "now" is Python's clock; marks compare by time)."""
    time.sleep(0.01)


def test_new_patients_have_unseen_work_until_a_pipeline_starts_on_them(store) -> None:  # noqa: ANN001
    store.upsert_patients([PatientRecord("A"), PatientRecord("B")])
    assert sorted(_keys(store)) == ["A", "B"]  # new: their studies were never asked for
    _tick()
    store.mark_pipeline_started(["A"])
    assert _keys(store) == ["B"]
    [b] = store.patients_with_unseen_work()
    assert b.partition_key == "B" and b.marked_at.tzinfo is not None


def test_work_left_by_a_run_that_could_not_finish_is_not_asked_for_again(store) -> None:  # noqa: ANN001
    store.upsert_patients([PatientRecord("A")])
    _tick()
    store.mark_pipeline_started(["A"])  # the run starts, then the PACS goes down: the mark stays
    assert [row.key for row in store.patients_to_query_for_studies(["A"])] == ["A"]
    assert _keys(store) == []  # the retrieval schedule retries it, not every sensor tick


def test_a_changed_count_a_new_study_and_a_new_series_are_new_work(store) -> None:  # noqa: ANN001
    store.upsert_patients([PatientRecord("A"), PatientRecord("B")])
    store.record_patient_counts({"A": RelatedCounts(studies=1, series=1, instances=3)})
    store.mark_studies_discovered(store.patients_to_query_for_studies(["A", "B"]))
    _tick()
    store.mark_pipeline_started(["A", "B"])
    assert _keys(store) == []

    _tick()
    store.record_patient_counts({"A": RelatedCounts(studies=1, series=2, instances=5)})  # a series added on the PACS
    assert _keys(store) == ["A"]
    _tick()
    store.mark_pipeline_started(["A"])
    store.mark_studies_discovered(store.patients_to_query_for_studies(["A"]))
    assert _keys(store) == []

    _tick()
    store.upsert_studies([StudyRecord("1.2.3", "B")])  # a study found by the date window
    assert _keys(store) == ["B"]
    _tick()
    store.mark_pipeline_started(["B"])
    store.mark_series_discovered(store.studies_to_query_for_series(["B"]))
    assert _keys(store) == []

    _tick()
    store.upsert_series([SeriesRecord("1.2.3.4", "1.2.3", "B", expected_instances=2)])  # stored by a run that died
    assert _keys(store) == ["B"]
    claim = store.claim_next_series(["B"], "worker-1", 60.0)
    assert claim is not None  # a series some run claimed is that run's work, not new work
    assert _keys(store) == []
