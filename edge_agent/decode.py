"""Turn one MQTT message into events, or into rejections with a reason.

Decoding never raises on input: every failure becomes a ``Rejected`` that the buffer
quarantines (reason, source, raw bytes), so a bad product can never stop the agent. What
Python's ``json`` accepts but the rest of the pipe cannot hold is refused here, before the
writer sees it: ``NaN``/``Infinity`` and floats that overflow (``1e400``), integers outside
signed 64 bits (SQLite's JSON functions and the store's ``bigint`` end there; Python's own
limit of 4,300 digits would raise), and lone UTF-16 surrogates (``"\\ud800"``), which no
UTF-8 text can hold, in keys and values at any depth.

Telemetry comes in three forms (docs/telemetry.md), all one ``telemetry`` event whose
``values`` the registry then checks (declared names, numbers and booleans):
- ``.../telemetry`` with ``{"ts": ..., "values": {"temp_c": 4.1}}``;
- the same with nested objects in ``values``, flattened with ``.``:
  ``{"motor": {"temp_c": 4.1}}`` is ``motor.temp_c`` (the registry bounds the depth);
- one value per topic, the Home Assistant / Node-RED habit: ``.../telemetry/temp_c`` with
  the payload ``4.1``, ``true``/``false`` (``on``/``off``, any case), ``unavailable`` or
  ``unknown`` or nothing (null), a JSON string or bare short text (handed to the registry,
  which refuses strings: a reading that is text could carry a customer id), or an object,
  flattened under the topic's name.
"""

from __future__ import annotations

import functools
import json
import math
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Final

from cloud_sync.envelope_schema import MAX_ID_LENGTH, Registry
from edge_agent.config import InputSection
from edge_agent.device_time import ClockRules, DeviceClockJudge, from_epoch
from edge_agent.events import SCHEMA_VERSION, Event, Rejected, derive_event_id, format_ts, parse_ts
from edge_agent.safe_json import BadNumberError, load_json, may_hold_unholdable, unholdable_string

EVENTS_CHANNEL: Final = "events"
TELEMETRY_CHANNEL: Final = "telemetry"
# One value per topic: .../telemetry/{name}, subscribed beside .../telemetry.
TELEMETRY_VALUE_CHANNEL: Final = "telemetry/+"
FIELD_SEPARATOR: Final = "."  # nested telemetry {"motor": {"temp_c": 1}} -> "motor.temp_c"
MAX_TEXT_VALUE: Final = 64  # characters of a bare text payload on a value topic
_TRUE_WORDS: Final = frozenset({"true", "on"})
_FALSE_WORDS: Final = frozenset({"false", "off"})
_NULL_WORDS: Final = frozenset({"", "unavailable", "unknown", "null", "none"})


@dataclass(frozen=True, slots=True)
class DecodeContext:
    store_id: str
    registry: Registry
    limits: InputSection
    id_key: bytes = field(repr=False)  # keys derived event ids (governance.event_id_key)
    clock: DeviceClockJudge = field(default_factory=DeviceClockJudge)


def make_context(
    store_id: str,
    registry: Registry,
    limits: InputSection,
    id_key: bytes,
    clock: DeviceClockJudge | None = None,
) -> DecodeContext:
    """The agent's one context: every source shares its clock judge (and its alarm)."""
    judge = clock or DeviceClockJudge(clock_rules(limits))
    return DecodeContext(store_id, registry, limits, id_key, judge)


def clock_rules(limits: InputSection) -> ClockRules:
    return ClockRules(
        future_tolerance_s=limits.max_future_skew_s,
        past_tolerance_s=limits.max_event_age_s,
        skew_min_events=limits.clock_skew_min_events,
    )


@dataclass(slots=True)  # not frozen: one per message, and a frozen __init__ costs 2x
class _Message:
    context: DecodeContext
    topic: TopicParts
    source: str
    payload: bytes
    received: datetime
    received_at: str  # the receive time, formatted once


@dataclass(frozen=True, slots=True)
class TopicParts:
    device_id: str
    channel: str  # "events" or "telemetry"
    field: str = ""  # telemetry/{field}: one value per topic


_CACHED_TOPIC_LENGTH: Final = 256  # longer topics are parsed each time: the cache stays small


def parse_topic(topic: str, prefix: str, store_id: str) -> TopicParts | None:
    """``{prefix}/{store_id}/devices/{device_id}/{events|telemetry|telemetry/{field}}``,
    else None."""
    if (
        len(topic) <= _CACHED_TOPIC_LENGTH
    ):  # a store's devices send on a few topics, again and again
        return _parse_topic_cached(topic, prefix, store_id)
    return _parse_topic(topic, prefix, store_id)


def _parse_topic(topic: str, prefix: str, store_id: str) -> TopicParts | None:
    head = f"{prefix}/{store_id}/devices/"
    if not topic.startswith(head) or "\x00" in topic:  # MQTT forbids U+0000; PostgreSQL too
        return None
    device_id, _, channel = topic[len(head) :].partition("/")
    channel, _, name = channel.partition("/")
    if not device_id or len(device_id) > MAX_ID_LENGTH:
        return None
    if name:
        if channel != TELEMETRY_CHANNEL or "/" in name or len(name) > MAX_ID_LENGTH:
            return None
        return TopicParts(device_id, channel, name)
    if channel not in (EVENTS_CHANNEL, TELEMETRY_CHANNEL) or topic.endswith("/"):
        return None
    return TopicParts(device_id, channel)


_parse_topic_cached: Final = functools.lru_cache(maxsize=1024)(_parse_topic)


def decode_message(
    context: DecodeContext,
    topic: TopicParts,
    source: str,
    payload: bytes,
    now: datetime | None = None,
) -> list[Event | Rejected]:
    """Decode one message's payload (one event, an array of events, or telemetry)."""
    received = now or datetime.now(UTC)
    received_at = format_ts(received)

    def reject(reason: str, detail: str = "", raw: bytes = payload) -> list[Event | Rejected]:
        return [Rejected(source, reason, raw, detail, received_at)]

    limits = context.limits
    if len(payload) > limits.max_payload_bytes:
        return reject("too_large", f"{len(payload)} bytes > {limits.max_payload_bytes}")
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError as exc:
        return reject("not_utf8", str(exc))
    if topic.field:
        word = text.strip().lower()
        if word in _TRUE_WORDS or word in _FALSE_WORDS or word in _NULL_WORDS:
            value = True if word in _TRUE_WORDS else False if word in _FALSE_WORDS else None
            message = _Message(context, topic, source, payload, received, received_at)
            return [_telemetry_value(message, value)]
    try:
        document = load_json(text)
    except json.JSONDecodeError as exc:
        if not topic.field:
            return reject("not_json", str(exc))
        bare = _bare_value(text)
        if isinstance(bare, Rejected):
            return reject(bare.reason, bare.detail)
        document = bare
    except RecursionError:
        return reject("too_deep", "nesting exceeds the JSON parser's limit")
    except BadNumberError as exc:
        return reject("bad_number", str(exc))
    if _nesting_may_exceed(payload, limits.max_depth) and _depth(document) > limits.max_depth:
        return reject("too_deep", f"nesting deeper than {limits.max_depth}")
    if may_hold_unholdable(payload):
        where = unholdable_string(document)
        if where is not None:
            return reject("bad_unicode", f"lone surrogate or NUL in {where}")

    message = _Message(context, topic, source, payload, received, received_at)
    if topic.field:
        return [_telemetry_value(message, document)]
    if topic.channel == TELEMETRY_CHANNEL:
        return [_telemetry(message, document)]
    items = document if isinstance(document, list) else [document]
    if not items:
        return reject("empty_batch")
    if len(items) > limits.max_events_per_message:
        return reject("too_many_events", f"{len(items)} > {limits.max_events_per_message}")
    single = not isinstance(document, list)
    decoded: list[Event | Rejected] = []
    for index, item in enumerate(items):
        decoded.append(_event(message, index, item, single))
    return decoded


def _event(message: _Message, index: int, item: Any, single: bool) -> Event | Rejected:
    context, topic, source = message.context, message.topic, message.source
    received_at = message.received_at

    def reject(reason: str, detail: str) -> Rejected:
        # Only a rejected item of an array is re-encoded: valid events skip that work.
        raw_item = message.payload if single else json.dumps(item).encode("utf-8")
        return Rejected(source, reason, raw_item, detail, received_at)

    if not isinstance(item, dict):
        return reject("wrong_type", f"event {index} is not an object")
    event_type = item.get("type")
    if not isinstance(event_type, str):
        return reject("missing_field" if event_type is None else "wrong_type", "type")
    if event_type not in context.registry.types:
        return reject("unknown_type", event_type[:64])
    declared = context.registry.admit_data(event_type, item.get("data", {}))
    if isinstance(declared, str):
        return reject(declared, f"data of {event_type}")
    data = declared.data  # undeclared fields dropped (and counted)
    customer_id = item.get("customer_id")
    if customer_id is not None and not _is_id(customer_id):
        return reject("wrong_type", "customer_id")
    event_id = item.get("event_id")
    if event_id is None:
        event_id = derive_event_id(context.id_key, source, message.payload, index)
    elif not _is_id(event_id):
        return reject("wrong_type", "event_id")
    ts = _event_time(item.get("ts"), message)
    if isinstance(ts, Rejected):
        return reject(ts.reason, ts.detail)
    return Event(
        event_id=event_id,
        type=event_type,
        ts=ts,
        store_id=context.store_id,
        device_id=topic.device_id,
        customer_id=customer_id,
        source=source,
        data=data,
        received_at=received_at,
        schema=SCHEMA_VERSION,
        customer=context.registry.is_customer_type(event_type),
    )


def _telemetry(message: _Message, document: Any) -> Event | Rejected:
    context, source = message.context, message.source
    payload, received_at = message.payload, message.received_at
    if not isinstance(document, dict):
        return Rejected(source, "wrong_type", payload, "telemetry is not an object", received_at)
    values = document.get("values")
    if not isinstance(values, dict):
        reason = "missing_field" if values is None else "wrong_type"
        return Rejected(source, reason, payload, "values", received_at)
    flat = flatten_values(values)
    if isinstance(flat, str):
        return Rejected(source, "wrong_type", payload, flat, received_at)
    declared = context.registry.admit_data("telemetry", {"values": flat})
    if isinstance(declared, str):
        return Rejected(source, declared, payload, "values", received_at)
    ts = _event_time(document.get("ts"), message)
    if isinstance(ts, Rejected):
        return Rejected(source, ts.reason, payload, ts.detail, received_at)
    event_id = derive_event_id(context.id_key, source, payload)
    return _telemetry_event(message, event_id, ts, declared.data)


def _telemetry_value(message: _Message, value: Any) -> Event | Rejected:
    """One value on ``.../telemetry/{name}``: ``{name: value}`` (an object is flattened
    under ``name``), timed at receipt. The id covers the receive time too: the same reading
    sent again a minute later is a second sample, not a redelivery."""
    context, topic, source = message.context, message.topic, message.source
    payload, received_at = message.payload, message.received_at
    if isinstance(value, list):
        return Rejected(source, "wrong_type", payload, "a value, not an array", received_at)
    flat = flatten_values({topic.field: value})
    if isinstance(flat, str):
        return Rejected(source, "wrong_type", payload, flat, received_at)
    registry = context.registry
    if isinstance(value, dict):  # like the object form: undeclared names dropped, counted
        cleaned = registry.admit_data("telemetry", {"values": flat})
    else:
        cleaned = registry.clean_data("telemetry", {"values": flat})
        if not isinstance(cleaned, str) and cleaned.dropped:  # a name the registry refuses
            detail = f"telemetry name {topic.field[:64]!r} is not allowed by the registry"
            return Rejected(source, "bad_topic", payload, detail, received_at)
    if isinstance(cleaned, str):
        return Rejected(source, cleaned, payload, f"values.{topic.field}", received_at)
    event_id = derive_event_id(context.id_key, source, f"{received_at}\0".encode() + payload)
    return _telemetry_event(message, event_id, received_at, cleaned.data)


def _telemetry_event(message: _Message, event_id: str, ts: str, data: dict[str, Any]) -> Event:
    return Event(
        event_id=event_id,
        type="telemetry",
        ts=ts,
        store_id=message.context.store_id,
        device_id=message.topic.device_id,
        customer_id=None,
        source=message.source,
        data=data,
        received_at=message.received_at,
        customer=False,
    )


def flatten_values(values: dict[str, Any]) -> dict[str, Any] | str:
    """Nested objects joined with ``FIELD_SEPARATOR``; a problem as text (a name given
    twice, as ``{"a": {"b": 1}, "a.b": 2}``). Depth is already bounded (input.max_depth)
    and the registry bounds names and counts."""
    if not any(isinstance(value, dict) for value in values.values()):
        return values
    flat: dict[str, Any] = {}
    stack: list[tuple[str, dict[str, Any]]] = [("", values)]
    while stack:
        prefix, table = stack.pop()
        for key, value in table.items():
            name = f"{prefix}{FIELD_SEPARATOR}{key}" if prefix else key
            if isinstance(value, dict):
                stack.append((name, value))
            elif name in flat:
                return f"values.{name[:64]} is given twice"
            else:
                flat[name] = value
    return flat


def _bare_value(text: str) -> Any:
    """A value topic's payload that is not JSON: a number Python reads (``+4.1``), else
    short printable text, else a ``Rejected`` (source and time filled in by the caller)."""
    stripped = text.strip()
    if len(stripped) <= MAX_TEXT_VALUE:
        try:
            number = float(stripped)
        except ValueError:
            if stripped.isprintable():
                return stripped
        else:
            if math.isfinite(number):
                return number
            return Rejected("", "bad_number", b"", stripped)
    detail = f"not a number, true/false or text of at most {MAX_TEXT_VALUE} characters"
    return Rejected("", "not_json", b"", detail)


def _event_time(value: Any, message: _Message) -> str | Rejected:
    """The device's time when given and sane (DeviceClockJudge), the receive time if absent."""
    if value is None:
        return message.received_at
    moment: datetime | None
    if isinstance(value, bool):
        moment = None
    elif isinstance(value, int | float):
        moment = from_epoch(value)
    elif isinstance(value, str):
        moment = parse_ts(value)
    else:
        moment = None
    if moment is None:
        return Rejected("", "bad_timestamp", b"", repr(value)[:64])
    chosen = message.context.clock.judge(moment, message.received)
    return message.received_at if chosen is message.received else format_ts(chosen)


def _is_id(value: Any) -> bool:
    return isinstance(value, str) and 0 < len(value) <= MAX_ID_LENGTH


def _nesting_may_exceed(payload: bytes, max_depth: int) -> bool:
    # Cheap pre-check: with fewer brackets than the limit the depth cannot exceed it.
    return payload.count(b"[") + payload.count(b"{") > max_depth


def _depth(document: Any) -> int:
    deepest = 0
    stack: list[tuple[Any, int]] = [(document, 1)]
    while stack:
        node, level = stack.pop()
        if isinstance(node, dict):
            deepest = max(deepest, level)
            stack.extend((child, level + 1) for child in node.values())
        elif isinstance(node, list):
            deepest = max(deepest, level)
            stack.extend((child, level + 1) for child in node)
    return deepest
