"""The Event type's public shape: fields in order, immutability, the envelope it writes."""

from __future__ import annotations

import json

import pytest

from cloud_sync.envelope_schema import ENVELOPE_FIELDS
from edge_agent.events import SCHEMA_VERSION, Event

FIELDS = {
    "event_id": "e-1",
    "type": "product.pickup",
    "ts": "2026-11-22T08:00:00.123Z",
    "store_id": "store-001",
    "device_id": "shelf-07",
    "customer_id": "c-000123",
    "source": "mqtt:edge/store-001/devices/shelf-07/events",
    "data": {"sku": "SKU-1"},
    "received_at": "2026-11-22T08:00:00.200Z",
}


def test_positional_and_keyword_construction_agree_and_defaults_hold() -> None:
    by_name = Event(**FIELDS)  # type: ignore[arg-type]
    assert Event(*FIELDS.values()) == by_name  # type: ignore[arg-type]
    assert by_name.schema == SCHEMA_VERSION
    assert by_name.customer is True
    assert by_name != Event(**{**FIELDS, "event_id": "e-2"})  # type: ignore[arg-type]


@pytest.mark.parametrize("name", [*FIELDS, "schema", "customer"])
def test_no_field_can_be_reassigned(name: str) -> None:
    event = Event(**FIELDS)  # type: ignore[arg-type]
    with pytest.raises(AttributeError):
        setattr(event, name, "changed")
    assert getattr(event, name) == {**FIELDS, "schema": 1, "customer": True}[name]


def test_the_envelope_has_the_contract_fields_in_order_and_round_trips() -> None:
    event = Event(**FIELDS)  # type: ignore[arg-type]
    envelope = event.envelope()
    assert tuple(envelope)[: len(ENVELOPE_FIELDS)] == ENVELOPE_FIELDS
    assert json.loads(event.to_json()) == envelope
    assert envelope["data"] is event.data
