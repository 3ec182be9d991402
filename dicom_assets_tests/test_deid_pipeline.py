"""De-identified copies end to end: Orthanc (C-MOVE and C-GET, an RLE-compressed instance among
them) -> the pipeline with ``deidentify:`` -> ``<pseudonym>__seriesCount<N>.zip`` whose bytes hold
no marker and no original UID, pixels as stored, no new IOD error; an ultrasound series left out
with its reason in the inventory; a new series keeps the pseudonym and the date shift; only the
de-identified zip is published; the crosswalk leaves the state DB only by the CLI."""

from __future__ import annotations

import csv
import zipfile
from pathlib import Path
from typing import Any, Iterator

import pydicom
import pytest
import yaml
from pydicom.uid import UltrasoundImageStorage

from dicom_assets.deid.keys import DeidKeys
from dicom_assets.devpacs.marked import all_markers, leaked_markers, write_marked_series
from dicom_assets.layout import archive_name
from dicom_assets_tests.conftest import free_port
from dicom_assets_tests.iod_check import new_iod_errors, require_dciodvfy
from dicom_assets_tests.orthanc import ORTHANC_AET, RECEIVER_AET, running_orthanc

pytestmark = [pytest.mark.timeout(240), pytest.mark.filterwarnings("ignore:VR lookup failed")]

PATIENT = "MRK-0001"
SECRET = "a test secret of thirty-two bytes!"
DELIMITER = "__seriesCount"


def _pixel_bytes(path: Path) -> bytes:
    return pydicom.dcmread(path)["PixelData"].value


def _members(zip_path: Path, into: Path) -> dict[str, Path]:
    """Extract the zip; SOPInstanceUID (the file name) -> extracted file."""
    with zipfile.ZipFile(zip_path) as zf:
        assert zf.testzip() is None
        zf.extractall(into)
        return {Path(name).stem: into / name for name in zf.namelist()}


@pytest.fixture
def site(tmp_path: Path, pg_url: str, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest) -> Iterator[dict[str, Any]]:
    import datetime as dt

    cohort = tmp_path / "cohort"
    ct = write_marked_series(cohort, PATIENT, study_date=dt.date(2019, 3, 4), seed=0)
    later = write_marked_series(cohort, PATIENT, study_date=dt.date(2020, 5, 6), seed=1)
    us = write_marked_series(cohort, PATIENT, study_date=dt.date(2020, 5, 6), seed=3, modality="US",
                             sop_class_uid=UltrasoundImageStorage, transfer_syntaxes=("1.2.840.10008.1.2.1",))  # fmt: skip
    receiver_port = free_port()
    with running_orthanc(tmp_path, receiver_port, wait_on_stop=False) as orthanc:
        assert orthanc.load(cohort) == len(ct) + len(later) + len(us)
        config = {
            "pacs": {"host": "127.0.0.1", "port": orthanc.dicom_port, "called_ae_title": ORTHANC_AET,
                     "calling_ae_title": RECEIVER_AET, "retrieve_method": request.param, "timeout_s": 10, "straggler_timeout_s": 1},
            "receiver": {"ae_title": RECEIVER_AET, "bind_address": "127.0.0.1", "port": receiver_port},
            "selection": {"patient_id_regex": "^MRK"},
            "paths": {"download_dir": "downloads", "archive_dir": "archives", "report_dir": "reports",
                      "deidentified_dir": "shared"},
            "archive": {"delimiter": DELIMITER},
            "database": {"url": pg_url},
            "deidentify": {"secret": "${TEST_DEID_SECRET}"},
            "publish": {"directory": "partner", "ship": "deidentified"},
        }  # fmt: skip
        (tmp_path / "partner").mkdir()
        (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
        monkeypatch.setenv("TEST_DEID_SECRET", SECRET)
        monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "dagster_home"))
        monkeypatch.setenv("DICOM_ASSETS_CONFIG", str(tmp_path / "config.yaml"))
        yield {"root": tmp_path, "orthanc": orthanc, "shared": ct + later, "us": us, "cohort": cohort}


def _sync(root: Path) -> None:
    from dicom_assets.sync import run_sync

    report = run_sync(root / "config.yaml", log=lambda line: None, progress=False)
    assert report.ok, report


@pytest.mark.parametrize("site", ["c-move", "c-get"], indirect=True)
def test_deidentified_zip_holds_no_identity_and_keeps_its_pseudonym(site: dict[str, Any], tmp_path: Path) -> None:
    root, originals = site["root"], site["shared"]
    keys = DeidKeys(SECRET.encode())
    pseudonym, shift = keys.pseudonym(PATIENT), keys.date_shift_days(PATIENT)
    _sync(root)

    name = archive_name(pseudonym, DELIMITER, 2)  # the CT series of both studies; the ultrasound is left out
    assert sorted(p.name for p in (root / "shared").glob("*.zip")) == [name]
    members = _members(root / "shared" / name, tmp_path / "x1")
    assert len(members) == len(originals)
    assert all(arcname.parts[0] == pseudonym for arcname in (p.relative_to(tmp_path / "x1") for p in members.values()))
    markers = all_markers(originals)
    assert len(markers) > 500
    for sop, path in members.items():
        assert leaked_markers(path.read_bytes(), markers, shift) == [], path  # no marker, no original UID or date
        assert PATIENT.encode() not in path.read_bytes()
        assert pydicom.dcmread(path).PatientIdentityRemoved == "YES"
    require_dciodvfy()
    for original in originals:  # pixels as stored (RLE included), and no new IOD error
        copy = members[keys.uid(pydicom.dcmread(original, stop_before_pixels=True).SOPInstanceUID)]
        assert _pixel_bytes(copy) == _pixel_bytes(original), original
        assert new_iod_errors(original, copy) == [], original

    with open(root / "reports" / "inventory.csv", newline="", encoding="utf-8-sig") as f:
        rows = list(csv.DictReader(f))
    reasons = {r["modality"]: r["deid_excluded_reason"] for r in rows}
    assert reasons["CT"] == "" and "US" in reasons["US"]  # the ultrasound's reason is in the inventory
    assert sorted(p.name for p in (root / "partner").iterdir()) == [name]  # only the de-identified zip is shared
    first_dates = {pydicom.dcmread(p, stop_before_pixels=True).StudyDate for p in members.values()}

    # a new series: the zip is rebuilt with the same pseudonym and the same date shift
    import datetime as dt

    added = write_marked_series(site["cohort"], PATIENT, study_date=dt.date(2021, 7, 8), seed=2)
    site["orthanc"].load(added[0].parent.parent)
    _sync(root)
    rebuilt = archive_name(pseudonym, DELIMITER, 3)
    assert sorted(p.name for p in (root / "shared").glob("*.zip")) == [rebuilt]
    assert sorted(p.name for p in (root / "partner").iterdir()) == [rebuilt]
    again = _members(root / "shared" / rebuilt, tmp_path / "x2")
    dates = {pydicom.dcmread(p, stop_before_pixels=True).StudyDate for p in again.values()}
    assert first_dates < dates and len(dates) == 3  # the first two studies' shifted dates did not move
    assert set(members) < set(again)  # same new UIDs for the same instances

    # the crosswalk: only through the CLI, into a new file
    from dicom_assets.cli import main

    out = tmp_path / "crosswalk.csv"
    assert main(["crosswalk", "--config", str(root / "config.yaml"), "--out", str(out)]) == 0
    with open(out, newline="") as f:
        assert list(csv.DictReader(f))[0] | {"created_at": ""} == {
            "patient_id": PATIENT, "pseudonym": pseudonym, "date_shift_days": str(shift), "created_at": ""}
    assert out.stat().st_mode & 0o077 == 0
    assert main(["crosswalk", "--config", str(root / "config.yaml"), "--out", str(out)]) == 1  # never overwritten
