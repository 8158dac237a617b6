from __future__ import annotations

import logging

import pytest

from cloud_sync.uploader import DrainProgress


def test_a_large_drain_reports_progress_in_the_log_when_not_on_a_terminal(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="cloud_sync.uploader")
    progress = DrainProgress(30_000, log_every_s=0.0)
    progress.advance(5_000, 25_000)
    progress.advance(5_000, 20_000)
    progress.close()
    messages = [record.getMessage() for record in caplog.records]
    assert messages[0] == "sync.drain.start backlog=30000"
    assert messages[1].startswith("sync.drain.progress sent=5000 remaining=25000 ")
    assert messages[2].startswith("sync.drain.progress sent=10000 remaining=20000 ")


def test_progress_lines_are_spaced_in_time(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="cloud_sync.uploader")
    progress = DrainProgress(30_000, log_every_s=3600.0)
    for _ in range(10):
        progress.advance(1_000, 0)
    progress.close()
    progress_lines = [r for r in caplog.records if "sync.drain.progress" in r.getMessage()]
    assert progress_lines == []
