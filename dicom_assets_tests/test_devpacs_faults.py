"""Fault injection in the bundled PACS: reset above N requests per window, drop every N seconds.

Real associations on loopback; short windows keep it fast.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import pytest
from pynetdicom import AE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from dicom_assets.devpacs import DevPacs
from dicom_assets.pacs.client import PacsClient, PacsUnavailable
from dicom_assets_tests.conftest import free_port
from dicom_assets_tests.pacs_fixtures import make_settings, small_cohort


def _wait_until(condition: Callable[[], bool], timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return condition()


def _idle_association(port: int):
    """A plain association that sends nothing: it only sees a reset as an A-ABORT."""
    ae = AE(ae_title="BYSTANDER")
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", port, ae_title="DEVPACS")
    assert assoc.is_established
    return assoc


@pytest.fixture
def cohort_dir(tmp_path: Path) -> Path:
    small_cohort(tmp_path / "pacs", patient_ids=("P1",), series=1, slices=2)
    return tmp_path / "pacs"


def test_reset_above_limit_aborts_every_open_association(cohort_dir: Path, tmp_path: Path) -> None:
    limit = 6
    with DevPacs(cohort_dir, reset_above_per_minute=limit, window_s=30.0) as pacs:
        bystander = _idle_association(pacs.port)  # request 1
        settings = make_settings(tmp_path, pacs.port, free_port(), "sqlite://")
        sent = 1
        with PacsClient(settings.pacs).session() as session:
            with pytest.raises(PacsUnavailable):
                for _ in range(20):
                    session.echo()  # the first also opens the association: 2 requests
                    sent = 1 + session.requests
            failed_at = session.requests + 1  # the requests the PACS received, the one reset included
        assert sent == limit  # every request up to the limit was answered
        assert failed_at == limit + 1
        assert pacs.resets_triggered == 1
        assert pacs.peak_requests_per_minute == limit + 1
        assert pacs.requests_served == limit + 1
        # The association that never sent anything was aborted too.
        assert _wait_until(lambda: bystander.is_aborted, 5.0)
        assert not bystander.is_established
        assert _wait_until(lambda: pacs.associations_aborted == 2, 5.0)
        # Still over the limit in this window: a new association is aborted at once.
        with PacsClient(settings.pacs).session() as session:
            with pytest.raises(PacsUnavailable, match="aborted"):
                session.echo()
        assert pacs.resets_triggered == 2
        assert pacs.peak_requests_per_minute == limit + 2


def test_window_slides_and_peak_counts_the_busiest_window(cohort_dir: Path, tmp_path: Path) -> None:
    window = 1.0
    with DevPacs(cohort_dir, reset_above_per_minute=4, window_s=window) as pacs:
        settings = make_settings(tmp_path, pacs.port, free_port(), "sqlite://")
        with PacsClient(settings.pacs).session() as session:
            session.echo()
            session.echo()
            session.echo()  # 4 requests in the window: at the limit, not over
            time.sleep(window + 0.2)
            for _ in range(3):  # the first 4 left the window: 3 more are fine
                session.echo()
        assert pacs.resets_triggered == 0
        assert pacs.peak_requests_per_minute == 4
        assert pacs.requests_served == 7


def test_drop_every_aborts_open_associations_periodically(cohort_dir: Path, tmp_path: Path) -> None:
    every = 0.5
    with DevPacs(cohort_dir, drop_every_s=every) as pacs:
        settings = make_settings(tmp_path, pacs.port, free_port(), "sqlite://")
        first = _idle_association(pacs.port)
        assert _wait_until(lambda: first.is_aborted, 5 * every)
        second = _idle_association(pacs.port)
        assert _wait_until(lambda: second.is_aborted, 5 * every)
        assert pacs.drops >= 2
        # A client reopens after a drop: its next request works on a new association.
        with PacsClient(settings.pacs).session() as session:
            session.echo()
            assert _wait_until(lambda: pacs.drops >= 4, 5 * every)
            session.echo()
            assert session.requests == 4  # association, echo, association again, echo
        assert pacs.resets_triggered == 0
    drops = pacs.drops
    time.sleep(2 * every)
    assert pacs.drops == drops  # stop() ended the dropping thread


def test_pacs_serve_cli_takes_the_fault_flags(cohort_dir: Path, tmp_path: Path) -> None:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "dicom_assets.cli", "pacs", "serve", "--dir", str(cohort_dir), "--port", str(port),
         "--reset-above-per-minute", "3", "--drop-every", "600"],
        env={**os.environ, "DICOM_ASSETS_BUDGET_WINDOW_S": "30"}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        settings = make_settings(tmp_path, port, free_port(), "sqlite://")
        with PacsClient(settings.pacs).session() as session:
            assert _wait_until(lambda: _echo_ok(session), 20.0)
        with PacsClient(settings.pacs).session() as session:
            with pytest.raises(PacsUnavailable):
                for _ in range(5):
                    session.echo()
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=20)
    assert proc.returncode == 0, err
    assert "resetting every association" in err


def _echo_ok(session) -> bool:  # type: ignore[no-untyped-def]
    try:
        session.echo()
        return True
    except PacsUnavailable:
        return False
