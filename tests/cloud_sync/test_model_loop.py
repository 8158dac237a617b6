"""The model loop end to end with real files and real processes: simulate, train three models
before a cut, ``edge-models evaluate`` writes evaluation.json, and ``customer-store model
publish`` against a real store database refuses the worse candidate unless forced and takes
the better one as a canary. Both backends."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.model_loop import CUT, LoopModels, build_loop_models


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> LoopModels:
    return build_loop_models(tmp_path_factory.mktemp("loop"))


def run(module: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
    )


def evaluate(events: Path, candidate: Path, current: Path) -> dict[str, object]:
    done = run(
        "models.cli",
        "evaluate",
        "--model",
        str(candidate),
        "--current",
        str(current),
        "--events",
        str(events),
        "--holdout-from",
        CUT,
        "--json",
    )
    assert done.returncode == 0, done.stderr
    document: dict[str, object] = json.loads(done.stdout)
    return document


def publish(db_url: str, directory: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return run(
        "cloud_sync.store", "model", "publish", "--db", db_url, "--dir", str(directory), *extra
    )


def test_publish_refuses_the_worse_candidate_and_takes_the_better(
    trained: LoopModels, db_url: str, tmp_path: Path
) -> None:
    dirs = {}
    for name in ("current", "better", "worse"):
        dirs[name] = tmp_path / name
        shutil.copytree(getattr(trained, name), dirs[name])

    first = publish(db_url, dirs["current"])
    assert first.returncode == 0, first.stderr
    assert "promoted" in first.stdout

    # Without an evaluation the gate refuses; with a losing one too.
    refused = publish(db_url, dirs["worse"], "--canary", "50")
    assert refused.returncode == 1
    assert "evaluation.json is missing" in refused.stderr
    assert evaluate(trained.events, dirs["worse"], dirs["current"])["beats_current"] is False
    refused = publish(db_url, dirs["worse"], "--canary", "50")
    assert refused.returncode == 1
    assert "does not beat the current version current-1" in refused.stderr

    assert evaluate(trained.events, dirs["better"], dirs["current"])["beats_current"] is True
    accepted = publish(db_url, dirs["better"], "--canary", "50")
    assert accepted.returncode == 0, accepted.stderr
    assert "canary percent=50 gate=beats_current" in accepted.stdout

    forced = publish(db_url, dirs["worse"], "--canary", "10", "--force")
    assert forced.returncode == 0, forced.stderr
    assert "gate=forced: candidate worse-1 does not beat the current version" in forced.stdout
