"""The whole asset graph (``run_sync``) with ``pacs.protocol: dicomweb``: Orthanc's DICOMweb
plugin (QIDO-RS for discovery, WADO-RS for retrieval), a real PostgreSQL, no storage SCP.

The checks are those of ``test_orthanc.py`` for DIMSE (every series complete, data sets byte for
byte as loaded, zips, validation, inventory); WADO-RS requests are counted by recording every
``DicomwebHttp.stream`` call (the only way WADO-RS is sent).
"""

from __future__ import annotations

import re
from contextlib import ExitStack
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
import yaml

from dicom_assets.dicomweb.http import DicomwebHttp
from dicom_assets.layout import instances_on_disk
from dicom_assets.store import StateStore
from dicom_assets_tests.conftest import free_port
from dicom_assets_tests.orthanc import ORTHANC_AET, RECEIVER_AET, running_orthanc
from dicom_assets_tests.pacs_fixtures import HOSTILE_PATIENT_IDS, small_cohort
from dicom_assets_tests.test_orthanc import (
    DELIMITER,
    SERIES_PER_PATIENT,
    SLICES,
    Site,
    _assert_bodies_as_generated,
    _break_one_series,
    _files,
    _sizes,
    assert_fully_synced,
    assert_fully_synced_except_attempts,
)

pytestmark = pytest.mark.timeout(180)


@pytest.fixture
def wado_paths(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The path of every WADO-RS GET sent (in this process), in order."""
    sent: list[str] = []
    original = DicomwebHttp.stream

    def recording(self: DicomwebHttp, path: str, headers: Any = None, params: Any = None) -> Any:
        sent.append(path)
        return original(self, path, headers, params)

    monkeypatch.setattr(DicomwebHttp, "stream", recording)
    return sent


@pytest.fixture
def make_web_site(tmp_path: Path, pg_url: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[..., Site]]:
    """``make_web_site(patient_ids=..., **pacs_keys)``: Orthanc with the DICOMweb plugin, a cohort
    loaded, a config with ``pacs.protocol: dicomweb``."""
    stack = ExitStack()

    def build(patient_ids: tuple[str, ...] = HOSTILE_PATIENT_IDS, **pacs: Any) -> Site:
        cohort = small_cohort(tmp_path / "cohort", patient_ids, series=SERIES_PER_PATIENT, slices=SLICES)
        orthanc = stack.enter_context(
            running_orthanc(tmp_path, free_port(), verbose=True, wait_on_stop=False, dicomweb=True)
        )
        assert orthanc.load(tmp_path / "cohort") == cohort.instances
        config = {
            # host/port/AE stay required by the pacs: section; nothing connects to them with dicomweb
            "pacs": {"protocol": "dicomweb", "host": "127.0.0.1", "port": orthanc.dicom_port, "called_ae_title": ORTHANC_AET,
                     "calling_ae_title": RECEIVER_AET, "timeout_s": 10, "max_concurrent_associations": 2, **pacs},
            "dicomweb": {"url": orthanc.dicomweb_url, "timeout_s": 10},
            "selection": {"patient_id_regex": "^PAT"},
            "paths": {"download_dir": "downloads", "archive_dir": "archives", "report_dir": "reports"},
            "archive": {"delimiter": DELIMITER},
            "database": {"url": pg_url},
        }  # fmt: skip
        path = tmp_path / "config.yaml"
        path.write_text(yaml.safe_dump(config, allow_unicode=True))
        monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "dagster_home"))
        monkeypatch.setenv("DICOM_ASSETS_CONFIG", str(path))
        store = StateStore(pg_url)
        stack.callback(store.dispose)
        return Site(tmp_path, cohort, orthanc, path, store, config)

    with stack:
        yield build


def _series_paths(site: Site) -> list[str]:
    return sorted(f"studies/{s.study_instance_uid}/series/{s.series_instance_uid}" for s in site.cohort.series)


def test_dicomweb_sync_then_resync_sends_no_wado_request(make_web_site, wado_paths: list[str]) -> None:
    site = make_web_site()
    report = site.sync()
    assert_fully_synced(site, report)
    assert report.bytes_received == sum(_sizes(site.downloads).values())
    _assert_bodies_as_generated(site)  # as stored: nothing transcoded on the way
    assert sorted(wado_paths) == _series_paths(site)  # one series-level GET per series
    assert not list(site.downloads.rglob(".wado.*"))  # no temp file left
    assert site.retrieve_requests("Move") == [] and site.retrieve_requests("Get") == []  # no DIMSE at all
    log = site.orthanc.log_file.read_text(errors="replace")
    assert not re.search(r"Orthanc\w*RequestHandler\.cpp|Association Received", log, re.I)  # not even a C-FIND

    files = _files(site.downloads)
    zips = _files(site.root / "archives")
    again = site.sync()
    assert_fully_synced(site, again)
    assert again.bytes_received == 0 and again.instances_received == 0
    assert sorted(wado_paths) == _series_paths(site)  # no WADO-RS request the second time
    assert _files(site.downloads) == files
    assert _files(site.root / "archives") == zips


def test_dicomweb_partial_series_fetches_only_the_missing_instances(make_web_site, wado_paths: list[str]) -> None:
    site = make_web_site()
    assert site.sync().ok
    target, kept, missing_bytes = _break_one_series(site)
    on_disk = set(instances_on_disk(site.series_directory(target)))
    missing = sorted(set(target.sop_instance_uids) - on_disk)
    assert len(missing) == 2
    del wado_paths[:]

    report = site.sync()
    assert report.ok, f"{report}\n{site.orthanc.log_tail()}"
    base = f"studies/{target.study_instance_uid}/series/{target.series_instance_uid}"
    assert sorted(wado_paths) == [f"{base}/instances/{uid}" for uid in missing]  # instance-level, the missing only
    assert report.bytes_received == missing_bytes
    assert sorted(instances_on_disk(site.series_directory(target))) == sorted(target.sop_instance_uids)
    assert all(f.stat().st_ino == ino for f, ino in kept.items())  # files on disk untouched
    state = site.store.get_series(target.series_instance_uid)
    assert (state.download_status, state.downloaded_instances, state.attempts) == ("complete", SLICES, 0)
    assert_fully_synced_except_attempts(site, report)
    _assert_bodies_as_generated(site)


# -- the fault of a failed WADO-RS attempt (no server: fetch_series is replaced) -----------------------


def _errors() -> list[tuple[Any, str, str]]:
    import errno

    from dicom_assets.dicomweb.http import DicomwebRequestFailed
    from dicom_assets.dicomweb.wado import WadoResponseError, WadoStorageError, WadoTruncated

    return [
        (WadoTruncated("GET x: the connection broke"), "incomplete", "network"),
        (WadoStorageError("disk full", errno.ENOSPC, Path("/x")), "failed", "storage"),
        (DicomwebRequestFailed("busy", 503), "failed", "busy"),
        (DicomwebRequestFailed("too many", 429), "failed", "busy"),
        (DicomwebRequestFailed("gone", 404), "failed", "pacs"),
        (DicomwebRequestFailed("broken", 500), "failed", "pacs"),
        (WadoResponseError("not multipart"), "failed", "pacs"),
    ]


@pytest.mark.parametrize("error,status,fault", _errors(), ids=lambda v: type(v).__name__ if isinstance(v, Exception) else str(v))
def test_wado_errors_map_to_the_faults_retrieval_knows(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                        error: Exception, status: str, fault: str) -> None:  # fmt: skip
    from dicom_assets.config import settings_from_dict
    from dicom_assets.dicomweb import retrieve
    from dicom_assets.dicomweb.client import DicomwebClient
    from dicom_assets.dicomweb.wado import WadoResult
    from dicom_assets.store.records import SeriesState

    settings = settings_from_dict({
        "pacs": {"protocol": "dicomweb", "host": "127.0.0.1", "port": 1, "called_ae_title": "X"},
        "dicomweb": {"url": "http://127.0.0.1:1/dicom-web"},
        "paths": {"download_dir": str(tmp_path / "d"), "archive_dir": str(tmp_path / "a"), "report_dir": str(tmp_path / "r")},
        "database": {"url": "sqlite://"},
    })  # fmt: skip
    arrived = WadoResult(arrived={"1.2.3.9": ("1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.1.2.1", 10)}, bytes_received=10)

    def failing(*args: Any, **kwargs: Any) -> WadoResult:
        error.result = arrived  # type: ignore[attr-defined]
        raise error

    monkeypatch.setattr(retrieve, "fetch_series", failing)
    series = SeriesState("1.2.3.2", "1.2.3.1", "PAT-1", 1, "CT", None, 4, 0, 0, "pending", 0, None, None, None)
    with DicomwebClient(settings.pacs, settings.dicomweb) as client, client.session() as session:
        outcome, expected = retrieve.WadoSeriesRetriever(settings, client, session).retrieve(series)
    assert (outcome.status, outcome.fault, expected) == (status, fault, 4)
    assert outcome.new_instances == 1 and outcome.bytes_received == 10  # what arrived before the error counts
    if fault == "storage":
        assert outcome.storage_errno == error.errno  # type: ignore[attr-defined]


@pytest.mark.parametrize("kind", ["unavailable", "auth"])
def test_wado_outage_and_refused_credentials_stop_the_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kind: str) -> None:
    from dicom_assets.config import settings_from_dict
    from dicom_assets.dicomweb import retrieve
    from dicom_assets.dicomweb.client import DicomwebClient
    from dicom_assets.dicomweb.http import DicomwebAuthError, DicomwebUnavailable
    from dicom_assets.store.records import SeriesState

    settings = settings_from_dict({
        "pacs": {"protocol": "dicomweb", "host": "127.0.0.1", "port": 1, "called_ae_title": "X"},
        "dicomweb": {"url": "http://127.0.0.1:1/dicom-web"},
        "paths": {"download_dir": str(tmp_path / "d"), "archive_dir": str(tmp_path / "a"), "report_dir": str(tmp_path / "r")},
        "database": {"url": "sqlite://"},
    })  # fmt: skip
    error = DicomwebUnavailable("down") if kind == "unavailable" else DicomwebAuthError("401", 401)

    def failing(*args: Any, **kwargs: Any) -> Any:
        raise error

    monkeypatch.setattr(retrieve, "fetch_series", failing)
    series = SeriesState("1.2.3.2", "1.2.3.1", "PAT-1", 1, "CT", None, 4, 0, 0, "pending", 0, None, None, None)
    with DicomwebClient(settings.pacs, settings.dicomweb) as client, client.session() as session:
        with pytest.raises(type(error)):
            retrieve.WadoSeriesRetriever(settings, client, session).retrieve(series)
