"""The ONNX graph against the numpy reference: identical top-k, penalty masking, ties."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import onnx
import onnxruntime as ort
import pytest

from models.evaluate import evaluation_cases
from models.events import load_event_log
from models.features import MASK_PENALTY
from models.onnx_graph import IR_VERSION, OPSET, build_model, serialize, tensors_from_model
from models.scoring import ModelTensors, reference_top_k
from models.serving import SuggestionModel


def _session(model: onnx.ModelProto) -> ort.InferenceSession:
    return ort.InferenceSession(serialize(model), providers=["CPUExecutionProvider"])


def _feeds(n_items: int, history: list[int], weights: list[float], k: int) -> dict[str, Any]:
    length = 4
    items = np.full(length, n_items, np.int64)
    items[: len(history)] = history
    slot_weights = np.zeros(length, np.float32)
    slot_weights[: len(weights)] = weights
    return {
        "history_items": items,
        "history_weights": slot_weights,
        "hour": np.array([0], np.int64),
        "store": np.array([0], np.int64),
        "device": np.array([0], np.int64),
        "penalty": np.zeros(n_items, np.float32),
        "k": np.array([k], np.int64),
    }


def _flat_tensors(n_items: int) -> ModelTensors:
    """Every item scores the same unless a neighbour row adds to it: ties everywhere."""
    neighbours = np.zeros((n_items + 1, 3), np.int32)
    neighbours[:n_items] = [[5, 7, 9]] * n_items
    weights = np.zeros((n_items + 1, 3), np.float32)
    weights[:n_items] = 0.25
    table: npt.NDArray[np.float32] = np.full((24, n_items), 0.5, np.float32)
    return ModelTensors(neighbours, weights, table, table[:2].copy(), table[:2].copy())


def test_model_file_pins_ir_version_and_opset(holdout_model_dir: Path) -> None:
    model = onnx.load(str(holdout_model_dir / "model.onnx"))
    assert model.ir_version == IR_VERSION
    assert [(o.domain, o.version) for o in model.opset_import] == [("", OPSET)]
    onnx.checker.check_model(model)


def test_onnx_and_numpy_give_identical_top_k_on_the_whole_holdout(
    holdout_model_dir: Path, events_file: Path
) -> None:
    model = SuggestionModel.load(holdout_model_dir)
    tensors = tensors_from_model(onnx.load(str(holdout_model_dir / "model.onnx")))
    cases = list(evaluation_cases(load_event_log(events_file)))
    assert len(cases) >= 200
    for case in cases:
        for k in (10, 60):
            feeds = model.build_feeds(case.history, case.suggestion_context, case.taken, k=k)
            scores, indices = model.run_feeds(feeds)
            expected_scores, expected_indices = reference_top_k(tensors, feeds)
            assert indices.tolist() == expected_indices.tolist(), case.customer_id
            assert scores.tobytes() == expected_scores.tobytes(), case.customer_id


@pytest.mark.parametrize(
    ("history", "weights", "expected"),
    [
        ([], [], [0, 1, 2, 3, 4, 5]),
        ([2], [1.0], [5, 7, 9, 0, 1, 2]),
        ([2, 3], [0.5, 0.5], [5, 7, 9, 0, 1, 2]),
    ],
)
def test_ties_go_to_the_lower_index_in_both(
    history: list[int], weights: list[float], expected: list[int]
) -> None:
    n_items = 30
    tensors = _flat_tensors(n_items)
    session = _session(build_model(tensors, 4))
    feeds = _feeds(n_items, history, weights, k=6)
    _, indices = session.run(None, feeds)
    _, reference = reference_top_k(tensors, feeds)
    assert indices.tolist() == reference.tolist() == expected


def test_penalty_masks_items_out_of_the_top_k(holdout_model_dir: Path) -> None:
    model = SuggestionModel.load(holdout_model_dir)
    tensors = tensors_from_model(onnx.load(str(holdout_model_dir / "model.onnx")))
    history = [(model.items[3], "product.pickup", 1_000.0), (model.items[8], "basket.add", 1_010.0)]
    context = (18, "store-001", "shelf-02")
    first = model.run_feeds(model.build_feeds(history, context, k=10))[1].tolist()
    blocked = [model.items[index] for index in first[:5]]
    feeds = model.build_feeds(history, context, blocked, k=10)
    scores, indices = model.run_feeds(feeds)
    assert not set(indices.tolist()) & set(first[:5])
    assert indices.tolist()[:5] == first[5:10]
    assert np.all(scores > -MASK_PENALTY / 2)
    assert reference_top_k(tensors, feeds)[1].tolist() == indices.tolist()


@pytest.mark.parametrize("k", [1, 5, 400])
def test_k_is_an_input_up_to_the_catalogue(holdout_model_dir: Path, k: int) -> None:
    model = SuggestionModel.load(holdout_model_dir)
    scores, indices = model.run_feeds(model.build_feeds([], (9, "store-002", None), k=k))
    assert len(indices) == len(scores) == min(k, len(model.items))
    assert np.all(np.diff(scores) <= 0)
