"""Inventory: StateStore.iter_inventory and write_inventory against PostgreSQL and SQLite."""

from __future__ import annotations

import re
from pathlib import Path

import pandas as pd
import pytest

from dicom_assets import inventory
from dicom_assets.inventory import INVENTORY_COLUMNS, write_inventory
from dicom_assets.store import ArchiveRecord, PatientRecord, SeriesRecord, StateStore, StudyRecord


@pytest.fixture
def seeded(store: StateStore) -> StateStore:
    return _seed(store)


def _seed(store: StateStore) -> StateStore:
    store.upsert_patients(
        [PatientRecord("B", "Doe^Bea", "F", "19800101"), PatientRecord("A", "Roe^Al", "M"), PatientRecord("a/b"),
         PatientRecord("no-series")]
    )
    store.upsert_studies(
        [
            StudyRecord("1.1", "A", study_date="20210101", modalities_in_study="CT\\SR"),
            StudyRecord("1.2", "A", study_date="20200101", accession_number="ACC2"),
            StudyRecord("2.1", "B"),
            StudyRecord("3.1", "a/b", study_date="20220101"),
        ]
    )
    store.upsert_series(
        [
            SeriesRecord("1.1.2", "1.1", "A", 2, "SR", expected_instances=1),
            SeriesRecord("1.1.1", "1.1", "A", 1, "CT", "Head, \"axial\"", expected_instances=10),
            SeriesRecord("1.2.1", "1.2", "A", None, "CT", expected_instances=None),
            SeriesRecord("2.1.1", "2.1", "B", 1, "MR", expected_instances=3),
            SeriesRecord("3.1.1", "3.1", "a/b", 1, "US", expected_instances=4),
        ]
    )
    claimed = store.claim_next_series(["B"], "w", 60)
    store.finish_series(claimed.series_instance_uid, "w", "complete", 3, 3000)
    claimed = store.claim_next_series(["a/b"], "w", 60)
    store.finish_series(claimed.series_instance_uid, "w", "failed", 1, 500, error="C-MOVE failed:\nA700")
    store.record_archive(ArchiveRecord("B", "B__seriesCount0.zip", 0, 0, 1, "x"))
    store.record_archive(ArchiveRecord("B", "B__seriesCount1.zip", 1, 3, 1, "y"))
    return store


def test_query_columns_match_inventory_columns(store: StateStore) -> None:
    assert tuple(c.name for c in store.inventory_query().selected_columns) == INVENTORY_COLUMNS
    assert len(INVENTORY_COLUMNS) == 34 and INVENTORY_COLUMNS[-2:] == ("skip_reason", "deid_excluded_reason")


def test_iter_inventory_chunks_and_order(seeded: StateStore) -> None:
    chunks = list(seeded.iter_inventory(chunk_rows=2))
    assert [len(c) for c in chunks] == [2, 2, 1]
    frame = pd.concat(chunks, ignore_index=True)
    assert tuple(frame.columns) == INVENTORY_COLUMNS
    # patient_id, then study_date (NULL last), study uid, series_number (NULL last), series uid
    assert list(frame["series_instance_uid"]) == ["1.2.1", "1.1.1", "1.1.2", "2.1.1", "3.1.1"]
    assert list(frame["partition_key"]) == ["A", "A", "A", "B", "a%2Fb"]
    assert str(frame["series_number"].dtype) == "Int64" and pd.isna(frame["series_number"][0])
    assert list(frame["archive_name"].where(frame["archive_name"].notna(), None)) == [
        None, None, None, "B__seriesCount1.zip", None]
    b = frame[frame["patient_id"] == "B"].iloc[0]
    assert (b["download_status"], b["downloaded_instances"], b["downloaded_bytes"], b["attempts"]) == ("complete", 3, 3000, 0)  # complete: no attempt counted
    assert b["downloaded_at"].tzinfo is not None and pd.isna(frame["downloaded_at"][0])
    assert list(seeded.iter_inventory()) != [] and len(list(seeded.iter_inventory())[0]) == 5


def test_write_inventory(seeded: StateStore, tmp_path: Path) -> None:
    out = tmp_path / "reports" / "inventory.csv"
    stats = write_inventory(seeded, out, chunk_rows=2)
    assert stats.path == out
    assert (stats.rows, stats.patients, stats.studies, stats.bytes) == (5, 3, 4, 3500)
    assert stats.by_status == {"pending": 3, "in_progress": 0, "complete": 1, "incomplete": 0, "failed": 1, "skipped": 0}
    assert stats.seconds >= 0
    frame = pd.read_csv(out, dtype=str, keep_default_na=False)
    assert tuple(frame.columns) == INVENTORY_COLUMNS
    assert len(frame) == 5
    first = frame.iloc[1]  # 1.1.1
    assert (first["series_number"], first["expected_instances"], first["series_description"]) == ("1", "10", 'Head, "axial"')
    assert first["modalities_in_study"] == "CT\\SR"
    assert frame.iloc[0]["series_number"] == "" and frame.iloc[0]["expected_instances"] == ""
    assert frame.iloc[0]["accession_number"] == "ACC2"
    assert frame.iloc[4]["last_error"] == "C-MOVE failed:\nA700" and frame.iloc[4]["patient_id"] == "a/b"
    assert frame.iloc[3]["archive_name"] == "B__seriesCount1.zip" and frame.iloc[3]["downloaded_at"].startswith("20")
    assert [p.name for p in out.parent.iterdir()] == ["inventory.csv"]


def test_write_inventory_empty(store: StateStore, tmp_path: Path) -> None:
    stats = write_inventory(store, tmp_path / "inventory.csv")
    assert (stats.rows, stats.patients, stats.studies, stats.bytes) == (0, 0, 0, 0)
    assert (tmp_path / "inventory.csv").read_text() == ",".join(INVENTORY_COLUMNS) + "\n"


def test_write_inventory_is_atomic(seeded: StateStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "inventory.csv"
    out.write_text("previous inventory\n")
    real_iter = seeded.iter_inventory_rows

    def failing_iter(chunk_rows: int = 10_000):
        chunks = real_iter(chunk_rows)
        yield next(chunks)
        raise RuntimeError("database went away")

    monkeypatch.setattr(seeded, "iter_inventory_rows", failing_iter)
    with pytest.raises(RuntimeError, match="went away"):
        write_inventory(seeded, out, chunk_rows=2)
    assert out.read_text() == "previous inventory\n"
    assert [p.name for p in tmp_path.iterdir() if p.name != "state.sqlite" and not p.name.startswith("state.sqlite")] == [
        "inventory.csv"]
    monkeypatch.undo()
    assert write_inventory(seeded, out).rows == 5
    assert inventory.INVENTORY_COLUMNS[0] == "patient_id"


def test_inventory_problems_and_summary(seeded: StateStore, tmp_path: Path) -> None:
    from dicom_assets.inventory import inventory_problems

    out = tmp_path / "inventory.csv"
    stats = write_inventory(seeded, out, chunk_rows=2)
    assert inventory_problems(seeded, out) == (5, [])
    assert sum(stats.by_status_modality.values()) == 5
    assert sum(stats.bytes_by_month.values()) == stats.bytes
    markdown = stats.summary_markdown()
    assert "| status |" in markdown and "Downloaded MB by study month" in markdown
    lines = out.read_text().splitlines(keepends=True)
    out.write_text("".join(lines[:2] + lines[1:2] + lines[3:]))  # row 2 twice, row 3 gone
    rows, problems = inventory_problems(seeded, out)
    assert rows == 5
    assert any("more than once" in p for p in problems) and any("not in the inventory" in p for p in problems)
    assert inventory_problems(seeded, tmp_path / "nope.csv")[1] == [f"{tmp_path / 'nope.csv'} does not exist: materialize inventory"]


def test_iter_inventory_rows_streams_tuples_in_chunks(seeded: StateStore) -> None:
    chunks = list(seeded.iter_inventory_rows(chunk_rows=2))
    assert [len(c) for c in chunks] == [2, 2, 1]
    rows = [row for chunk in chunks for row in chunk]
    assert all(isinstance(row, tuple) and len(row) == len(INVENTORY_COLUMNS) for row in rows)
    at = INVENTORY_COLUMNS.index("downloaded_at")
    assert [r[at] is not None for r in rows] == [False, False, False, True, False]
    assert rows[3][at].utcoffset().total_seconds() == 0  # aware UTC on both backends
    with pytest.raises(ValueError):
        list(seeded.iter_inventory_rows(chunk_rows=0))


def test_postgresql_and_sqlite_write_the_same_csv(pg_url: str, sqlite_url: str, tmp_path: Path) -> None:
    """One writer for both backends: same bytes but for the download time, which is ISO 8601 UTC."""
    texts = []
    for name, url in (("pg", pg_url), ("sqlite", sqlite_url)):
        store = StateStore(url)
        store.create_schema()
        stats = write_inventory(_seed(store), tmp_path / f"{name}.csv", chunk_rows=3)
        store.dispose()
        assert (stats.rows, stats.patients, stats.studies, stats.bytes) == (5, 3, 4, 3500)
        assert stats.by_status_modality == {("pending", "CT"): 2, ("pending", "SR"): 1, ("complete", "MR"): 1,
                                            ("failed", "US"): 1}
        assert stats.bytes_by_month == {"2022-01": 500, "unknown": 3000, "2020-01": 0, "2021-01": 0}
        frame = pd.read_csv(tmp_path / f"{name}.csv", dtype=str, keep_default_na=False)
        downloaded_at = frame.pop("downloaded_at")
        assert re.fullmatch(r"20\d\d-\d\d-\d\d \d\d:\d\d:\d\d(\.\d{6})?\+00:00", downloaded_at[3])
        assert set(downloaded_at.drop(3)) == {""}
        texts.append(frame.to_csv(index=False))
    assert texts[0] == texts[1]


def test_inventory_problems_finds_series_listed_but_not_in_the_state_db(seeded: StateStore, tmp_path: Path) -> None:
    from dicom_assets.inventory import inventory_problems

    out = tmp_path / "inventory.csv"
    write_inventory(seeded, out)
    lines = out.read_text().splitlines(keepends=True)
    out.write_text("".join(lines) + lines[1].replace("1.2.1", "9.9.9"))
    assert inventory_problems(seeded, out) == (
        6, ["1 series in the inventory are not in the state DB (first: 9.9.9)"])


def test_iter_series_uids_pages_through_every_series(seeded: StateStore) -> None:
    pages = list(seeded.iter_series_uids(chunk_rows=2))
    assert [len(p) for p in pages] == [2, 2, 1]
    assert sorted(u for p in pages for u in p) == sorted(seeded.all_series_uids())
    assert [len(p) for p in seeded.iter_series_uids(chunk_rows=5)] == [5]
