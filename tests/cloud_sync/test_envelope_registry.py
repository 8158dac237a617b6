"""The schema registry: declared fields only, element shapes enforced, identities marked."""

from __future__ import annotations

import json
from importlib import resources
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cloud_sync.envelope_schema import Cleaned, default_registry, parse_registry


def registry_document() -> dict[str, Any]:
    text = resources.files("cloud_sync").joinpath("event_types.json").read_text("utf-8")
    document: dict[str, Any] = json.loads(text)
    return document


def cleaned(event_type: str, data: object) -> Cleaned:
    outcome = parse_registry(registry_document()).clean_data(event_type, data)
    assert isinstance(outcome, Cleaned), outcome
    return outcome


def test_undeclared_fields_are_dropped_at_every_level_and_counted_once_admitted() -> None:
    registry = parse_registry(registry_document())
    data = {
        "items": [{"sku": "SKU-1", "qty": 2, "owner": "c-1"}, "SKU-2"],
        "total": 3.5,
        "email": "someone@example.com",
        "customer_id": None,
    }
    outcome = registry.clean_data("checkout.purchase", data)
    assert outcome == Cleaned({"items": [{"sku": "SKU-1", "qty": 2}, "SKU-2"], "total": 3.5}, 3)
    assert data["email"] == "someone@example.com"  # the input itself is left alone
    assert registry.dropped == {}  # a check counts nothing
    registry.admit_data("checkout.purchase", data)
    registry.admit_data("telemetry", {"values": {"temp_c": 4.0, "c-000123": 1}})
    assert registry.status()["schema"]["undeclared_fields_dropped"] == 4
    assert registry.status()["schema"]["undeclared_by_type"] == {
        "checkout.purchase": 3,
        "telemetry": 1,
    }


@pytest.mark.parametrize(
    ("event_type", "data", "reason"),
    [
        ("checkout.purchase", {"items": [7]}, "wrong_type"),  # an element of no declared shape
        ("checkout.purchase", {"items": [{"qty": 1}]}, "wrong_type"),  # an item without its sku
        ("checkout.purchase", {"items": [["SKU-1"]]}, "wrong_type"),
        ("suggestion.shown", {"suggestion_id": "s", "items": [], "source": "m",
                              "propensities": ["c-1"]}, "wrong_type"),
        ("telemetry", {"values": {"temp_c": "c-000123"}}, "wrong_type"),  # readings are numbers
        ("telemetry", {"values": {"nested": {"a": 1}}}, "wrong_type"),
        ("telemetry", {"values": {"n": float("nan")}}, "wrong_type"),
        ("customer.identified", {"alias": 7}, "wrong_type"),
        ("product.pickup", {"weight_g": 1}, "missing_field"),
        ("nothing.known", {}, "unknown_type"),
    ],
)  # fmt: skip
def test_free_form_fields_accept_only_their_declared_element_shapes(
    event_type: str, data: object, reason: str
) -> None:
    assert default_registry().clean_data(event_type, data) == reason


def test_declared_nullable_and_optional_fields_pass_unchanged() -> None:
    data = {
        "suggestion_id": "s-1",
        "items": [{"sku": "SKU-1", "score": 0.5}],
        "source": "model",
        "propensities": [1.0],
        "explored_slot": None,
        "model_error": "timeout",
    }
    assert cleaned("suggestion.shown", data) == Cleaned(data, 0)
    telemetry = {"values": {"temp_c": 4.1, "door_open": False, "probe": None}}
    assert cleaned("telemetry", telemetry) == Cleaned(telemetry, 0)


def test_identity_fields_are_marked_in_the_registry() -> None:
    registry = default_registry()
    assert registry.identity_fields("customer.identified") == {"alias"}
    assert registry.identity_fields("product.pickup") == frozenset()
    assert registry.identity_fields("no.such.type") == frozenset()


@pytest.mark.parametrize(
    "rule",
    [
        {"type": "array"},  # an array must declare its elements
        {"type": "object"},  # an object must declare its keys or its values
        {"type": "date"},
        {"type": "number", "identity": True},  # an identity is a string
    ],
)
def test_a_registry_that_leaves_a_shape_open_is_refused(rule: dict[str, Any]) -> None:
    document = {"version": 1, "types": {"t": {"customer": True, "data": {"f": rule}}}}
    with pytest.raises(ValueError, match=r"t\.f"):
        parse_registry(document)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=20,
)


@settings(max_examples=300, deadline=None)
@given(
    st.sampled_from(sorted(default_registry().types)),
    st.dictionaries(
        st.sampled_from(["sku", "items", "values", "alias", "email", "total", "suggestion_id"]),
        json_values,
    ),
)
def test_what_is_kept_is_declared_and_cleaning_again_drops_nothing(
    event_type: str, data: dict[str, Any]
) -> None:
    registry = default_registry()
    outcome = registry.clean_data(event_type, data)
    if isinstance(outcome, str):
        assert outcome in {"wrong_type", "missing_field"}
        return
    declared = {f.name for f in registry.types[event_type].fields}
    assert set(outcome.data) <= declared
    assert registry.clean_data(event_type, outcome.data) == Cleaned(outcome.data, 0)
