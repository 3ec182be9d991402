"""``make bench``'s harness in ``--quick`` mode: a 3 MB cohort through every retrieval variant,
archiving, and discovery over 20 patients (scale has no small size and is not run).

Real Orthanc, real DCMTK, real ``dicom-assets sync`` against a real PostgreSQL, real ``zip``:
the point is that the harness runs end to end and checks what it measures (every variant got
every instance, the archive passes ``unzip -t``), not the figures, which a smoke run makes
meaningless. No timing assertions.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from dicom_assets.config import PacsSettings
from dicom_assets_tests.conftest import require_service
from dicom_assets_tests.orthanc import require_orthanc

pytestmark = pytest.mark.timeout(240)

SECTIONS = ("## Targets", "## 1. Retrieval", "### Where one association's time goes", "## 2. Archiving", "## 3. Discovery", "## 4. Scale")
_DEFAULT = PacsSettings.model_fields["max_concurrent_associations"].default  # the defaults' rows are named by it
QUICK_VARIANTS = {
    "dcmtk-move-nodelay", "dcmtk-get-nodelay", "dcmtk-move-nagle", "dcmtk-get-nagle",
    f"project-c-move-{_DEFAULT}", f"project-c-get-{_DEFAULT}", f"project-wado-rs-{_DEFAULT}",
}  # fmt: skip


@pytest.fixture
def tools() -> None:
    require_orthanc()
    for tool in ("storescp", "movescu", "getscu", "echoscu"):
        require_service(shutil.which(tool) is not None, f"DCMTK {tool} (apt-get install dcmtk)")
    for tool in ("zip", "unzip"):
        require_service(shutil.which(tool) is not None, f"Info-ZIP {tool} (apt-get install zip unzip)")


def test_quick_benchmark_writes_every_section_and_every_variant_gets_every_instance(
    tmp_path: Path, pg_server_url: str, tools: None
) -> None:
    from benchmarks.run import main

    out = tmp_path / "out" / "results.md"
    status = main(["--quick", "--work-dir", str(tmp_path / "work"), "--out", str(out), "--pg-admin-url", pg_server_url])

    results = json.loads(out.with_suffix(".json").read_text())
    assert status == 0, results["failures"]
    markdown = out.read_text()
    for heading in SECTIONS:
        assert heading in markdown, heading
    rows = {row["key"]: row for row in results["retrieval"]}
    assert set(rows) == QUICK_VARIANTS
    for key, row in rows.items():
        assert row["status"] == "ok", (key, row["reason"])
        expected = 8 if key.endswith("-nagle") else 24  # Nagle rows: 2 of the 6 series
        assert row["instances"] == row["expected_instances"] == expected, key
        assert row["bytes"] > expected * 256 * 256 * 2, key  # every pixel arrived, headers on top
        assert row["complete"], key
        assert f"| {row['label']}" in markdown
    archive_runs = {run["key"]: run for run in results["archiving"]["runs"]}
    assert set(archive_runs) == {"dicom-assets", "zip-6", "zip-1"}
    assert archive_runs["dicom-assets"]["readable_by_unzip"] is True
    assert all(run["output_bytes"] > 0 and run["ratio"] > 1.0 for run in archive_runs.values())
    discovery = results["discovery"]
    assert discovery["status"] == "ok", discovery["reason"]
    assert discovery["figures"]["patients"] == 20
    assert 0 < discovery["figures"]["second_requests"] < discovery["figures"]["first_requests"]
    wan_rows = {row["key"]: row for row in results["wan"]["figures"]["rows"]}
    assert set(wan_rows) == {"dcmtk-move", "project-default"}, results["wan"]  # over the delay proxies
    assert all(row["complete"] and row["instances"] == row["expected_instances"] for row in wan_rows.values()), wan_rows
    assert wan_rows["project-default"]["instances"] == 24 and wan_rows["project-default"]["whole_cohort"]
    # DCMTK's one series at a time is round-trip bound: it retrieves the first 2 of the 3 patients
    assert (wan_rows["dcmtk-move"]["instances"], wan_rows["dcmtk-move"]["series"]) == (16, 4), wan_rows["dcmtk-move"]
    assert results["scale"]["status"] == "not run"
    if results.get("chart"):  # matplotlib is a `bench` extra, absent under plain `make test`
        assert out.with_suffix(".png").stat().st_size > 0


def test_profile_sorts_each_threads_samples_into_what_it_was_doing(tmp_path: Path) -> None:
    from benchmarks.profile import OTHER, summarize

    serve = "thread (1): storage-scp-1;Thread.run (threading.py:982);StorageReceiver._serve (receiver.py:438)"
    move = "thread (2): retrieve_0;_retrieve_with_retries (retrieval.py:440);PacsSession.move (client.py:582)"
    raw = tmp_path / "py-spy.txt"
    raw.write_text("\n".join([
        f"{serve};Association.messages (upper_layer.py:220);_Buffered.exact (upper_layer.py:88);_Buffered._fill (upper_layer.py:78) 30",
        f"{serve};IncomingInstance._open_file (receiver.py:221) 5",
        f"{serve};IncomingInstance._open_file (receiver.py:222);IncomingInstance._append (receiver.py:231) 7",
        f"{serve};routing_uids (routing.py:116) 2",
        f"{move};RequestorAssociation.send_c_move (requestor.py:188);_Buffered._fill (upper_layer.py:78) 40",
        f"{move};StateStore.finish_series (state.py:600);Cursor.execute (cursor.py:113) 3",
        "thread (3): MainThread;Future.result (_base.py:451) 99",
    ]))  # fmt: skip
    found = summarize(raw)
    assert found["receiving"] == {
        "waiting for the PACS's bytes": 30, "creating instance files": 5, "writing instance files": 7, OTHER: 2,
    }  # fmt: skip
    assert found["requesting"] == {"waiting for C-MOVE responses": 40, "state DB (claims, results)": 3}
