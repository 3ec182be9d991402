"""The whole asset graph (``run_sync``) against a real PACS: Orthanc, with a real PostgreSQL.

Each test starts its own Orthanc (``dicom_assets_tests/orthanc.py``) on free loopback ports,
loads a tiny cohort with hostile PatientIDs into it over REST, and syncs through Dagster.
Orthanc runs with ``--verbose`` so the tests can count, from Orthanc's own log, the C-MOVE /
C-GET requests it served and their QueryRetrieveLevel.
"""

from __future__ import annotations

import csv
import re
import time
import zipfile
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
import sqlalchemy as sa
import yaml

from dicom_assets.config import PacsSettings
from dicom_assets.devpacs import CohortSummary
from dicom_assets.layout import archive_name, instances_on_disk, patient_key, series_dir
from dicom_assets.store import StateStore
from dicom_assets_tests.conftest import free_port
from dicom_assets_tests.orthanc import ORTHANC_AET, RECEIVER_AET, OrthancHandle, running_orthanc
from dicom_assets_tests.pacs_fixtures import HOSTILE_PATIENT_IDS, small_cohort

pytestmark = pytest.mark.timeout(120)

SERIES_PER_PATIENT = 2
SLICES = 4
DELIMITER = "__seriesCount"


class KnownBug(AssertionError):
    """An assertion that fails because of a bug reported upstream (see the xfail reason)."""


@dataclass
class Site:
    """One deployment: Orthanc holding a cohort, a config file, a Dagster home, the state DB."""

    root: Path
    cohort: CohortSummary
    orthanc: OrthancHandle
    config_path: Path
    store: StateStore
    config: dict[str, Any]

    @property
    def downloads(self) -> Path:
        return self.root / "downloads"

    def series_directory(self, s: Any) -> Path:
        return series_dir(self.downloads, s.patient_id, s.study_instance_uid, s.series_instance_uid)

    def retrieve_requests(self, kind: str = "Move") -> list[str]:
        """QueryRetrieveLevel of every C-MOVE (``Move``) or C-GET (``Get``) Orthanc served."""
        log = self.orthanc.log_file.read_text(errors="replace")
        return re.findall(rf"Orthanc{kind}RequestHandler\.cpp:\d+\] \(dicom\) +\(0008,0052\) +QueryRetrieveLevel = (\w+)", log)

    def sync(self) -> Any:
        from dicom_assets.sync import run_sync

        return run_sync(self.config_path, log=lambda line: None, progress=False)


@pytest.fixture
def make_site(tmp_path: Path, pg_url: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[..., Site]]:
    """``make_site(method, synchronous_move=True, receiver_ae_title=..., patient_ids=..., **pacs_keys)``."""
    stack = ExitStack()

    def build(
        method: str = "c-move",
        synchronous_move: bool = True,
        receiver_ae_title: str = RECEIVER_AET,
        patient_ids: tuple[str, ...] = HOSTILE_PATIENT_IDS,
        **pacs: Any,
    ) -> Site:
        cohort = small_cohort(tmp_path / "cohort", patient_ids, series=SERIES_PER_PATIENT, slices=SLICES)
        receiver_port = free_port()
        # Orthanc knows only DICOM_ASSETS; receiver_ae_title is what *we* ask it to move to.
        orthanc = stack.enter_context(running_orthanc(tmp_path, receiver_port, synchronous_move, verbose=True, wait_on_stop=False))
        print(f"Orthanc DICOM {orthanc.dicom_port}, HTTP {orthanc.http_port}, log {orthanc.log_file}")
        assert orthanc.load(tmp_path / "cohort") == cohort.instances
        assert orthanc.instance_count() == cohort.instances
        config = {
            "pacs": {"host": "127.0.0.1", "port": orthanc.dicom_port, "called_ae_title": ORTHANC_AET,
                     "calling_ae_title": RECEIVER_AET, "retrieve_method": method, "timeout_s": 10,
                     "straggler_timeout_s": 1, **pacs},
            "receiver": {"ae_title": receiver_ae_title, "bind_address": "127.0.0.1", "port": receiver_port},
            "selection": {"patient_id_regex": "^PAT"},
            "paths": {"download_dir": "downloads", "archive_dir": "archives", "report_dir": "reports"},
            "archive": {"delimiter": DELIMITER},
            "database": {"url": pg_url},
        }
        path = tmp_path / "config.yaml"
        path.write_text(yaml.safe_dump(config, allow_unicode=True))
        monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "dagster_home"))
        monkeypatch.setenv("DICOM_ASSETS_CONFIG", str(path))
        store = StateStore(pg_url)
        stack.callback(store.dispose)
        return Site(tmp_path, cohort, orthanc, path, store, config)

    with stack:
        yield build


def _files(root: Path) -> dict[str, tuple[int, int]]:
    """Every file under ``root`` (hidden temp files included): relative path -> (inode, mtime_ns)."""
    return {str(p.relative_to(root)): (p.stat().st_ino, p.stat().st_mtime_ns) for p in root.rglob("*") if p.is_file()}


def _sizes(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_size for p in root.rglob("*.dcm")}


def _body(path: Path) -> bytes:
    """The data set of a DICOM file: what follows the preamble and the file meta group."""
    data = path.read_bytes()
    assert data[128:132] == b"DICM" and data[132:136] == b"\x02\x00\x00\x00", path
    group_length = int.from_bytes(data[140:144], "little")
    return data[144 + group_length :]


def _assert_bodies_as_generated(site: Site) -> None:
    """Every received data set is byte-for-byte the one loaded into Orthanc (meta may differ)."""
    for s in site.cohort.series:
        for uid in s.sop_instance_uids:
            source = site.root / "cohort" / s.study_instance_uid / s.series_instance_uid / f"{uid}.dcm"
            received = site.series_directory(s) / f"{uid}.dcm"
            assert _body(received) == _body(source), received


def _nonzero(counts: dict[str, int]) -> dict[str, int]:
    return {k: v for k, v in counts.items() if v}


def _zip_members(path: Path) -> list[str]:
    with zipfile.ZipFile(path) as zf:
        assert zf.testzip() is None, f"corrupt member in {path}"
        return sorted(n for n in zf.namelist() if n.endswith(".dcm"))


def assert_fully_synced(site: Site, report: Any) -> None:
    """Every series complete, one verified zip per patient, clean validation, inventory per series."""
    cohort, store = site.cohort, site.store
    assert report.ok, f"{report}\n{site.orthanc.log_tail()}"
    assert _nonzero(report.status_counts) == {"complete": len(cohort.series)}
    assert report.check_failures == 0
    n = len(cohort.patients)
    assert report.patient_counts == {"patients": n, "archived": n, "pending": 0}

    for s in cohort.series:
        state = store.get_series(s.series_instance_uid)
        assert state is not None, f"series {s.series_instance_uid} of {s.patient_id!r} not discovered"
        assert (state.download_status, state.expected_instances, state.downloaded_instances) == ("complete", SLICES, SLICES)
        assert state.attempts == 0 and state.last_error is None and state.claimed_by is None  # nothing refused
        assert sorted(instances_on_disk(site.series_directory(s))) == sorted(s.sop_instance_uids)

    archives = site.root / "archives"
    assert sorted(p.name for p in archives.iterdir()) == sorted(
        archive_name(pid, DELIMITER, SERIES_PER_PATIENT) for pid in cohort.patients
    )
    for pid in cohort.patients:
        key = patient_key(pid)
        expected = sorted(
            f"{key}/{s.study_instance_uid}/{s.series_instance_uid}/{uid}.dcm"
            for s in cohort.series if s.patient_id == pid for uid in s.sop_instance_uids
        )
        members = _zip_members(archives / archive_name(pid, DELIMITER, SERIES_PER_PATIENT))
        assert len(members) == SERIES_PER_PATIENT * SLICES and members == expected

        with open(site.root / "reports" / "validation" / f"{key}.csv", newline="") as handle:
            rows = list(csv.DictReader(handle))
        assert len(rows) == SERIES_PER_PATIENT
        assert {(r["outcome"], r["expected_instances"], r["downloaded_instances"]) for r in rows} == {("ok", str(SLICES), str(SLICES))}

    with open(site.root / "reports" / "inventory.csv", newline="") as handle:
        inventory = list(csv.DictReader(handle))
    assert sorted(r["series_instance_uid"] for r in inventory) == sorted(s.series_instance_uid for s in cohort.series)
    assert {r["patient_id"] for r in inventory} == set(cohort.patients)
    assert {r["download_status"] for r in inventory} == {"complete"}
    assert all(r["archive_name"].endswith(f"{DELIMITER}{SERIES_PER_PATIENT}.zip") for r in inventory)


@pytest.mark.parametrize("method", ["c-move", "c-get"])
def test_sync_from_orthanc_then_resync_fetches_nothing(make_site, method: str) -> None:
    site = make_site(method)
    kind = "Move" if method == "c-move" else "Get"
    other = "Get" if kind == "Move" else "Move"

    report = site.sync()
    assert_fully_synced(site, report)
    assert report.bytes_received == sum(size for size in _sizes(site.root / "downloads").values())
    _assert_bodies_as_generated(site)  # nothing transcoded or re-encoded on the way
    assert site.retrieve_requests(kind) == ["SERIES"] * len(site.cohort.series)  # one retrieve per series
    assert site.retrieve_requests(other) == []

    files = _files(site.root / "downloads")
    zips = _files(site.root / "archives")
    again = site.sync()
    assert_fully_synced(site, again)  # no series was claimed again
    assert again.bytes_received == 0 and again.instances_received == 0
    assert site.retrieve_requests(kind) == ["SERIES"] * len(site.cohort.series)  # Orthanc saw no new retrieve
    assert _files(site.root / "downloads") == files  # no new, rewritten or leftover temp file
    assert _files(site.root / "archives") == zips  # series counts unchanged: no archive rebuilt


def test_asynchronous_cmove_waits_for_stragglers(make_site) -> None:
    """SynchronousCMove=false: Orthanc answers Success before sending; we still get every instance."""
    site = make_site("c-move", synchronous_move=False)
    report = site.sync()
    assert_fully_synced(site, report)
    jobs = site.orthanc.jobs("DicomModalityStore")  # asynchronous C-MOVEs are Orthanc jobs
    assert len(jobs) == len(site.cohort.series)
    assert {(j["State"], j["Content"]["InstancesCount"], j["Content"]["RemoteAet"]) for j in jobs} == {
        ("Success", SLICES, RECEIVER_AET)
    }
    assert site.sync().bytes_received == 0
    assert len(site.orthanc.jobs("DicomModalityStore")) == len(site.cohort.series)  # no C-MOVE repeated


def test_move_to_an_ae_title_orthanc_does_not_know_fails_fast_and_clearly(make_site) -> None:
    """Orthanc does not abort and does not time out: the run must end quickly, naming the AE title."""
    # Short backoffs, 2 attempts and a short straggler wait keep the current (retrying)
    # behaviour within the time box of this test.
    site = make_site("c-move", receiver_ae_title="NOT_AT_ORTHANC", max_attempts=2, retry_initial_s=0.1, retry_max_s=0.2,
                     straggler_timeout_s=0.3)
    started = time.monotonic()
    report = site.sync()
    elapsed = time.monotonic() - started
    assert not report.ok
    assert report.status_counts["complete"] == 0 and report.status_counts["in_progress"] == 0
    states = [site.store.get_series(s.series_instance_uid) for s in site.cohort.series]
    # The run stops at the second empty C-MOVE failure: series tried are failed with the reason,
    # the others were never tried (still pending), none is left claimed.
    assert report.failed_runs
    assert all(st is not None and st.download_status in ("failed", "pending") for st in states)
    in_flight = PacsSettings.model_fields["start_concurrent_associations"].default  # retrieving when the first failure stops the run
    assert sum(st.download_status == "failed" for st in states) <= in_flight
    assert 'Move-SCU request received for AET "NOT_AT_ORTHANC"' in site.orthanc.log_file.read_text()
    assert not list((site.root / "downloads").rglob("*.dcm"))
    assert not list((site.root / "archives").glob("*.zip"))
    assert elapsed < 20, f"{elapsed:.1f} s: the client waited for a timeout"  # pacs.timeout_s is 10
    moves = len(site.retrieve_requests("Move"))
    errors = sorted({st.last_error or "" for st in states})
    if not any("NOT_AT_ORTHANC" in e for e in errors):
        raise KnownBug(
            f"no last_error names the move destination after {moves} C-MOVEs "
            f"({[st.attempts for st in states]} attempts burned): {errors}"
        )


def _break_one_series(site: Site) -> tuple[Any, dict[Path, int], int]:
    """Delete 2 instance files of one series and mark it incomplete, as after a crash."""
    target = next(s for s in site.cohort.series if s.patient_id == HOSTILE_PATIENT_IDS[2])
    files = sorted(site.series_directory(target).glob("*.dcm"))
    gone = files[:2]
    missing_bytes = sum(f.stat().st_size for f in gone)
    kept = {f: f.stat().st_ino for f in files[2:]}
    for f in gone:
        f.unlink()
    with site.store.engine.begin() as conn:
        conn.execute(
            sa.text("UPDATE series SET download_status = 'incomplete', downloaded_instances = :n WHERE series_instance_uid = :uid"),
            {"n": SLICES - 2, "uid": target.series_instance_uid},
        )
    return target, kept, missing_bytes


@pytest.mark.parametrize(
    "method",
    [
        "c-move",
        "c-get",
    ],
)
def test_partial_series_fetches_only_the_missing_instances_at_image_level(make_site, method: str) -> None:
    site = make_site(method)
    kind = "Move" if method == "c-move" else "Get"
    assert site.sync().ok
    target, kept, missing_bytes = _break_one_series(site)

    report = site.sync()
    stuck = site.store.get_series(target.series_instance_uid)
    if method == "c-get" and report.failed_runs and stuck.download_status == "in_progress":
        raise KnownBug(f"the retrieval step crashed and left the series claimed: {report.failed_runs}")
    assert report.ok, f"{report}\n{site.orthanc.log_tail()}"
    assert report.bytes_received == missing_bytes  # only the two deleted instances came again
    assert sorted(instances_on_disk(site.series_directory(target))) == sorted(target.sop_instance_uids)
    assert all(f.stat().st_ino == ino for f, ino in kept.items())  # files on disk untouched
    assert site.retrieve_requests(kind) == ["SERIES"] * len(site.cohort.series) + ["IMAGE"]  # no complete one again
    state = site.store.get_series(target.series_instance_uid)
    assert (state.download_status, state.downloaded_instances, state.attempts) == ("complete", SLICES, 0)
    assert_fully_synced_except_attempts(site, report)


def assert_fully_synced_except_attempts(site: Site, report: Any) -> None:
    archives = sorted(p.name for p in (site.root / "archives").glob("*.zip"))
    assert archives == sorted(archive_name(pid, DELIMITER, SERIES_PER_PATIENT) for pid in site.cohort.patients)
    assert report.check_failures == 0 and _nonzero(report.status_counts) == {"complete": len(site.cohort.series)}


def test_orthanc_answers_date_window_study_queries_with_related_counts(tmp_path: Path, pg_url: str) -> None:
    """Incremental discovery rests on Orthanc answering a Study Root STUDY-level C-FIND by
    StudyDate range with NumberOfStudyRelated*, and the patient query with NumberOfPatientRelated*."""
    from datetime import date

    from dicom_assets.config import DiscoverySettings
    from dicom_assets.devpacs import CohortSpec, generate_cohort
    from dicom_assets.discovery import discover_pass
    from dicom_assets.pacs.client import PacsClient
    from dicom_assets_tests.pacs_fixtures import make_settings

    spec = CohortSpec(patients=3, studies_per_patient=2, series_per_study=2, slices_per_series=2, rows=16, columns=16,
                      patient_ids=HOSTILE_PATIENT_IDS, seed=7)  # fmt: skip
    cohort = generate_cohort(tmp_path / "cohort", spec)
    dates = {
        s.study_instance_uid: _study_date(tmp_path / "cohort" / s.study_instance_uid / s.series_instance_uid / f"{s.sop_instance_uids[0]}.dcm")
        for s in cohort.series
    }
    with running_orthanc(tmp_path, free_port()) as orthanc:
        assert orthanc.load(tmp_path / "cohort") == cohort.instances
        settings = make_settings(tmp_path, orthanc.dicom_port, free_port(), pg_url, called_ae_title=ORTHANC_AET,
                                 calling_ae_title=RECEIVER_AET)  # fmt: skip
        client = PacsClient(settings.pacs)
        since = sorted(dates.values())[3]  # the 4th of the 6 StudyDates (DA text sorts by date)
        with client.session() as session:
            every = session.find_studies_by_date(None)
            recent = session.find_studies_by_date(date(int(since[:4]), int(since[4:6]), int(since[6:])))
            patients = session.find_patients()
            assert session.finds == 3  # one C-FIND each: no split, no per-patient query
        assert {str(ds.StudyInstanceUID) for ds in every} == set(dates)
        assert {str(ds.StudyInstanceUID) for ds in recent} == {uid for uid, d in dates.items() if d >= since}
        for ds in every:
            assert (int(ds.NumberOfStudyRelatedSeries), int(ds.NumberOfStudyRelatedInstances)) == (2, 4)
            assert str(ds.PatientID) in HOSTILE_PATIENT_IDS
        assert {(str(p.PatientID), int(p.NumberOfPatientRelatedStudies), int(p.NumberOfPatientRelatedSeries),
                 int(p.NumberOfPatientRelatedInstances)) for p in patients} == {(pid, 2, 4, 8) for pid in HOSTILE_PATIENT_IDS}  # fmt: skip

        store = StateStore(pg_url)
        store.create_schema()
        try:
            _, full = discover_pass(client, store, lambda ds: True, DiscoverySettings())
            _, incremental = discover_pass(client, store, lambda ds: True, DiscoverySettings())
        finally:
            store.dispose()
    # Orthanc's patient-level counts equal the sums of its study-level ones: no patient left to ask about.
    assert full.full_pass and full.studies_found == 6 and full.patients_to_check == 0 and full.series_to_check == 6
    assert not incremental.full_pass and incremental.windows == 1 and incremental.requests == 3  # association, patients, window


def _study_date(path: Path) -> str:
    """The StudyDate (DA) of a DICOM file."""
    import pydicom

    return str(pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["StudyDate"]).StudyDate)
