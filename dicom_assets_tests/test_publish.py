"""Publishing verified zips to a second site's (mounted) directory."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from dicom_assets.archive import build_patient_archive
from dicom_assets.publish import PublishError, publish_patient_archive
from dicom_assets.store import StateStore
from dicom_assets_tests.test_archive import _add_series, _patient


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_publish_copy_verify_supersede_and_retry(store: StateStore, tmp_path: Path) -> None:
    downloads, archives, site = tmp_path / "dl", tmp_path / "zips", tmp_path / "partner"
    study = _patient(store, downloads, "P/1")
    first = build_patient_archive(store, downloads, archives, "P/1")

    with pytest.raises(PublishError, match="does not exist or is not a directory"):
        publish_patient_archive(store, archives, site, "P/1")  # the share is not mounted
    assert first.path.exists() and store.latest_archive("P/1").published_at is None  # source untouched, retried later

    site.mkdir()
    done = publish_patient_archive(store, archives, site, "P/1")
    assert done.copied and _sha(site / first.file_name) == first.sha256
    record = store.latest_archive("P/1")
    assert record.published_to == str(site) and record.published_at is not None
    assert [p.name for p in site.iterdir()] == [first.file_name]  # no temp file left

    again = publish_patient_archive(store, archives, site, "P/1")
    assert not again.copied  # published once, not again

    _add_series(store, downloads, "P/1", study, f"{study}.9", 2)
    second = build_patient_archive(store, downloads, archives, "P/1")
    newer = publish_patient_archive(store, archives, site, "P/1")
    assert newer.copied and newer.removed_superseded == (first.file_name,)
    assert sorted(p.name for p in site.iterdir()) == [second.file_name]


def test_a_corrupted_copy_is_never_renamed_into_place(store: StateStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import dicom_assets.publish as publish

    downloads, archives, site = tmp_path / "dl", tmp_path / "zips", tmp_path / "partner"
    site.mkdir()
    _patient(store, downloads, "P2")
    built = build_patient_archive(store, downloads, archives, "P2")
    monkeypatch.setattr(publish, "_sha256", lambda path: "0" * 64)  # the destination reads back other bytes
    with pytest.raises(PublishError, match="does not match"):
        publish_patient_archive(store, archives, site, "P2")
    assert list(site.iterdir()) == []
    assert built.path.exists() and store.latest_archive("P2").published_at is None


def test_nothing_to_publish_without_an_archive(store: StateStore, tmp_path: Path) -> None:
    (tmp_path / "site").mkdir()
    assert publish_patient_archive(store, tmp_path / "zips", tmp_path / "site", "nobody") is None
