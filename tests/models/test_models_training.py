"""Training and evaluation on simulator data: quality, holdout, consent and size bounds."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from models.evaluate import evaluate
from models.events import load_event_log
from models.manifest import read_manifest
from models.onnx_graph import build_model, serialize
from models.pipeline import train_to_dir
from models.scoring import ModelTensors
from models.serving import SuggestionModel
from models.train import TrainedModel, TrainingParams, train_model

TRIGGERS = {"product.pickup", "product.scan", "kiosk.view", "basket.add", "customer.identified"}


def _lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def _write(path: Path, events: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(event) + "\n" for event in events), encoding="utf-8")
    return path


def _declined(events: list[dict[str, Any]]) -> set[str]:
    latest: dict[str, bool] = {}
    for event in sorted(events, key=lambda e: e["ts"]):
        if event["type"] == "consent.update":
            latest[event["customer_id"]] = event["data"]["personalization"]
    return {customer for customer, allowed in latest.items() if not allowed}


def _assert_same_model(first: TrainedModel, second: TrainedModel) -> None:
    assert first.items == second.items
    assert first.spec == second.spec
    for name in ("neighbour_items", "neighbour_weights", "hour_table", "store_table"):
        assert np.array_equal(getattr(first.tensors, name), getattr(second.tensors, name)), name
    assert np.array_equal(first.tensors.device_table, second.tensors.device_table)


def test_model_beats_both_popularity_baselines_by_a_clear_margin(holdout_model_dir: Path) -> None:
    report = read_manifest(holdout_model_dir).raw["metrics"]["holdout_last"]
    model = report["model"]["hit_rate@10"]
    assert report["customers"] >= 200
    assert model >= 0.25
    assert model >= 3 * report["popularity"]["hit_rate@10"]
    assert model >= 3 * report["session_popularity"]["hit_rate@10"]
    assert report["model"]["ndcg@10"] > 2 * report["popularity"]["ndcg@10"]
    assert report["model"]["mrr@10"] <= report["model"]["ndcg@10"] <= model


def test_evaluation_covers_consenting_customers_and_detects_leakage(
    events_file: Path, holdout_model_dir: Path, tmp_path: Path
) -> None:
    log = load_event_log(events_file)
    held_out = evaluate(SuggestionModel.load(holdout_model_dir), log, progress=False)
    with_context = [t for t in log.consenting() if len({i.sku for i in t.interactions}) > 1]
    assert held_out["customers"] == len(with_context)
    # a model that saw the targets must look better: the holdout really hides them
    leaky, _ = train_to_dir(events_file, tmp_path / "leaky", holdout_last=False, progress=False)
    leaked = evaluate(leaky, log, progress=False)
    assert leaked["model"]["hit_rate@10"] > held_out["model"]["hit_rate@10"]


def test_holdout_last_equals_training_without_each_last_take(
    events_file: Path, tmp_path: Path
) -> None:
    events = _lines(events_file)
    declined = _declined(events)
    by_customer: dict[str, list[int]] = defaultdict(list)
    for position, event in sorted(enumerate(events), key=lambda pair: pair[1]["ts"]):
        if event["type"] in TRIGGERS and event["data"].get("sku"):
            by_customer[event["customer_id"]].append(position)
    dropped: set[int] = set()
    for customer, positions in by_customer.items():
        if customer in declined:
            continue
        last_sku = events[positions[-1]]["data"]["sku"]
        while positions and events[positions[-1]]["data"]["sku"] == last_sku:
            dropped.add(positions.pop())
    kept = [event for position, event in enumerate(events) if position not in dropped]
    reduced = _write(tmp_path / "without_last.jsonl", kept)

    with_holdout = train_model(load_event_log(events_file), holdout_last=True, progress=False)
    without_last = train_model(load_event_log(reduced), holdout_last=False, progress=False)
    _assert_same_model(with_holdout, without_last)
    assert with_holdout.stats["held_out_takes"] == len(by_customer) - len(
        declined & set(by_customer)
    )
    assert with_holdout.stats["takes"] == without_last.stats["takes"]


def test_customers_without_personalization_consent_are_left_out(
    events_file: Path, tmp_path: Path
) -> None:
    events = _lines(events_file)
    declined = _declined(events)
    assert declined, "the fixture must contain customers who declined"
    kept = [event for event in events if event["customer_id"] not in declined]
    full = train_model(load_event_log(events_file), progress=False)
    without = train_model(load_event_log(_write(tmp_path / "c.jsonl", kept)), progress=False)
    _assert_same_model(full, without)
    assert full.stats["excluded_customers_no_consent"] == len(declined)
    assert without.stats["excluded_customers_no_consent"] == 0


def test_training_is_deterministic(events_file: Path) -> None:
    log = load_event_log(events_file)
    _assert_same_model(train_model(log, progress=False), train_model(log, progress=False))


@pytest.mark.parametrize("neighbours", [10, 40])
def test_worst_case_model_for_5000_items_stays_under_4_mb(neighbours: int) -> None:
    params = TrainingParams(neighbours=neighbours)
    n_items, rng = 5000, np.random.default_rng(0)
    tensors = ModelTensors(
        neighbour_items=rng.integers(0, n_items, (n_items + 1, neighbours)).astype(np.int32),
        neighbour_weights=rng.random((n_items + 1, neighbours)).astype(np.float32),
        hour_table=rng.random((24, n_items)).astype(np.float32),
        store_table=rng.random((params.max_stores + 1, n_items)).astype(np.float32),
        device_table=rng.random((params.max_devices + 1, n_items)).astype(np.float32),
    )
    size = len(serialize(build_model(tensors, params.history_length)))
    assert size < 4 * 1024 * 1024
