"""The schema registry: declared fields only, element shapes enforced, identities marked."""

from __future__ import annotations

import json
from importlib import resources
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from registry_reference import reference_clean_data

from cloud_sync.envelope_schema import Cleaned, Registry, default_registry, parse_registry


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


# The compiled check against the plain walk of the rules (registry_reference.py).

_field_names = st.sampled_from(["sku", "items", "values", "alias", "qty", "total", "a", "b.c"])
hostile_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats()  # NaN and infinities included
    | st.text(max_size=12)
    | st.sampled_from(["x" * 1024, "x" * 1025, "temp_c", "motor.temp_c", "1bad"]),
    lambda children: (
        st.lists(children, max_size=5) | st.dictionaries(_field_names | st.text(max_size=6),
                                                         children, max_size=5)
    ),
    max_leaves=25,
)  # fmt: skip


def _agree(registry: Registry, event_type: str, data: object) -> None:
    expected = reference_clean_data(registry, event_type, data)
    assert registry.clean_data(event_type, data) == expected
    if isinstance(expected, Cleaned):  # the same kinds too: True is not 1, 1.0 is not 1
        assert repr(registry.clean_data(event_type, data)) == repr(expected)


@settings(max_examples=1500, deadline=None)
@given(
    st.sampled_from([*sorted(default_registry().types), "no.such.type"]),
    st.dictionaries(_field_names | st.text(max_size=6), hostile_values, max_size=6)
    | hostile_values,
)
def test_the_compiled_check_agrees_with_the_walk_of_the_rules(
    event_type: str, data: object
) -> None:
    _agree(default_registry(), event_type, data)


@settings(max_examples=400, deadline=None)
@given(st.data())
def test_the_compiled_check_agrees_on_every_type_given_its_own_shapes(data: st.DataObject) -> None:
    """Data built from each type's declared fields, so the deep branches are reached."""
    registry = default_registry()
    event_type = data.draw(st.sampled_from(sorted(registry.types)))
    names = [f.name for f in registry.types[event_type].fields]
    keys = st.sampled_from([*names, "undeclared"])
    value = data.draw(st.dictionaries(keys, hostile_values, max_size=len(names) + 1))
    if event_type == "telemetry":
        readings = st.dictionaries(st.sampled_from(["temp_c", "a.b", "1x", "x" * 70, "door"]),
                                   hostile_values, max_size=5)  # fmt: skip
        value["values"] = data.draw(readings)
    _agree(registry, event_type, value)


rule_documents = st.recursive(
    st.fixed_dictionaries(
        {"type": st.sampled_from(["string", "number", "integer", "boolean",
                                  ["number", "boolean"], ["string", "integer"]])},
        optional={"nullable": st.booleans(), "max_length": st.integers(0, 4),
                  "required": st.booleans()},
    ),
    lambda children: (
        st.fixed_dictionaries(
            {"type": st.just("array"), "items": children},
            optional={"max_items": st.integers(0, 3), "required": st.booleans()},
        )
        | st.fixed_dictionaries(
            {"type": st.sampled_from(["object", ["string", "object"]]),
             "fields": st.dictionaries(st.sampled_from(["a", "b", "c'", 'd"']), children,
                                       max_size=3)},
            optional={"max_items": st.integers(0, 3), "nullable": st.booleans()},
        )
        | st.fixed_dictionaries(
            {"type": st.just("object"), "values": children,
             "key_pattern": st.sampled_from(["[a-z]", "[a-z]+(\\.[a-z]+)?"])},
            optional={"max_items": st.integers(0, 3)},
        )
    ),
    max_leaves=6,
)  # fmt: skip


@settings(max_examples=400, deadline=None)
@given(
    st.dictionaries(st.sampled_from(["a", "b", "c'", 'd"', "e"]), rule_documents, max_size=4),
    st.data(),
)
def test_the_compiled_check_agrees_on_random_registries(
    fields: dict[str, Any], data: st.DataObject
) -> None:
    """Random rules (every kind, nullable, tiny bounds, quotes in names): the code written
    from a registry checks what the rules say."""
    registry = parse_registry({"version": 1, "types": {"t": {"customer": True, "data": fields}}})
    keys = st.sampled_from(["a", "b", "c'", 'd"', "e", "x", "y.z"])
    for _ in range(5):
        value = data.draw(st.dictionaries(keys, hostile_values, max_size=5))
        _agree(registry, "t", value)


def test_the_compiled_check_agrees_on_the_fuzz_corpus() -> None:
    corpus = resources.files("tests").joinpath("fuzz", "corpus", "mqtt")
    registry = default_registry()
    documents = 0
    for entry in sorted(corpus.iterdir(), key=lambda e: e.name):
        raw = entry.read_bytes()  # E or T + payload, or / + topic + newline + payload
        payload = raw.partition(b"\n")[2] if raw.startswith(b"/") else raw[1:]
        try:
            document = json.loads(payload)
        except (ValueError, RecursionError):
            continue
        documents += 1
        items = document if isinstance(document, list) else [document]
        for item in items:
            data = item.get("data", item) if isinstance(item, dict) else item
            if raw.startswith(b"T") and isinstance(item, dict):
                data = {"values": item.get("values")}
            for event_type in [*registry.types, "no.such.type"]:
                _agree(registry, event_type, data)
    assert documents > 20  # the corpus is there and mostly JSON
