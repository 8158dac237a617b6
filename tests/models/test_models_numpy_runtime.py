"""The numpy runtime against onnxruntime: the same bytes out for the same requests, on the
bundled model, on freshly trained ones and on hand-built graphs that use the ops' other
attributes; unsupported graphs named, and the ``auto`` choice."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import onnx
import onnxruntime as ort
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from models.errors import ModelFormatError, ModelRunError, UnsupportedModelError
from models.graph_names import OUTPUT_NAMES
from models.numpy_runtime import NumpySession
from models.onnx_reader import read_model
from models.pipeline import train_to_dir
from models.serving import DEFAULT_MODEL_DIR, SuggestionModel
from models.sessions import OnnxRuntimeSession, open_session
from models.simulator import SimulationConfig, write_events
from models.train import TrainingParams

EVENT_TYPES = ["product.pickup", "basket.add", "kiosk.view", "product.scan", "checkout.purchase"]


def _same(left: list[npt.NDArray[Any]], right: list[npt.NDArray[Any]]) -> None:
    assert len(left) == len(right)
    for got, want in zip(left, right, strict=True):
        assert got.dtype == want.dtype
        assert got.shape == want.shape
        assert got.tobytes() == want.tobytes(), (got[:8], want[:8])


def _both(model_dir: Path) -> tuple[SuggestionModel, SuggestionModel]:
    numpy_model = SuggestionModel.load(model_dir, runtime="numpy")
    ort_model = SuggestionModel.load(model_dir, runtime="onnxruntime")
    assert (numpy_model.runtime, ort_model.runtime) == ("numpy", "onnxruntime")
    return numpy_model, ort_model


def _random_requests(
    model: SuggestionModel, rng: random.Random, count: int
) -> list[tuple[Any, ...]]:
    spec = model.feature_spec
    stores = [*spec.stores, "store-unknown"]
    devices = [*spec.devices, "device-unknown", None]
    requests = []
    for _ in range(count):
        length = rng.choice([0, 0, 1, 3, spec.history_length, spec.history_length * 2 + 3])
        history = [
            (rng.choice(model.items), rng.choice(EVENT_TYPES), 1.7e9 + 60.0 * step)
            for step in range(length)
        ]
        penalty = rng.sample(model.items, rng.choice([0, 1, 5, min(50, len(model.items))]))
        k = rng.choice([1, 5, 10, len(model.items)])
        context = (rng.randrange(24), rng.choice(stores), rng.choice(devices))
        exclude = rng.random() < 0.8
        requests.append((history, context, penalty, k, exclude))
    return requests


def _compare(numpy_model: SuggestionModel, ort_model: SuggestionModel, requests: Any) -> int:
    compared = 0
    for history, context, penalty, k, exclude in requests:
        feeds = numpy_model.build_feeds(history, context, penalty, k=k, exclude_history=exclude)
        frozen = {name: array.copy() for name, array in feeds.items()}
        _same(list(numpy_model.run_feeds(frozen)), list(ort_model.run_feeds(frozen)))
        answer = numpy_model.suggest(history, context, penalty, k=k, exclude_history=exclude)
        expected = ort_model.suggest(history, context, penalty, k=k, exclude_history=exclude)
        assert answer == expected
        compared += 1
    return compared


def test_the_bundled_model_answers_the_same_on_both_runtimes() -> None:
    numpy_model, ort_model = _both(DEFAULT_MODEL_DIR)
    requests = _random_requests(numpy_model, random.Random(11), 400)
    assert _compare(numpy_model, ort_model, requests) == 400


@pytest.mark.parametrize(
    ("items", "history_length", "neighbours", "stores"),
    [(40, 1, 4, 1), (400, 16, 32, 2), (1500, 48, 8, 5)],
)
def test_freshly_trained_models_answer_the_same_on_both_runtimes(
    tmp_path: Path, items: int, history_length: int, neighbours: int, stores: int
) -> None:
    events = tmp_path / "events.jsonl"
    world = SimulationConfig(seed=items, customers=150, days=10, items=items, stores=stores)
    write_events(world, events)
    params = TrainingParams(history_length=history_length, neighbours=neighbours)
    train_to_dir(events, tmp_path / "model", params=params, progress=False)
    numpy_model, ort_model = _both(tmp_path / "model")
    assert numpy_model.feature_spec.history_length == history_length
    requests = _random_requests(numpy_model, random.Random(items), 150)
    assert _compare(numpy_model, ort_model, requests) == 150


@pytest.fixture(scope="module")
def bundled_pair() -> tuple[SuggestionModel, SuggestionModel]:
    return _both(DEFAULT_MODEL_DIR)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    history=st.lists(st.integers(0, 2000), max_size=40),
    weights=st.lists(st.floats(0.0, 1.0, width=32), min_size=16, max_size=16),
    hour=st.integers(0, 23),
    store=st.integers(0, 3),
    device=st.integers(0, 21),
    penalty=st.lists(st.integers(0, 1993), max_size=30),
    penalty_value=st.sampled_from([1e9, 0.5, -3.0, 1e-3]),
    k=st.integers(1, 1994),
)
def test_any_feed_gives_the_same_bytes_on_both_runtimes(
    bundled_pair: tuple[SuggestionModel, SuggestionModel],
    history: list[int],
    weights: list[float],
    hour: int,
    store: int,
    device: int,
    penalty: list[int],
    penalty_value: float,
    k: int,
) -> None:
    """Raw feeds, not only what the encoder builds: any valid index, unnormalised weights,
    penalties that reorder rather than mask, any k."""
    numpy_model, ort_model = bundled_pair
    n_items = len(numpy_model.items)
    slots = np.full(16, n_items, np.int64)  # padding row past the history
    slots[: min(16, len(history))] = [index % (n_items + 1) for index in history[:16]]
    scores_penalty = np.zeros(n_items, np.float32)
    scores_penalty[penalty] = penalty_value
    feeds: dict[str, npt.NDArray[Any]] = {
        "history_items": slots,
        "history_weights": np.array(weights, np.float32),
        "hour": np.array([hour], np.int64),
        "store": np.array([store], np.int64),
        "device": np.array([device], np.int64),
        "penalty": scores_penalty,
        "k": np.array([k], np.int64),
    }
    _same(list(numpy_model.run_feeds(feeds)), list(ort_model.run_feeds(feeds)))


def test_a_feed_outside_the_tables_fails_on_both_runtimes(
    bundled_pair: tuple[SuggestionModel, SuggestionModel],
) -> None:
    numpy_model, ort_model = bundled_pair
    feeds: dict[str, npt.NDArray[Any]] = {
        name: array.copy() for name, array in numpy_model.build_feeds([], (1, "s", None)).items()
    }
    feeds["store"][0] = 1000
    with pytest.raises(ModelRunError, match="Gather"):
        numpy_model.run_feeds(feeds)
    with pytest.raises(Exception, match=r"out of bounds|indices"):  # onnxruntime's own error
        ort_model.run_feeds(feeds)
    feeds["store"][0] = 0
    with pytest.raises(ModelRunError, match="history_items"):
        numpy_model.run_feeds({**feeds, "history_items": feeds["history_items"][:3]})
    with pytest.raises(ModelRunError, match="float32"):
        numpy_model.run_feeds({**feeds, "penalty": feeds["penalty"].astype(np.float64)})


# Hand-built graphs: the ops with the attributes the exporter does not use today.


def _model(
    nodes: list[onnx.NodeProto],
    inputs: list[onnx.ValueInfoProto],
    outputs: list[onnx.ValueInfoProto],
    initializers: list[onnx.TensorProto] = (),  # type: ignore[assignment]
    opset: int = 18,
) -> bytes:
    graph = helper.make_graph(nodes, "test", inputs, outputs, list(initializers))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=9)
    data: bytes = model.SerializeToString()
    return data


def _run_both(data: bytes, feeds: dict[str, npt.NDArray[Any]]) -> list[npt.NDArray[Any]]:
    numpy_session = NumpySession(read_model(data))
    ort_session = OnnxRuntimeSession(data, "test")
    got = numpy_session.run(None, feeds)
    _same(got, ort_session.run(None, feeds))
    return got


def _info(name: str, dtype: int, shape: list[Any]) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, dtype, shape)


F, I64 = TensorProto.FLOAT, TensorProto.INT64


@pytest.mark.parametrize("axis", [0, 1, -1])
def test_gather_on_any_axis_with_negative_indices(axis: int) -> None:
    data = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    indices = np.array([[0, -1], [1, 1]], np.int64)
    model = _model(
        [helper.make_node("Gather", ["data", "indices"], ["out"], axis=axis)],
        [_info("indices", I64, [2, 2])],
        [_info("out", F, None)],  # type: ignore[arg-type]
        [numpy_helper.from_array(data, "data")],
    )
    (out,) = _run_both(model, {"indices": indices})
    assert out.shape == np.take(data, indices, axis=axis).shape


@pytest.mark.parametrize(
    ("shape", "allowzero"),
    [([-1], 0), ([0, -1], 0), ([3, 0, 2], 0), ([2, -1, 2], 0), ([6, 2, 1], 1)],
)
def test_reshape_with_zero_and_minus_one(shape: list[int], allowzero: int) -> None:
    model = _model(
        [helper.make_node("Reshape", ["x", "shape"], ["out"], allowzero=allowzero)],
        [_info("x", F, [3, 4]), _info("shape", I64, [len(shape)])],
        [_info("out", F, None)],  # type: ignore[arg-type]
    )
    x = np.arange(12, dtype=np.float32).reshape(3, 4)
    if shape == [3, 0, 2]:  # 0 copies dim 1 (4): 3*4*2 != 12, both refuse
        with pytest.raises(ModelRunError):
            NumpySession(read_model(model)).run(None, {"x": x, "shape": np.array(shape)})
        return
    _run_both(model, {"x": x, "shape": np.array(shape, np.int64)})


@pytest.mark.parametrize("axes", [[0], [-1], [0, 2], [-1, 1]])
def test_unsqueeze_with_negative_axes(axes: list[int]) -> None:
    model = _model(
        [helper.make_node("Unsqueeze", ["x", "axes"], ["out"])],
        [_info("x", F, [3, 2]), _info("axes", I64, [len(axes)])],
        [_info("out", F, None)],  # type: ignore[arg-type]
    )
    _run_both(model, {"x": np.ones((3, 2), np.float32), "axes": np.array(axes, np.int64)})


@pytest.mark.parametrize("reduction", ["add", "none"])
@pytest.mark.parametrize("axis", [0, 1, -1])
def test_scatter_elements_in_two_dimensions_with_repeats(reduction: str, axis: int) -> None:
    node = helper.make_node(
        "ScatterElements", ["data", "indices", "updates"], ["out"], axis=axis, reduction=reduction
    )
    model = _model(
        [node],
        [_info("data", F, [3, 4]), _info("indices", I64, [2, 3]), _info("updates", F, [2, 3])],
        [_info("out", F, [3, 4])],
    )
    rng = np.random.default_rng(3)
    indices = np.array([[0, 2, -1], [1, 1, 0]], np.int64)  # repeats, a negative index
    if reduction == "none":  # ONNX leaves repeated targets undefined without a reduction
        indices = np.array([[0, 2, -1], [1, 0, 2]], np.int64)
    feeds: dict[str, npt.NDArray[Any]] = {
        "data": rng.random((3, 4), np.float32),
        "indices": indices,
        "updates": rng.random((2, 3), np.float32),
    }
    _run_both(model, feeds)


def test_scatter_elements_add_sums_repeats_in_order_in_float32() -> None:
    """Large and small updates on one target: the order of the float32 additions shows."""
    model = _model(
        [helper.make_node("ScatterElements", ["d", "i", "u"], ["o"], axis=0, reduction="add")],
        [_info("d", F, [2]), _info("i", I64, [6]), _info("u", F, [6])],
        [_info("o", F, [2])],
    )
    updates = np.array([1.0, 1.0, 1e8, -1e8, 3.0, 0.25], np.float32)
    (out,) = _run_both(
        model,
        {"d": np.zeros(2, np.float32), "i": np.array([0, 0, 0, 0, 1, 1]), "u": updates},
    )
    # in order, in float32: 2 + 1e8 rounds to 1e8, then 0; in float64 or backwards: 2
    assert out.tolist() == [0.0, 3.25]


@pytest.mark.parametrize("largest", [1, 0])
@pytest.mark.parametrize("k", [0, 1, 3, 7, 40])
def test_top_k_ties_go_to_the_lower_index(largest: int, k: int) -> None:
    model = _model(
        [helper.make_node("TopK", ["x", "k"], ["values", "indices"], largest=largest)],
        [_info("x", F, [40]), _info("k", I64, [1])],
        [_info("values", F, ["k"]), _info("indices", I64, ["k"])],
    )
    rng = np.random.default_rng(k)
    x = rng.integers(0, 4, 40).astype(np.float32)  # four values: ties everywhere
    x[5] = -0.0
    values, indices = _run_both(model, {"x": x, "k": np.array([k], np.int64)})
    assert values.tolist() == x[indices].tolist()
    assert len(indices) == k


@pytest.mark.parametrize("axis", [0, 1, -1])
def test_top_k_in_two_dimensions(axis: int) -> None:
    model = _model(
        [helper.make_node("TopK", ["x", "k"], ["values", "indices"], axis=axis)],
        [_info("x", F, [5, 6]), _info("k", I64, [1])],
        [_info("values", F, None), _info("indices", I64, None)],  # type: ignore[arg-type]
    )
    x = np.random.default_rng(1).integers(0, 3, (5, 6)).astype(np.float32)
    _run_both(model, {"x": x, "k": np.array([3], np.int64)})


@settings(max_examples=150, deadline=None)
@given(
    values=st.lists(
        st.sampled_from([0.0, -0.0, 1.0, 2.5, -1.0, 1e9, -1e9, 3.4e38]), min_size=1, max_size=300
    ),
    k_share=st.floats(0.0, 1.0),
    largest=st.sampled_from([0, 1]),
)
def test_top_k_matches_onnxruntime_on_any_tied_vector(
    values: list[float], k_share: float, largest: int
) -> None:
    n = len(values)
    model = _model(
        [helper.make_node("TopK", ["x", "k"], ["values", "indices"], largest=largest)],
        [_info("x", F, [n]), _info("k", I64, [1])],
        [_info("values", F, ["k"]), _info("indices", I64, ["k"])],
    )
    k = round(k_share * n)
    _run_both(model, {"x": np.array(values, np.float32), "k": np.array([k], np.int64)})


# What the numpy runtime refuses, by name, and what auto then does.


def _relu_model() -> bytes:
    return _model(
        [helper.make_node("Relu", ["x"], ["y"])], [_info("x", F, [3])], [_info("y", F, [3])]
    )


@pytest.mark.parametrize(
    ("model", "named"),
    [
        (_relu_model(), "'Relu'"),
        (
            _model(
                [helper.make_node("TopK", ["x", "k"], ["v", "i"], sorted=0)],
                [_info("x", F, [4]), _info("k", I64, [1])],
                [_info("v", F, [None]), _info("i", I64, [None])],
            ),
            "sorted=0",
        ),
        (
            _model(
                [helper.make_node("ScatterElements", ["d", "i", "u"], ["o"], reduction="mul")],
                [_info("d", F, [4]), _info("i", I64, [2]), _info("u", F, [2])],
                [_info("o", F, [4])],
            ),
            "reduction 'mul'",
        ),
        (
            _model(
                [helper.make_node("Add", ["x", "x"], ["y"])],
                [_info("x", TensorProto.FLOAT16, [3])],
                [_info("y", TensorProto.FLOAT16, [3])],
            ),
            "FLOAT16",
        ),
        (
            _model(
                [helper.make_node("Gather", ["x", "i"], ["y"], axis=0)],
                [_info("i", I64, [1])],
                [_info("y", TensorProto.FLOAT16, [1])],
                [numpy_helper.from_array(np.zeros(3, np.float16), "x")],
            ),
            "FLOAT16",
        ),
        (
            _model(
                [helper.make_node("Unsqueeze", ["x"], ["y"], axes=[0])],
                [_info("x", F, [3])],
                [_info("y", F, [1, 3])],
                opset=11,
            ),
            "opset 11",
        ),
        (
            _model(
                [helper.make_node("ScatterElements", ["d", "i", "u"], ["o"], reduction="max")],
                [_info("d", F, [4]), _info("i", I64, [2]), _info("u", F, [2])],
                [_info("o", F, [4])],
            ),
            "reduction 'max'",
        ),
    ],
    ids=[
        "op",
        "topk-unsorted",
        "scatter-mul",
        "fp16-input",
        "fp16-initializer",
        "opset",
        "scatter-max",
    ],
)
def test_an_unsupported_graph_is_named_and_auto_falls_back(model: bytes, named: str) -> None:
    with pytest.raises(UnsupportedModelError, match=named):
        NumpySession(read_model(model))
    with pytest.raises(UnsupportedModelError, match=named):
        open_session(model, "numpy", "test.onnx")
    fallback = open_session(model, "auto", "test.onnx")
    assert fallback.runtime == "onnxruntime"


def test_an_attribute_no_version_of_the_op_has_is_refused_by_both() -> None:
    model = _model(
        [helper.make_node("Gather", ["x", "i"], ["y"], axis=0, batch_dims=0)],
        [_info("x", F, [3]), _info("i", I64, [1])],
        [_info("y", F, [1])],
    )
    with pytest.raises(UnsupportedModelError, match="'batch_dims'"):
        NumpySession(read_model(model))
    with pytest.raises(ModelFormatError, match="onnxruntime cannot load"):
        open_session(model, "auto", "test.onnx")


def test_a_graph_with_a_type_error_is_refused_by_both() -> None:
    model = _model(
        [helper.make_node("Add", ["x", "i"], ["y"])],
        [_info("x", F, [3]), _info("i", I64, [3])],
        [_info("y", F, [3])],
    )
    with pytest.raises(ModelFormatError, match="two types"):
        NumpySession(read_model(model))
    with pytest.raises(ModelFormatError, match="onnxruntime cannot load"):
        OnnxRuntimeSession(model, "test")


def test_a_graph_using_a_value_before_it_is_defined_is_refused() -> None:
    model = onnx.load_from_string(_relu_model())
    del model.graph.node[:]
    model.graph.node.extend(
        [helper.make_node("Add", ["t", "x"], ["y"]), helper.make_node("Add", ["x", "x"], ["t"])]
    )
    with pytest.raises(ModelFormatError, match="not defined before use"):
        NumpySession(read_model(model.SerializeToString()))


def test_auto_uses_numpy_for_the_bundled_model_and_both_pass_the_golden_requests() -> None:
    assert SuggestionModel.load(DEFAULT_MODEL_DIR).runtime == "numpy"
    session = open_session((DEFAULT_MODEL_DIR / "model.onnx").read_bytes(), "auto", "bundled")
    assert session.runtime == "numpy"
    assert session.output_names() == list(OUTPUT_NAMES)
    assert ort.__version__  # the reference runtime stays installed (export, fallback)
