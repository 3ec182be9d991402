"""A request file as the selection, end to end through Dagster against Orthanc (C-MOVE with the
CSV, C-GET with the XLSX of the same rows): every row answered in the request report, series
filters skipping localizers and a dose report, and an edited file costing only its new rows."""

from __future__ import annotations

import csv
import re
from pathlib import Path
from typing import Any, Iterator

import pytest
import yaml

from dicom_assets.devpacs.request_cohort import (
    REQUEST_TEST_COLUMNS,
    WrittenCohort,
    request_file_csv,
    request_test_cohort,
    request_test_rows,
    write_text_xlsx,
)
from dicom_assets.layout import archive_name
from dicom_assets.store import StateStore
from dicom_assets_tests.conftest import free_port
from dicom_assets_tests.orthanc import ORTHANC_AET, RECEIVER_AET, OrthancHandle, running_orthanc

pytestmark = pytest.mark.timeout(240)

DELIMITER = "__seriesCount"
#: Beyond the scenario's rows: the 2022 study of 000123 by accession, no modality -> its CT
#: series is fetched, its dose report skipped by the series filter.
EXTRA_ROW = {"AccessionNumber": "ACC-0123-2022", "Subject": "S10"}
SERIES_FILTER = {"exclude": {"series_description": "localizer|scout", "sop_class_groups": ["dose_reports"]}}


def _cells(cohort: WrittenCohort, late: bool) -> list[dict[str, str]]:
    rows = [dict(r.cells) for r in request_test_rows(cohort)]
    rows.append(EXTRA_ROW)
    if late:
        rows += [dict(r.cells) for r in request_test_rows(cohort, late=True)[len(rows) - 1 :]]
    return rows


def write_request(path: Path, cohort: WrittenCohort, late: bool = False) -> Path:
    cells = _cells(cohort, late)
    if path.suffix == ".xlsx":
        return write_text_xlsx(path, REQUEST_TEST_COLUMNS, cells)
    path.write_text(request_file_csv(REQUEST_TEST_COLUMNS, cells), encoding="utf-8")
    return path


def write_config(root: Path, pacs_port: int, pacs_ae: str, method: str, receiver_port: int, request: Path, pg_url: str) -> Path:
    """The site's config: the request file as the selection, the series filter, PostgreSQL."""
    config = {
        "pacs": {"host": "127.0.0.1", "port": pacs_port, "called_ae_title": pacs_ae, "calling_ae_title": RECEIVER_AET,
                 "retrieve_method": method, "timeout_s": 10, "straggler_timeout_s": 1},
        "receiver": {"ae_title": RECEIVER_AET, "bind_address": "127.0.0.1", "port": receiver_port},
        "selection": {"request_file": request.name, "series": SERIES_FILTER},
        "paths": {"download_dir": "downloads", "archive_dir": "archives", "report_dir": "reports"},
        "archive": {"delimiter": DELIMITER},
        "database": {"url": pg_url},
    }  # fmt: skip
    path = root / "config.yaml"
    path.write_text(yaml.safe_dump(config, allow_unicode=True))
    return path


class RequestSite:
    """Orthanc with the scenario, a config whose selection is a request file, the state DB."""

    def __init__(self, root: Path, orthanc: OrthancHandle, cohort: WrittenCohort, request: Path, store: StateStore) -> None:
        self.root, self.orthanc, self.cohort, self.request, self.store = root, orthanc, cohort, request, store

    def sync(self) -> Any:
        from dicom_assets.sync import run_sync

        return run_sync(self.root / "config.yaml", log=lambda line: None, progress=False)

    def requests(self) -> dict[str, int]:
        """C-FIND / C-MOVE / C-GET requests Orthanc served so far, from its verbose log."""
        log = self.orthanc.log_file.read_text(errors="replace")
        return {kind: len(re.findall(rf"Orthanc{kind}RequestHandler\.cpp:\d+\] \(dicom\) +\(0008,0052\) +QueryRetrieveLevel", log))
                for kind in ("Find", "Move", "Get")}  # fmt: skip

    def report(self) -> dict[str, dict[str, str]]:
        with open(self.root / "reports" / "request_report.csv", newline="", encoding="utf-8-sig") as f:
            return {row["Subject"]: row for row in csv.DictReader(f)}

    def status_of(self, label: str) -> list[str]:
        return [self.store.get_series(s.series_instance_uid).download_status for s in self.cohort.study(label).series]


@pytest.fixture
def request_site(tmp_path: Path, pg_url: str, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest) -> Iterator[RequestSite]:
    method, suffix = request.param
    cohort = request_test_cohort(tmp_path / "cohort")
    receiver_port = free_port()
    with running_orthanc(tmp_path, receiver_port, verbose=True, wait_on_stop=False) as orthanc:
        assert orthanc.load(tmp_path / "cohort") == cohort.instances
        request_path = write_request(tmp_path / f"cohort{suffix}", cohort)
        write_config(tmp_path, orthanc.dicom_port, ORTHANC_AET, method, receiver_port, request_path, pg_url)
        monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "dagster_home"))
        monkeypatch.setenv("DICOM_ASSETS_CONFIG", str(tmp_path / "config.yaml"))
        store = StateStore(pg_url)
        try:
            yield RequestSite(tmp_path, orthanc, cohort, request_path, store)
        finally:
            store.dispose()


@pytest.mark.parametrize("request_site", [("c-move", ".csv"), ("c-get", ".xlsx")], indirect=True, ids=["c-move-csv", "c-get-xlsx"])
def test_a_request_file_is_fetched_and_answered_row_by_row(request_site: RequestSite) -> None:
    site, cohort = request_site, request_site.cohort
    report = site.sync()
    assert report.ok, f"{report}\n{site.orthanc.log_tail()}"

    answers = site.report()
    assert list(answers) == ["S01", "S02", "S03", "S04", "S05", "S06", "S07", "S10"]  # the file's order
    assert {s: a["status"] for s, a in answers.items()} == {
        "S01": "complete", "S02": "complete", "S03": "complete", "S04": "ambiguous", "S05": "complete",
        "S06": "not found", "S07": "not found", "S10": "complete",
    }  # fmt: skip
    assert answers["S01"]["PatientID"] == "000123"  # leading zeros kept from the file to the report
    assert answers["S01"]["study_instance_uids"] == cohort.study("000123-2019-ct").study_instance_uid
    assert (answers["S01"]["series_matched"], answers["S01"]["series_retrieved"], answers["S01"]["series_skipped"]) == ("2", "1", "1")
    assert "Localizer" in answers["S01"]["reason"]  # the skipped localizer is named
    assert "matches 2 studies" in answers["S04"]["reason"] and "'P-DUP1', 'P-DUP2'" in answers["S04"]["reason"]
    assert "no study with PatientID 'NOPE-999'" in answers["S06"]["reason"]
    assert "AccessionNumber 'ACC-MISSING'" in answers["S07"]["reason"]
    assert "dose_reports" in answers["S10"]["reason"]

    # what was fetched: exactly the rows' series the filters keep
    assert site.status_of("000123-2019-ct") == ["skipped", "complete", "skipped"]  # localizer, CT, SR (row asks CT)
    assert site.status_of("000123-2020-mr") == ["skipped", "complete"]  # MR localizer, T1
    assert site.status_of("000123-2022-ct") == ["complete", "skipped"]  # CT, dose report
    for label in ("acc-1001", "by-uid"):
        assert site.status_of(label) == ["complete"]
    for label in ("123-2019-ct", "dup-1", "dup-2", "late-2021", "late-2023"):
        assert all(site.store.get_series(s.series_instance_uid) is None for s in cohort.study(label).series), label
    assert sorted(p.name for p in (site.root / "archives").iterdir()) == sorted(
        [archive_name("000123", DELIMITER, 3), archive_name("P-ACC", DELIMITER, 1), archive_name("P-UID", DELIMITER, 1)]
    )  # <N> counts the series the zip holds, not the skipped ones

    # the researcher adds two rows: only they are asked about, only their studies fetched
    before = site.requests()
    write_request(site.request, cohort, late=True)
    assert site.sync().ok
    after = site.requests()
    asked = {kind: after[kind] - before[kind] for kind in after}
    retrieves = asked["Move"] + asked["Get"]
    # one C-FIND per new row, the incremental pass's date window, one SERIES-level C-FIND per new
    # study; C-GET too: the classes to propose are the studies' SOPClassesInStudy, no IMAGE level
    assert asked["Find"] == 2 + 1 + 2, asked
    assert retrieves == 2, asked  # the two new studies' series, nothing else
    answers = site.report()
    assert (answers["S08"]["status"], answers["S09"]["status"]) == ("complete", "complete")
    assert answers["S08"]["study_instance_uids"] == cohort.study("late-2021").study_instance_uid
    assert archive_name("P-LATE", DELIMITER, 2) in {p.name for p in (site.root / "archives").iterdir()}

    # an unchanged file: no row is asked about again; only the date window (one C-FIND)
    before = site.requests()
    assert site.sync().ok
    after = site.requests()
    assert {kind: after[kind] - before[kind] for kind in after} == {"Find": 1, "Move": 0, "Get": 0}


@pytest.mark.parametrize("request_site", [("c-move", ".csv")], indirect=True, ids=["c-move-csv"])
def test_a_row_removed_from_the_file_keeps_what_was_downloaded(request_site: RequestSite) -> None:
    site, cohort = request_site, request_site.cohort
    assert site.sync().ok
    acc = cohort.study("acc-1001").series[0]
    zip_name = archive_name("P-ACC", DELIMITER, 1)
    assert site.store.get_series(acc.series_instance_uid).download_status == "complete"

    cells = [c for c in _cells(cohort, late=False) if c.get("AccessionNumber") != "ACC-1001"]
    site.request.write_text(request_file_csv(REQUEST_TEST_COLUMNS, cells), encoding="utf-8")
    assert site.sync().ok
    assert "S03" not in site.report()  # the report answers the file as it is now
    assert site.store.get_series(acc.series_instance_uid).download_status == "complete"  # nothing dropped
    assert (site.root / "archives" / zip_name).is_file()
    (row,) = [r for r in site.store.request_rows(active_only=False) if r.accession_number == "ACC-1001"]
    assert not row.active and row.resolution == "found"  # kept, inactive: back in the file, it costs nothing


@pytest.mark.parametrize("method", ["c-get", "c-move"])
def test_the_bundled_pacs_answers_the_same_request(tmp_path: Path, pg_url: str, monkeypatch: pytest.MonkeyPatch, method: str) -> None:
    """The bundled PACS supports every query key a request file uses: same answers as Orthanc."""
    from dicom_assets.devpacs import DevPacs
    from dicom_assets.sync import run_sync

    cohort = request_test_cohort(tmp_path / "cohort")
    request = write_request(tmp_path / "cohort.csv", cohort)
    receiver_port = free_port()
    with DevPacs(tmp_path / "cohort", move_destinations={RECEIVER_AET: ("127.0.0.1", receiver_port)}) as pacs:
        write_config(tmp_path, pacs.port, pacs.ae_title, method, receiver_port, request, pg_url)
        monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "dagster_home"))
        report = run_sync(tmp_path / "config.yaml", log=lambda line: None, progress=False)
    assert report.ok, report
    with open(tmp_path / "reports" / "request_report.csv", newline="", encoding="utf-8-sig") as f:
        statuses = {row["Subject"]: row["status"] for row in csv.DictReader(f)}
    assert statuses == {
        "S01": "complete", "S02": "complete", "S03": "complete", "S04": "ambiguous", "S05": "complete",
        "S06": "not found", "S07": "not found", "S10": "complete",
    }  # fmt: skip
    assert sorted(p.name for p in (tmp_path / "archives").iterdir()) == sorted(
        [archive_name("000123", DELIMITER, 3), archive_name("P-ACC", DELIMITER, 1), archive_name("P-UID", DELIMITER, 1)]
    )
