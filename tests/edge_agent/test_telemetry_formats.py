"""Telemetry as Home Assistant and Node-RED send it: one value per topic, nested objects."""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import sqlite3
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cloud_sync.envelope_schema import default_registry
from edge_agent.config import InputSection
from edge_agent.decode import (
    DecodeContext,
    TopicParts,
    decode_message,
    flatten_values,
    parse_topic,
)
from edge_agent.events import Event, Rejected
from tests.conftest import COLLECT_ONLY, agent_config_dict
from tests.support.agent import Publisher, agent_running, quarantine_reasons, wait_until
from tests.support.broker import AmqttBroker, MosquittoBroker

NOW = datetime(2026, 11, 22, 8, 0, 0, tzinfo=UTC)
CONTEXT = DecodeContext("store-001", default_registry(), InputSection(), b"k" * 32)
NAME = r"[A-Za-z][A-Za-z0-9_]{0,20}"


def value_topic(name: str, device_id: str = "fridge-01") -> TopicParts:
    return TopicParts(device_id, "telemetry", name)


def decode_value(
    name: str, payload: bytes, now: datetime = NOW, context: DecodeContext = CONTEXT
) -> Event | Rejected:
    source = f"mqtt:edge/store-001/devices/fridge-01/telemetry/{name}"
    [item] = decode_message(context, value_topic(name), source, payload, now)
    return item


def test_parse_topic_knows_the_value_topic() -> None:
    head = "edge/s1/devices/fridge-01"
    assert parse_topic(f"{head}/telemetry/temp_c", "edge", "s1") == value_topic("temp_c")
    assert parse_topic(f"{head}/telemetry", "edge", "s1") == TopicParts("fridge-01", "telemetry")
    long_name = "telemetry/" + "x" * 300
    for bad in ("telemetry/", "telemetry/a/b", "events/temp_c", "events/", long_name):
        assert parse_topic(f"{head}/{bad}", "edge", "s1") is None, bad


@pytest.mark.parametrize(
    ("payload", "value"),
    [
        (b"4.1", 4.1),
        (b" 4.1\n", 4.1),
        (b"-7", -7),
        (b"+4.5", 4.5),  # not JSON, but a number any sender means
        (b"1e3", 1000.0),
        (b"true", True),
        (b"False", False),  # a Home Assistant template renders Python's False
        (b"ON", True),
        (b"off", False),
        (b"unavailable", None),  # Home Assistant's state of a sensor that is not there
        (b"unknown", None),
        (b"None", None),
        (b"null", None),
        (b"", None),
    ],
)
def test_one_value_per_topic(payload: bytes, value: object) -> None:
    event = decode_value("temp_c", payload)
    assert isinstance(event, Event), event
    assert event.type == "telemetry"
    assert event.device_id == "fridge-01"
    assert event.customer is False
    assert event.customer_id is None
    assert event.ts == event.received_at  # a bare value carries no time: the receive time
    assert event.data == {"values": {"temp_c": value}}
    assert type(event.data["values"]["temp_c"]) is type(value)


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (b"open", "wrong_type"),  # text decodes, and the registry refuses text readings
        (b'"open"', "wrong_type"),
        (b'"c-000123"', "wrong_type"),  # which is why: a string could carry a customer id
        (b"nan", "bad_number"),
        (b"NaN", "bad_number"),
        (b"-inf", "bad_number"),
        (b"1e400", "bad_number"),
        (b"9" * 30, "bad_number"),
        (b"[1, 2]", "wrong_type"),
        (b"x" * 65, "not_json"),  # longer than a short text
        (b"tab\there", "not_json"),  # not printable
        (b"\xff\xfe", "not_utf8"),
        (b'"\\ud800"', "bad_unicode"),
        (b"{" * 40 + b"}" * 40, "not_json"),
        (b'{"a":' * 20 + b"1" + b"}" * 20, "too_deep"),
    ],
)
def test_a_value_the_pipe_cannot_hold_is_rejected_with_a_reason(
    payload: bytes, reason: str
) -> None:
    rejected = decode_value("temp_c", payload)
    assert isinstance(rejected, Rejected), rejected
    assert rejected.reason == reason
    assert rejected.raw == payload  # kept whole for `edge-agent quarantine replay`


@pytest.mark.parametrize("name", ["c-000123", "9lives", "a.b.c.d.e", "temp.", "x" * 65])
def test_a_topic_name_the_registry_does_not_allow_is_a_bad_topic(name: str) -> None:
    rejected = decode_value(name, b"4.1")
    assert isinstance(rejected, Rejected)
    assert rejected.reason == "bad_topic"


def test_a_dotted_topic_name_is_the_flattened_name() -> None:
    event = decode_value("motor.temp_c", b"61.5")
    assert isinstance(event, Event)
    assert event.data == {"values": {"motor.temp_c": 61.5}}


def test_the_same_reading_again_later_is_a_second_sample() -> None:
    first = decode_value("temp_c", b"4.1")
    again = decode_value("temp_c", b"4.1")
    later = decode_value("temp_c", b"4.1", NOW + timedelta(minutes=1))
    other = decode_value("humidity", b"4.1")
    assert isinstance(first, Event)
    assert isinstance(again, Event)
    assert isinstance(later, Event)
    assert isinstance(other, Event)
    assert first.event_id == again.event_id  # a redelivery at the same instant: one event
    assert len({first.event_id, later.event_id, other.event_id}) == 3


def test_an_object_on_a_value_topic_is_flattened_under_its_name() -> None:
    event = decode_value("motor", b'{"temp_c": 61.5, "rpm": 1200, "bearing": {"ok": true}}')
    assert isinstance(event, Event)
    assert event.data == {
        "values": {"motor.temp_c": 61.5, "motor.rpm": 1200, "motor.bearing.ok": True}
    }


def _telemetry(payload: dict[str, Any]) -> Event | Rejected:
    source = "mqtt:edge/store-001/devices/fridge-01/telemetry"
    topic = TopicParts("fridge-01", "telemetry")
    [item] = decode_message(CONTEXT, topic, source, json.dumps(payload).encode(), NOW)
    return item


def test_nested_telemetry_objects_are_flattened_with_a_dot() -> None:
    event = _telemetry(
        {
            "ts": "2026-11-22T07:59:00Z",
            "values": {"door_open": False, "motor": {"temp_c": 61.5, "fan": {"rpm": 900}}},
        }
    )
    assert isinstance(event, Event)
    assert event.data == {
        "values": {"door_open": False, "motor.temp_c": 61.5, "motor.fan.rpm": 900}
    }
    assert event.ts == "2026-11-22T07:59:00.000Z"


def test_nesting_beyond_four_names_and_undeclared_names_are_dropped_and_counted() -> None:
    registry = default_registry()
    context = DecodeContext("store-001", registry, InputSection(), b"k" * 32)
    source = "mqtt:edge/store-001/devices/fridge-01/telemetry"
    deep = {"a": {"b": {"c": {"d": 1, "e": {"f": 2}}}}, "bad-name": {"x": 3}, "ok": 4}
    payload = json.dumps({"values": deep}).encode()
    [event] = decode_message(context, TopicParts("f", "telemetry"), source, payload, NOW)
    assert isinstance(event, Event)
    assert event.data == {"values": {"a.b.c.d": 1, "ok": 4}}
    assert registry.dropped["telemetry"] == 2  # a.b.c.e.f, bad-name.x


@pytest.mark.parametrize(
    ("values", "reason"),
    [
        ({"motor": {"temp_c": 1}, "motor.temp_c": 2}, "wrong_type"),  # one name given twice
        ({"motor": {"temp_c": "hot"}}, "wrong_type"),  # readings are numbers or booleans
        ({"motor": {"temp_c": [1]}}, "wrong_type"),
        ({f"k{n}": {"v": n} for n in range(65)}, "wrong_type"),  # over the 64 values a reading has
    ],
)
def test_nested_telemetry_the_registry_refuses(values: dict[str, Any], reason: str) -> None:
    rejected = _telemetry({"values": values})
    assert isinstance(rejected, Rejected)
    assert rejected.reason == reason


scalars = st.one_of(
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.floats(allow_nan=False, allow_infinity=False),
)


@settings(max_examples=300, deadline=None)
@given(name=st.from_regex(NAME, fullmatch=True), value=scalars)
def test_any_number_or_boolean_round_trips_through_a_value_topic(name: str, value: Any) -> None:
    text = json.dumps(value)  # what Node-RED's "msg.payload = 4.1" and HA's states send
    event = decode_value(name, text.encode())
    assert isinstance(event, Event), event
    decoded = event.data["values"][name]
    assert type(decoded) is type(value)
    assert decoded == value


def _unflatten(flat: dict[str, Any]) -> dict[str, Any]:
    nested: dict[str, Any] = {}
    for name, value in flat.items():
        *parents, leaf = name.split(".")
        table = nested
        for parent in parents:
            table = table.setdefault(parent, {})
        table[leaf] = value
    return nested


nested_values = st.recursive(
    scalars,
    lambda children: st.dictionaries(st.from_regex(NAME, fullmatch=True), children, max_size=4),
    max_leaves=16,
)


@settings(max_examples=300, deadline=None)
@given(values=st.dictionaries(st.from_regex(NAME, fullmatch=True), nested_values, max_size=6))
def test_flattening_is_undone_by_splitting_on_the_dot(values: dict[str, Any]) -> None:
    flat = flatten_values(values)
    assert isinstance(flat, dict)
    assert all(not isinstance(value, dict) for value in flat.values())

    def no_empty(table: dict[str, Any]) -> dict[str, Any]:  # an empty object holds no reading
        pruned = {k: no_empty(v) if isinstance(v, dict) else v for k, v in table.items()}
        return {k: v for k, v in pruned.items() if v != {}}

    assert _unflatten(flat) == no_empty(values)


@settings(max_examples=500, deadline=None)
@given(name=st.text(max_size=80), payload=st.binary(max_size=200))
def test_any_bytes_on_any_value_topic_decode_or_are_rejected_with_a_reason(
    name: str, payload: bytes
) -> None:
    topic = parse_topic(f"edge/store-001/devices/f/telemetry/{name}", "edge", "store-001")
    if topic is None:
        return
    [item] = decode_message(CONTEXT, topic, "mqtt:t", payload, NOW)
    if isinstance(item, Rejected):
        assert item.reason
        return
    for value in item.data["values"].values():
        assert value is None or isinstance(value, bool | int | float)
        assert not isinstance(value, float) or math.isfinite(value)


def _stored_values(db: Path) -> list[dict[str, Any]]:
    with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10)) as conn:
        rows = conn.execute("SELECT envelope FROM events WHERE type = 'telemetry' ORDER BY seq")
        return [json.loads(row[0])["data"]["values"] for row in rows]


async def test_home_assistant_and_node_red_telemetry_through_a_real_broker(
    tmp_path: Path, store_id: str, mqtt_broker: MosquittoBroker | AmqttBroker
) -> None:
    document = agent_config_dict(tmp_path, store_id, mqtt_broker, model=COLLECT_ONLY)
    db = tmp_path / "data" / "buffer.db"
    base = f"edge/{store_id}/devices/fridge-01/telemetry"
    sent = [
        (f"{base}/temp_c", b"4.1"),  # Home Assistant mqtt.publish of a sensor state
        (f"{base}/door_open", b"off"),  # a binary_sensor's state
        (f"{base}/probe", b"unavailable"),
        (f"{base}/motor", b'{"rpm": 1200, "temp_c": 61.5}'),  # a Node-RED msg.payload object
        (base, b'{"values": {"compressor": {"on": true, "amps": 2.5}}}'),  # nested object form
        (f"{base}/mode", b"defrost"),  # text: quarantined until the registry declares it
        (f"{base}/c-000123", b"1"),  # a name the registry refuses
    ]
    publisher = Publisher(mqtt_broker.host, mqtt_broker.port)
    try:
        async with agent_running(document) as agent:
            for topic, payload in sent:
                publisher.publish(topic, payload)
            await asyncio.to_thread(publisher.wait_all)
            await wait_until(lambda: agent.buffer.counters.committed == 5, 20)
            await wait_until(lambda: len(quarantine_reasons(db)) == 2, 20)
            telemetry = agent.sources[1].stats
            assert telemetry.received == len(sent)  # both topic forms reach the telemetry link
    finally:
        publisher.close()
    assert _stored_values(db) == [
        {"temp_c": 4.1},
        {"door_open": False},
        {"probe": None},
        {"motor.rpm": 1200, "motor.temp_c": 61.5},
        {"compressor.on": True, "compressor.amps": 2.5},
    ]
    assert quarantine_reasons(db) == ["wrong_type", "bad_topic"]
