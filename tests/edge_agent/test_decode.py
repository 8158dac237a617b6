from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cloud_sync.envelope_schema import default_registry
from edge_agent.config import InputSection
from edge_agent.decode import DecodeContext, TopicParts, decode_message, make_context, parse_topic
from edge_agent.events import Event, Rejected, format_ts, parse_ts

NOW = datetime(2026, 11, 22, 8, 0, 0, tzinfo=UTC)
CONTEXT = DecodeContext(
    "store-001", default_registry(), InputSection(max_payload_bytes=64 * 1024), b"k" * 32
)
EVENTS = TopicParts("shelf-07", "events")
TELEMETRY = TopicParts("fridge-01", "telemetry")
SOURCE = "mqtt:edge/store-001/devices/shelf-07/events"


def decode(payload: bytes, topic: TopicParts = EVENTS) -> list[Event | Rejected]:
    return decode_message(CONTEXT, topic, SOURCE, payload, NOW)


def test_parse_topic() -> None:
    assert parse_topic("edge/s1/devices/shelf-7/events", "edge", "s1") == TopicParts(
        "shelf-7", "events"
    )
    assert parse_topic("edge/s1/devices/f/telemetry", "edge", "s1") == TopicParts("f", "telemetry")
    assert parse_topic("edge/s2/devices/f/telemetry", "edge", "s1") is None
    assert parse_topic("edge/s1/devices/f/other", "edge", "s1") is None
    assert parse_topic("edge/s1/devices//events", "edge", "s1") is None


def test_one_event_becomes_an_envelope() -> None:
    payload = json.dumps(
        {
            "type": "product.pickup",
            "customer_id": "c-000123",
            "ts": "2026-11-22T07:59:59.5Z",
            "data": {"sku": "SKU-1", "weight_g": 412},
        }
    )
    [event] = decode(payload.encode())
    assert isinstance(event, Event)
    envelope = event.envelope()
    assert envelope["store_id"] == "store-001"
    assert envelope["device_id"] == "shelf-07"
    assert envelope["customer_id"] == "c-000123"
    assert envelope["ts"] == "2026-11-22T07:59:59.500Z"
    assert envelope["received_at"] == "2026-11-22T08:00:00.000Z"
    assert envelope["source"] == SOURCE
    assert envelope["schema"] == 1
    assert envelope["data"] == {"sku": "SKU-1", "weight_g": 412}
    assert event.customer is True


def test_missing_ts_uses_receive_time_and_epoch_numbers_are_accepted() -> None:
    [plain] = decode(b'{"type": "kiosk.view", "data": {}}')
    assert isinstance(plain, Event)
    assert plain.ts == "2026-11-22T08:00:00.000Z"
    epoch_ms = int((NOW - timedelta(seconds=3)).timestamp() * 1000)
    [ms] = decode(json.dumps({"type": "kiosk.view", "ts": epoch_ms, "data": {}}).encode())
    assert isinstance(ms, Event)
    assert ms.ts == "2026-11-22T07:59:57.000Z"


def test_derived_event_id_is_deterministic_and_device_id_is_kept() -> None:
    payload = b'{"type": "product.scan", "data": {"sku": "SKU-9"}}'
    first, again = decode(payload)[0], decode(payload)[0]
    assert isinstance(first, Event)
    assert isinstance(again, Event)
    assert first.event_id == again.event_id
    other = decode(b'{"type": "product.scan", "data": {"sku": "SKU-8"}}')[0]
    assert isinstance(other, Event)
    assert other.event_id != first.event_id
    [own] = decode(b'{"event_id": "dev-42", "type": "product.scan", "data": {"sku": "S"}}')
    assert isinstance(own, Event)
    assert own.event_id == "dev-42"


def test_an_array_yields_each_event_and_quarantines_only_the_bad_one() -> None:
    payload = json.dumps(
        [
            {"type": "basket.add", "customer_id": "c-1", "data": {"sku": "A", "qty": 2}},
            {"type": "basket.add", "customer_id": "c-1", "data": {"sku": "B", "qty": "two"}},
            {"type": "product.putback", "data": {"sku": "C"}},
        ]
    ).encode()
    first, second, third = decode(payload)
    assert isinstance(first, Event)
    assert isinstance(third, Event)
    assert isinstance(second, Rejected)
    assert second.reason == "wrong_type"
    assert json.loads(second.raw)["data"]["qty"] == "two"
    assert first.event_id != third.event_id


def test_telemetry_payload() -> None:
    [event] = decode(
        b'{"ts": "2026-11-22T07:59:00Z", "values": {"temp_c": 4.1, "ok": true}}', TELEMETRY
    )
    assert isinstance(event, Event)
    assert event.type == "telemetry"
    assert event.customer is False
    assert event.customer_id is None
    assert event.data == {"values": {"temp_c": 4.1, "ok": True}}


@pytest.mark.parametrize(
    ("payload", "reason", "topic"),
    [
        (b"\xff\xfe\x00binary noise", "not_utf8", EVENTS),
        (b'{"type": "product.pickup", "data": {"sku": ', "not_json", EVENTS),
        (b"", "not_json", EVENTS),
        (b"x" * (64 * 1024 + 1), "too_large", EVENTS),
        (b"[" * 40 + b"]" * 40, "too_deep", EVENTS),
        (b"[" * 100_000 + b"]" * 100_000, "too_large", EVENTS),
        (b'{"type": "teleport", "data": {}}', "unknown_type", EVENTS),
        (b'{"data": {}}', "missing_field", EVENTS),
        (b'{"type": 7, "data": {}}', "wrong_type", EVENTS),
        (b'{"type": "product.pickup", "data": {}}', "missing_field", EVENTS),
        (b'{"type": "product.pickup", "data": {"sku": 5}}', "wrong_type", EVENTS),
        (b'{"type": "product.pickup", "data": "sku"}', "wrong_type", EVENTS),
        (
            b'{"type": "consent.update", "data": {"personalization": 1, "profile_sharing": true, '
            b'"partner_sharing": false}}',
            "wrong_type",
            EVENTS,
        ),
        (b'{"type": "kiosk.view", "customer_id": 12, "data": {}}', "wrong_type", EVENTS),
        (b'{"type": "kiosk.view", "event_id": "", "data": {}}', "wrong_type", EVENTS),
        (b'{"type": "kiosk.view", "ts": "yesterday", "data": {}}', "bad_timestamp", EVENTS),
        # Issue 9 item 1: each of these stopped the agent (OverflowError, ValueError).
        (
            b'{"type": "kiosk.view", "ts": "9999-12-31T23:59:59-01:00", "data": {}}',
            "bad_timestamp",
            EVENTS,
        ),
        (
            b'{"type": "kiosk.view", "ts": "0001-01-01T00:00:00+01:00", "data": {}}',
            "bad_timestamp",
            EVENTS,
        ),
        (b'{"type": "kiosk.view", "ts": 9223372036854775807, "data": {}}', "bad_timestamp", EVENTS),
        (b'{"type": "kiosk.view", "ts": -1e300, "data": {}}', "bad_timestamp", EVENTS),
        (b'{"ts": "9999-12-31T23:59:59-01:00", "values": {"t": 1}}', "bad_timestamp", TELEMETRY),
        (b'{"type": "kiosk.view", "data": {"n": ' + b"7" * 5000 + b"}}", "bad_number", EVENTS),
        (b'{"type": "kiosk.view", "data": {"n": 9223372036854775808}}', "bad_number", EVENTS),
        (b'{"type": "kiosk.view", "data": {"n": -9223372036854775809}}', "bad_number", EVENTS),
        (b'{"type": "product.pickup", "data": {"sku": "S", "w": NaN}}', "bad_number", EVENTS),
        (b'{"type": "kiosk.view", "data": {"w": Infinity}}', "bad_number", EVENTS),
        (b'{"type": "kiosk.view", "data": {"w": -Infinity}}', "bad_number", EVENTS),
        (b'{"type": "kiosk.view", "data": {"w": 1e400}}', "bad_number", EVENTS),
        (b'{"values": {"temp_c": NaN}}', "bad_number", TELEMETRY),
        (b'{"values": {"temp_c": -1e999}}', "bad_number", TELEMETRY),
        (b'{"values": {"n": ' + b"1" * 4301 + b"}}", "bad_number", TELEMETRY),
        # Issue 9 item 3: a lone surrogate reached the writer and killed its thread.
        (b'{"type": "product.pickup", "data": {"sku": "\\ud800"}}', "bad_unicode", EVENTS),
        (b'{"type": "kiosk.view", "data": {"\\uDFFF": 1}}', "bad_unicode", EVENTS),
        (b'[{"type": "kiosk.view", "data": {"a": [[{"b": "x\\udc00"}]]}}]', "bad_unicode", EVENTS),
        (b'{"type": "kiosk.view", "customer_id": "\\ud800", "data": {}}', "bad_unicode", EVENTS),
        (b'{"values": {"\\ud800": 1}}', "bad_unicode", TELEMETRY),
        (b'{"type": "product.pickup", "data": {"sku": "a\\u0000b"}}', "bad_unicode", EVENTS),
        (b'{"values": {"t\\u0000": 1}}', "bad_unicode", TELEMETRY),
        (b"[]", "empty_batch", EVENTS),
        (b"42", "wrong_type", EVENTS),
        (b'{"values": [1, 2]}', "wrong_type", TELEMETRY),
        (b'{"temp_c": 4}', "missing_field", TELEMETRY),
        (b'{"values": {"nested": {"a": "text"}}}', "wrong_type", TELEMETRY),  # nested: flattened
    ],
)
def test_bad_input_is_rejected_with_its_reason(
    payload: bytes, reason: str, topic: TopicParts
) -> None:
    [rejected] = decode(payload, topic)
    assert isinstance(rejected, Rejected)
    assert rejected.reason == reason
    assert rejected.source == SOURCE


def test_a_valid_surrogate_pair_and_int64_edges_are_accepted() -> None:
    # Declared fields only (undeclared ones are dropped): the edges ride in weight_g.
    edges = (-(2**63), 2**63 - 1, 1.7e308)
    payload = (
        b"["
        + b",".join(
            b'{"type": "product.pickup", "data": {"sku": "\\ud83d\\ude00", "weight_g": %s}}'
            % json.dumps(edge).encode()
            for edge in edges
        )
        + b"]"
    )
    events = decode(payload)
    assert all(isinstance(event, Event) for event in events)
    assert [event.data for event in events if isinstance(event, Event)] == [
        {"sku": "\U0001f600", "weight_g": edge} for edge in edges
    ]


def test_a_device_time_out_of_tolerance_is_kept_with_the_receive_time() -> None:
    # One rule for MQTT and serial: the event is kept, its ts is the receive time.
    for ts in ("2126-01-01T00:00:00Z", "1970-01-01T00:00:00Z", 0):
        payload = json.dumps({"type": "kiosk.view", "ts": ts, "data": {}}).encode()
        [event] = decode(payload)
        assert isinstance(event, Event)
        assert event.ts == event.received_at == "2026-11-22T08:00:00.000Z"


def test_too_many_events_in_one_message() -> None:
    context = DecodeContext("s", default_registry(), InputSection(max_events_per_message=3), b"k")
    payload = json.dumps([{"type": "kiosk.view", "data": {}}] * 4).encode()
    [rejected] = decode_message(context, EVENTS, SOURCE, payload, NOW)
    assert isinstance(rejected, Rejected)
    assert rejected.reason == "too_many_events"


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=2048))
def test_decoding_never_raises_on_arbitrary_bytes(payload: bytes) -> None:
    items = decode(payload)
    assert items
    assert all(isinstance(item, Event | Rejected) for item in items)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=10),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=5), children, max_size=4)
    ),
    max_leaves=20,
)


@settings(max_examples=300, deadline=None)
@given(
    st.dictionaries(
        st.sampled_from(["type", "data", "ts", "customer_id", "event_id", "x"]), json_values
    )
)
def test_any_json_object_is_an_event_or_a_reason(document: dict[str, object]) -> None:
    for item in decode(json.dumps(document).encode()):
        if isinstance(item, Rejected):
            assert item.reason
        else:
            assert default_registry().check_data(item.type, item.data) is None


def test_a_box_clock_25_hours_behind_raises_the_skew_alarm_and_keeps_device_times(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Issue 9 item 7: every correctly time-stamped event was quarantined "in the future".
    context = make_context("store-001", default_registry(), InputSection(), b"test-id-key")
    true_now = NOW + timedelta(hours=25)
    events = []
    for n in range(30):
        ts = format_ts(true_now + timedelta(seconds=n))
        payload = json.dumps({"type": "kiosk.view", "ts": ts, "data": {"n": n}}).encode()
        [item] = decode_message(context, EVENTS, SOURCE, payload, NOW)
        assert isinstance(item, Event)  # nothing is quarantined
        events.append(item)
    minimum = InputSection().clock_skew_min_events
    assert all(e.ts == e.received_at for e in events[: minimum - 1])  # before the alarm
    assert all(e.ts != e.received_at for e in events[minimum - 1 :])  # device time kept
    assert events[-1].ts == format_ts(true_now + timedelta(seconds=29))
    clock = context.clock.status()["clock"]
    assert clock["suspect_skew"] is True
    assert 25 * 3600 <= clock["skew_s"] <= 25 * 3600 + 30
    assert clock["device_time_replaced"] == minimum - 1
    assert any(
        r.levelname == "WARNING" and r.message.startswith("clock.skew.suspected")
        for r in caplog.records
    )
    # A device whose own clock is far off is still not believed while the alarm is up.
    payload = b'{"type": "kiosk.view", "ts": "2199-01-01T00:00:00Z", "data": {}}'
    [odd] = decode_message(context, EVENTS, SOURCE, payload, NOW)
    assert isinstance(odd, Event)
    assert odd.ts == odd.received_at


def test_a_few_devices_ahead_do_not_raise_the_alarm() -> None:
    context = make_context("store-001", default_registry(), InputSection(), b"test-id-key")
    for n in range(60):
        ahead = timedelta(days=3) if n % 10 == 0 else timedelta(seconds=-1)
        payload = json.dumps(
            {"type": "kiosk.view", "ts": format_ts(NOW + ahead), "data": {}}
        ).encode()
        decode_message(context, EVENTS, SOURCE, payload, NOW)
    assert context.clock.status()["clock"]["suspect_skew"] is False
    assert context.clock.status()["clock"]["device_time_replaced"] == 6


@pytest.mark.parametrize(
    "text",
    [
        "9999-12-31T23:59:59-01:00",  # year 10000 in UTC: OverflowError before
        "0001-01-01T00:00:00+01:00",  # year 0 in UTC: OverflowError before
        "2026-11-22T08:00:00",  # no zone
        "2" * 100_000,
        "",
    ],
)
def test_parse_ts_is_total(text: str) -> None:
    assert parse_ts(text) is None


def test_format_ts_keeps_four_digit_years() -> None:
    assert format_ts(datetime(5, 1, 2, 3, 4, 5, 678_901, tzinfo=UTC)) == "0005-01-02T03:04:05.678Z"
    assert parse_ts("0005-01-02T03:04:05.678Z") == datetime(5, 1, 2, 3, 4, 5, 678_000, tzinfo=UTC)
