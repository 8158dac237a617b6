"""Shared, seeded data for the model tests: one small simulated store and models trained on it.

Session-scoped because simulating and training take about a second each; every test that
changes a file works on its own copy in its own tmp_path.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from models.pipeline import train_to_dir
from models.simulator import SimulationConfig, write_events

SMALL_WORLD = SimulationConfig(seed=5, customers=300, days=21, items=400, stores=2)


@pytest.fixture(scope="session")
def events_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("events") / "events.jsonl"
    write_events(SMALL_WORLD, path)
    return path


@pytest.fixture(scope="session")
def holdout_model_dir(events_file: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("models") / "holdout"
    train_to_dir(events_file, out, holdout_last=True, progress=False)
    return out


@pytest.fixture
def model_copy(holdout_model_dir: Path, tmp_path: Path) -> Path:
    """A private copy of the holdout model directory, free to corrupt."""
    copy = tmp_path / "model"
    shutil.copytree(holdout_model_dir, copy)
    return copy
