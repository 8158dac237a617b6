"""``edge-models`` through ``main(argv)``: the contracts on stdout and the exit codes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from models.cli import main
from models.manifest import sha256_of
from models.serving import SuggestionModel

METRIC_KEYS = {"hit_rate@10", "ndcg@10", "mrr@10"}


def test_simulate_train_evaluate_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    events, model_dir = tmp_path / "events.jsonl", tmp_path / "model"
    args = ["--customers", "80", "--days", "7", "--items", "150", "--seed", "9"]
    assert main(["simulate", "--out", str(events), *args]) == 0
    simulated = json.loads(capsys.readouterr().out)
    assert simulated["events"] == len(events.read_text(encoding="utf-8").splitlines())

    train = ["train", "--events", str(events), "--out", str(model_dir), "--holdout-last"]
    assert main(train) == 0
    trained = json.loads(capsys.readouterr().out)
    assert trained["metrics"]["holdout_last"]["customers"] > 0

    assert main(["evaluate", "--model", str(model_dir), "--events", str(events), "--json"]) == 0
    out = capsys.readouterr().out
    assert out.count("\n") == 1
    report = json.loads(out)
    assert set(report) == {"model", "popularity", "session_popularity", "customers"}
    for method in ("model", "popularity", "session_popularity"):
        assert set(report[method]) == METRIC_KEYS
        assert all(0.0 <= value <= 1.0 for value in report[method].values())
    assert isinstance(report["customers"], int)
    assert report["customers"] == trained["metrics"]["holdout_last"]["customers"]
    assert report == trained["metrics"]["holdout_last"]


def test_manifest_has_the_documented_fields(holdout_model_dir: Path) -> None:
    manifest = json.loads((holdout_model_dir / "manifest.json").read_text(encoding="utf-8"))
    for field in (
        "version", "items", "feature_spec", "training_window", "metrics", "sha256",
        "created_at", "top_k", "golden_requests", "onnx", "format_version",
    ):  # fmt: skip
        assert field in manifest, field
    assert manifest["sha256"] == sha256_of(holdout_model_dir / "model.onnx")
    assert manifest["training"]["holdout_last"] is True
    assert manifest["training_window"]["start"] < manifest["training_window"]["end"]


def test_evaluate_prints_a_table_without_json(
    holdout_model_dir: Path, events_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["evaluate", "--model", str(holdout_model_dir), "--events", str(events_file)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["method", "hit_rate@10", "ndcg@10", "mrr@10"]
    assert [line.split()[0] for line in lines[1:4]] == ["model", "popularity", "session_popularity"]


def test_export_verifies_and_copies(
    holdout_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["export", "--model", str(holdout_model_dir)]) == 0
    assert json.loads(capsys.readouterr().out)["ok"] is True
    target = tmp_path / "drop" / "next-model"
    assert main(["export", "--model", str(holdout_model_dir), "--out", str(target)]) == 0
    capsys.readouterr()
    assert SuggestionModel.load(target).version == SuggestionModel.load(holdout_model_dir).version
    assert sha256_of(target / "model.onnx") == sha256_of(holdout_model_dir / "model.onnx")
    assert sorted(path.name for path in target.parent.iterdir()) == ["next-model"]


def test_a_corrupt_model_exits_1_with_a_message(
    model_copy: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (model_copy / "model.onnx").write_bytes(b"garbage")
    assert main(["export", "--model", str(model_copy)]) == 1
    assert "sha256" in capsys.readouterr().err


def test_a_missing_events_file_exits_1(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "nope.jsonl"
    assert main(["train", "--events", str(missing), "--out", str(tmp_path / "m")]) == 1
    assert "not found" in capsys.readouterr().err
