"""The serial link derives keyed event ids and keeps only declared data fields."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from importlib import resources

from cloud_sync.envelope_schema import parse_registry
from edge_agent.events import Event
from firmware_bridge.codec import Frame, MessageType
from firmware_bridge.link import DeviceLink, serial_event_id
from firmware_bridge.messages import EventMessage, Hello

WALL = datetime(2026, 11, 22, 8, 0, tzinfo=UTC)
BOOT = 0xB007
KEY = b"agent-event-id-key-0123456789abcdef"


def test_frames_get_keyed_ids_and_lose_undeclared_fields() -> None:
    # A registry of its own: its counter of dropped fields starts at zero.
    text = resources.files("cloud_sync").joinpath("event_types.json").read_text("utf-8")
    registry = parse_registry(json.loads(text))
    link = DeviceLink("store-001", registry, agent_boot_id=1, id_key=KEY)
    link.receive(
        Frame(MessageType.HELLO, BOOT, 1, Hello("shelf-07", "fw-1", 1, 1).encode()), 0.0, WALL
    )
    data = {"sku": "SKU-1", "email": "someone@example.com"}
    payload = EventMessage("product.pickup", "c-000123", 0, data).encode()
    (delivery,) = link.receive(Frame(MessageType.EVENT, BOOT, 7, payload), 1.0, WALL).deliveries
    item = delivery.item
    assert isinstance(item, Event)
    assert item.event_id == serial_event_id("shelf-07", BOOT, 7, KEY)
    assert item.event_id != serial_event_id("shelf-07", BOOT, 7)  # the unkeyed derivation
    assert item.data == {"sku": "SKU-1"}
    assert registry.dropped == {"product.pickup": 1}
