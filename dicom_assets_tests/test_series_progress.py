"""The run log's progress lines (series_progress.py): a real logging.Logger, real outcomes."""

from __future__ import annotations

import logging

import pytest

from dicom_assets.series_attempt import SeriesOutcome
from dicom_assets.series_progress import SeriesProgress


def _outcome(n: int, status: str = "complete", error: str | None = None) -> SeriesOutcome:
    return SeriesOutcome(f"1.2.3.{n}", status, instances=10, bytes_on_disk=5_000_000, bytes_received=5_000_000, seconds=0.5, error=error)


def test_completed_series_share_a_line_and_a_failure_is_logged_at_once(caplog: pytest.LogCaptureFixture) -> None:
    log = logging.getLogger("dicom_assets.test_progress")
    progress = SeriesProgress(log, every_s=3600)
    with caplog.at_level(logging.INFO, logger=log.name):
        for n in range(5):
            progress.note(_outcome(n))
        assert caplog.records == []  # nothing yet: one line per every_s
        progress.note(_outcome(5, "incomplete", "3 of 10 instances"))
        assert [r.levelno for r in caplog.records] == [logging.WARNING]
        assert "[6] series 1.2.3.5: incomplete" in caplog.records[0].getMessage() and "3 of 10" in caplog.records[0].getMessage()
        progress.flush()
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2 and lines[1].startswith("[6] 5 series complete since the last line (50 instances, 25.0 MB)")
    assert "the last 1.2.3.4" in lines[1]


def test_a_line_is_written_once_every_s_has_passed(caplog: pytest.LogCaptureFixture) -> None:
    log = logging.getLogger("dicom_assets.test_progress")
    progress = SeriesProgress(log, every_s=0.0)  # every note is past the interval
    with caplog.at_level(logging.INFO, logger=log.name):
        progress.note(_outcome(1))
        progress.note(_outcome(2))
        progress.flush()  # nothing pending: no empty line
    assert [r.getMessage()[:27] for r in caplog.records] == ["[1] 1 series complete since", "[2] 1 series complete since"]
