"""SNIPS against hand-computed values, and logged feedback that is broken or hostile."""

from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from models.offpolicy import Snips, load_feedback, snips, valid_propensity


def test_snips_matches_a_hand_computed_value() -> None:
    # weights pi/p: 1/0.5 = 2, 1/0.25 = 4, 0 (not shown by the target), 1/1 = 1
    estimate = snips([(1.0, 0.5, 1.0), (1.0, 0.25, 0.0), (0.0, 0.1, 1.0), (1.0, 1.0, 1.0)])
    # (2*1 + 4*0 + 1*1) / (2 + 4 + 1) = 3/7
    assert estimate.value == pytest.approx(3 / 7)
    assert estimate.matched == 3
    assert estimate.effective_sample_size == pytest.approx(49 / 21)  # (2+4+1)^2 / (4+16+1)
    v = 3 / 7
    spread = 4 * (1 - v) ** 2 + 16 * v**2 + 1 * (1 - v) ** 2
    assert estimate.standard_error == pytest.approx(math.sqrt(spread) / 7)


def test_snips_is_the_plain_mean_under_uniform_propensities() -> None:
    estimate = snips([(1.0, 0.2, 1.0), (1.0, 0.2, 0.0), (1.0, 0.2, 0.0), (1.0, 0.2, 1.0)])
    assert estimate.value == pytest.approx(0.5)
    assert estimate.effective_sample_size == pytest.approx(4.0)


def test_a_stochastic_target_policy_weights_by_its_probability() -> None:
    # weights 0.5/0.5 = 1 (reward 1) and 0.25/0.25 = 1 (reward 0): 1/2
    assert snips([(0.5, 0.5, 1.0), (0.25, 0.25, 0.0)]).value == pytest.approx(0.5)


def test_no_overlap_with_the_target_policy_is_no_estimate() -> None:
    estimate = snips([(0.0, 0.5, 1.0), (0.0, 0.3, 0.0)])
    assert estimate.value is None
    assert estimate.standard_error is None
    assert estimate.matched == 0
    assert estimate.as_json()["snips"] is None


@pytest.mark.parametrize("bad", [0.0, -0.1, 1.5, math.nan, math.inf, True, None, "0.5"])
def test_invalid_propensities_are_rejected(bad: Any) -> None:
    assert valid_propensity(bad) is None
    with pytest.raises(ValueError, match="propensity"):
        Snips().add(1.0, bad, 1.0)


def _envelope(event_type: str, ts: str, data: Any, customer: Any = "c-1") -> str:
    return json.dumps(
        {
            "event_id": f"{event_type}-{ts}-{json.dumps(data)[:40]}",
            "type": event_type,
            "ts": ts,
            "store_id": "store-001",
            "device_id": "shelf-01",
            "customer_id": customer,
            "data": data,
        },
        allow_nan=True,
    )


def test_hostile_feedback_is_counted_and_skipped(tmp_path: Path) -> None:
    t = "2026-11-20T10:00:00.000Z"

    def shown(sid: str, items: Any, props: Any, **extra: Any) -> str:
        data = {"suggestion_id": sid, "items": items, "propensities": props, "source": "model"}
        return _envelope("suggestion.shown", t, {**data, **extra})

    lines = [
        shown("ok", [{"sku": "A", "score": 1.0}, "B"], [1.0, 0.25], model_version="v1"),
        shown("zero", ["A"], [0.0]),
        shown("above-one", ["A"], [1.5]),
        shown("nan", ["A", "B"], [math.nan, 0.5]),  # one item left: B
        shown("missing", ["A"], None),
        shown("short", ["A", "B"], [0.5]),
        shown("no-sku", [{"score": 1.0}], [0.5]),
        shown("bad-version", ["A"], [0.5], model_version=7),
        shown("ok", ["A"], [1.0]),  # a duplicate suggestion id
        _envelope(
            "suggestion.shown",
            t,
            {"suggestion_id": "anon", "items": ["A"], "propensities": [1.0], "source": "model"},
            customer=None,
        ),
        _envelope("suggestion.shown", "yesterday", {"suggestion_id": "bad-ts"}),
        _envelope(
            "suggestion.shown",
            "2026-11-01T10:00:00.000Z",
            {"suggestion_id": "early", "items": ["A"], "propensities": [1.0], "source": "model"},
        ),
        _envelope("suggestion.accepted", t, {"suggestion_id": "ok", "sku": "B"}),
        _envelope("suggestion.accepted", t, {"suggestion_id": "nan", "sku": "B"}),
        _envelope("suggestion.accepted", t, {"suggestion_id": "never-shown", "sku": "A"}),
        _envelope("suggestion.accepted", t, {"suggestion_id": "ok"}),  # no sku
        "not json at all",
        "[1, 2, 3]",
    ]
    path = tmp_path / "feedback.jsonl"
    path.write_text("\n".join(lines) + "\n")
    since = 1_794_528_000.0  # 2026-11-13T00:00:00Z: "early" is before it
    log = load_feedback(path, since=since)
    kept = {s.suggestion_id: s for s in log.suggestions}
    assert set(kept) == {"ok", "nan"}
    assert kept["ok"].items == [("A", 1.0), ("B", 0.25)]
    assert kept["ok"].accepted == {"B"}
    assert kept["nan"].items == [("B", 0.5)]
    assert kept["nan"].accepted == {"B"}
    assert log.skipped == {
        "item_bad_propensity": 3,  # zero, above-one, nan's first item
        "shown_no_usable_item": 3,  # zero, above-one, no-sku
        "shown_without_propensities": 2,  # missing, short
        "item_without_sku": 1,
        "shown_bad_version": 1,
        "shown_duplicate": 1,
        "shown_without_customer": 1,
        "feedback_bad_ts": 1,
        "accepted_unknown": 1,
        "accepted_without_suggestion_or_sku": 1,
    }
    assert log.by_version() == {"v1": 1, "none": 1}


_values = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-3, 3),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=5),
)
_items = st.one_of(
    _values,
    st.lists(st.one_of(_values, st.fixed_dictionaries({"sku": _values})), max_size=4),
)
_data = st.fixed_dictionaries(
    {},
    optional={
        "suggestion_id": st.sampled_from(["s1", "s2", "", 5]),
        "items": _items,
        "propensities": st.one_of(_values, st.lists(_values, max_size=4)),
        "model_version": _values,
        "sku": _values,
    },
)


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["suggestion.shown", "suggestion.accepted", "product.pickup"]),
            st.one_of(_data, _values),
            st.sampled_from(["c-1", None, 7]),
        ),
        max_size=8,
    )
)
def test_any_feedback_is_read_without_an_error(events: list[tuple[str, Any, Any]]) -> None:
    with tempfile.TemporaryDirectory() as scratch:
        path = Path(scratch) / "feedback.jsonl"
        lines = [_envelope(kind, "2026-11-20T10:00:00.000Z", data, customer)
                 for kind, data, customer in events]  # fmt: skip
        path.write_text("\n".join(lines) + "\n")
        log = load_feedback(path)
    for suggestion in log.suggestions:
        assert suggestion.items
        assert all(0.0 < p <= 1.0 for _, p in suggestion.items)
        assert all(isinstance(sku, str) and sku for sku, _ in suggestion.items)
        assert all(isinstance(sku, str) and sku for sku in suggestion.accepted)
    decisions = [(1.0, p, 1.0) for s in log.suggestions for _, p in s.items]
    value = snips(decisions).value
    assert value is None or value == pytest.approx(1.0)
