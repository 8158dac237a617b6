"""The runtime API: integrity checks on load, golden requests, masking, feature building."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from models.errors import (
    ModelError,
    ModelFormatError,
    ModelIntegrityError,
    ModelVerificationError,
)
from models.events import parse_ts
from models.manifest import sha256_of
from models.serving import Runtime, SuggestionContext, SuggestionModel

EVENT_TYPES = ["product.pickup", "basket.add", "kiosk.view", "product.scan", "product.putback"]


def _edit_manifest(model_dir: Path, **changes: Any) -> None:
    path = model_dir / "manifest.json"
    manifest = json.loads(path.read_text(encoding="utf-8"))
    manifest.update(changes)
    path.write_text(json.dumps(manifest), encoding="utf-8")


@pytest.fixture(scope="module")
def model(holdout_model_dir: Path) -> SuggestionModel:
    return SuggestionModel.load(holdout_model_dir)


def test_load_exposes_version_items_and_top_k(model: SuggestionModel) -> None:
    assert model.version.startswith("sim-")
    assert len(model.items) == len(set(model.items)) > 100
    assert model.top_k == 10
    assert model.manifest.golden_requests  # stored at export, re-checked at every load


def test_a_flipped_byte_in_the_model_is_refused(model_copy: Path) -> None:
    data = bytearray((model_copy / "model.onnx").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (model_copy / "model.onnx").write_bytes(bytes(data))
    with pytest.raises(ModelIntegrityError, match="sha256"):
        SuggestionModel.load(model_copy)


def test_a_manifest_with_another_sha256_is_refused(model_copy: Path) -> None:
    _edit_manifest(model_copy, sha256="0" * 64)
    with pytest.raises(ModelIntegrityError):
        SuggestionModel.load(model_copy)


@pytest.mark.parametrize(
    ("runtime", "reason"),
    [("onnxruntime", "onnxruntime cannot load"), ("numpy", "claims"), ("auto", "claims")],
)
def test_a_truncated_model_with_a_matching_sha256_is_refused(
    model_copy: Path, runtime: Runtime, reason: str
) -> None:
    model_file = model_copy / "model.onnx"
    model_file.write_bytes(model_file.read_bytes()[:1000])
    _edit_manifest(model_copy, sha256=sha256_of(model_file))
    with pytest.raises(ModelFormatError, match=reason):
        SuggestionModel.load(model_copy, runtime=runtime)


@pytest.mark.parametrize(
    "damage",
    [
        lambda d: (d / "manifest.json").unlink(),
        lambda d: (d / "manifest.json").write_text("{not json", encoding="utf-8"),
        lambda d: (d / "model.onnx").unlink(),
        lambda d: _edit_manifest(d, items=["SKU-1", "SKU-2"]),
        lambda d: _edit_manifest(d, format_version=99),
        lambda d: _edit_manifest(d, model_file="../model.onnx"),
    ],
)
def test_broken_directories_raise_a_format_error(model_copy: Path, damage: Any) -> None:
    damage(model_copy)
    with pytest.raises(ModelFormatError):
        SuggestionModel.load(model_copy)


def test_a_golden_request_that_disagrees_is_refused(model_copy: Path) -> None:
    manifest = json.loads((model_copy / "manifest.json").read_text(encoding="utf-8"))
    expected = manifest["golden_requests"][0]["expected"]
    expected[0], expected[1] = expected[1], expected[0]
    (model_copy / "manifest.json").write_text(json.dumps(manifest), encoding="utf-8")
    with pytest.raises(ModelVerificationError, match="golden request 0"):
        SuggestionModel.load(model_copy)
    assert SuggestionModel.load(model_copy, check_golden=False).version == manifest["version"]


def test_suggest_excludes_history_and_penalty_and_is_sorted(model: SuggestionModel) -> None:
    history = [(model.items[i], "product.pickup", 100.0 + i) for i in range(5)]
    blocked = [model.items[10], model.items[11]]
    context = SuggestionContext(hour=12, store_id="store-001", device_id="shelf-03")
    answer = model.suggest(history, context, blocked, k=20)
    skus = [sku for sku, _ in answer]
    assert len(skus) == len(set(skus)) == 20
    assert not set(skus) & ({sku for sku, _, _ in history} | set(blocked))
    scores = [score for _, score in answer]
    assert scores == sorted(scores, reverse=True)
    feeds = model.build_feeds(history, context, blocked, exclude_history=False)
    assert not np.any(feeds["penalty"][:5])
    assert feeds["penalty"][[10, 11]].tolist() == [pytest.approx(1e9)] * 2


def test_features_collapse_a_take_and_normalise_weights(model: SuggestionModel) -> None:
    a, b = model.items[0], model.items[1]
    history = [(a, "kiosk.view", 0.0), (a, "product.pickup", 10.0), (b, "basket.add", 20.0)]
    feeds = model.build_feeds(history, (8, "store-001", None))
    n_items = len(model.items)
    items = feeds["history_items"].tolist()
    assert items[:2] == [1, 0]  # newest first, the two events on a are one take
    assert set(items[2:]) == {n_items}  # padding
    assert math.isclose(float(feeds["history_weights"].sum()), 1.0, rel_tol=1e-6)
    assert feeds["history_weights"][0] > feeds["history_weights"][1] > 0.0
    assert feeds["penalty"][[0, 1]].tolist() == [pytest.approx(1e9)] * 2
    # the next request starts clean: nothing masked is left over
    cold = model.build_feeds([], (8, "store-001", None))
    assert not np.any(cold["penalty"])
    assert not np.any(cold["history_weights"])


history_entries = st.tuples(
    st.one_of(st.integers(0, 450).map(lambda i: f"SKU-{i:06d}"), st.text(max_size=8)),
    st.one_of(st.sampled_from(EVENT_TYPES), st.text(max_size=12)),
    st.one_of(
        st.floats(allow_nan=True, allow_infinity=True),
        st.floats(min_value=1.7e9, max_value=1.8e9),
    ),
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    history=st.lists(history_entries, max_size=60),
    hour=st.integers(-1000, 1000),
    store=st.text(max_size=10),
    device=st.one_of(st.none(), st.text(max_size=10)),
    blocked=st.lists(st.integers(0, 450).map(lambda i: f"SKU-{i:06d}"), max_size=80),
    k=st.integers(-3, 500),
)
def test_any_request_gives_valid_unmasked_suggestions(
    model: SuggestionModel,
    history: list[tuple[str, str, float]],
    hour: int,
    store: str,
    device: str | None,
    blocked: list[str],
    k: int,
) -> None:
    answer = model.suggest(history, (hour, store, device), blocked, k=k)
    skus = [sku for sku, _ in answer]
    forbidden = set(blocked) | {sku for sku, _, _ in history}
    assert len(skus) == len(set(skus)) <= max(k, 1)
    assert not set(skus) & forbidden
    assert set(skus) <= set(model.items)
    assert all(math.isfinite(score) for _, score in answer)
    feeds = model.build_feeds(history, (hour, store, device), blocked, k=k)
    weights = feeds["history_weights"]
    assert np.all(np.isfinite(weights))
    assert np.all(weights >= 0.0)
    assert float(weights.sum()) == pytest.approx(1.0, rel=1e-5) or not np.any(weights)


def test_golden_requests_carry_no_customer_history(
    events_file: Path, holdout_model_dir: Path
) -> None:
    """They ship to every agent and cannot be erased there: no real interaction may be in them."""
    real = set()
    for line in events_file.read_text("utf-8").splitlines():
        event = json.loads(line)
        sku = (event.get("data") or {}).get("sku")
        if sku is not None:
            real.add((sku, event["type"], parse_ts(event["ts"])))
    golden = json.loads((holdout_model_dir / "manifest.json").read_text("utf-8"))
    entries = [
        tuple(entry) for request in golden["golden_requests"] for entry in request["history"]
    ]
    assert entries, "the manifest must still carry golden requests"
    assert not real & set(entries)


_hostile = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats()
    | st.text(max_size=12),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=8,
)
_PATHS = [
    ("version",),
    ("top_k",),
    ("items",),
    ("model_file",),
    ("feature_spec",),
    ("feature_spec", "history_length"),
    ("feature_spec", "half_life_s"),
    ("feature_spec", "type_weights"),
    ("feature_spec", "stores"),
    ("golden_requests",),
    ("golden_requests", 0),
    ("golden_requests", 0, "context"),
    ("golden_requests", 0, "context", "hour"),
    ("golden_requests", 0, "context", "device_id"),
    ("golden_requests", 0, "history"),
    ("golden_requests", 0, "now"),
    ("golden_requests", 0, "expected"),
    ("golden_requests", 0, "penalty_skus"),
]


@settings(
    max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(st.sampled_from(_PATHS), _hostile)
def test_a_hostile_manifest_is_a_refused_model_never_a_crash(
    holdout_model_dir: Path,
    tmp_path_factory: pytest.TempPathFactory,
    path: tuple[Any, ...],
    value: Any,
) -> None:
    directory = tmp_path_factory.mktemp("hostile")
    (directory / "model.onnx").write_bytes((holdout_model_dir / "model.onnx").read_bytes())
    manifest = json.loads((holdout_model_dir / "manifest.json").read_text())
    target: Any = manifest
    for step in path[:-1]:
        target = target[step]
    target[path[-1]] = value
    (directory / "manifest.json").write_text(json.dumps(manifest))
    assert _load_outcome(directory) in {"loaded", "refused"}


def _load_outcome(directory: Path) -> str:
    """Loaded, or refused with a reason (what the agent's hot swap reports); anything else
    escaping (a crash) fails the test."""
    try:
        SuggestionModel.load(directory)
    except ModelError as exc:
        return "refused" if str(exc) else "refused without a reason"
    return "loaded"


def test_a_deeply_nested_manifest_is_refused(model_copy: Path) -> None:
    (model_copy / "manifest.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(ModelFormatError):
        SuggestionModel.load(model_copy)


def test_a_manifest_asking_for_huge_buffers_is_refused(model_copy: Path) -> None:
    manifest = json.loads((model_copy / "manifest.json").read_text())
    manifest["feature_spec"]["history_length"] = 10**12  # would allocate terabytes
    (model_copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ModelFormatError, match="history_length"):
        SuggestionModel.load(model_copy)
