"""``promtool`` (Debian's ``prometheus`` package): check metrics, check and test rules."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from tests.support.services import missing_service


def promtool() -> str:
    """The promtool binary; skips (or fails under EDGE_REQUIRE_SERVICES=1) without it."""
    found = shutil.which("promtool")
    if found is None:
        missing_service("promtool not installed (apt-get install prometheus)")
        raise AssertionError("unreachable")  # missing_service skips or fails
    return found


def check_metrics(exposition: bytes) -> subprocess.CompletedProcess[str]:
    """``promtool check metrics`` on one /metrics answer (its lint findings on stdout/err)."""
    return subprocess.run(
        [promtool(), "check", "metrics"],
        input=exposition.decode("utf-8"),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def run(*args: str | Path, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [promtool(), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        cwd=cwd,
    )
