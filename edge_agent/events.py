"""The one event type that flows through the pipe, and what a rejected input looks like.

Sources turn raw input into ``Event`` (accepted) or ``Rejected`` (quarantined with a reason);
the pipeline commits both to the buffer before the source acknowledges anything.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import json
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Final

import msgspec

SCHEMA_VERSION: Final = 1
_MAX_TS_LENGTH: Final = 64  # the longest RFC 3339 text is 35 characters
# A fixed namespace so the same (key, source, raw bytes, index) always yields the same id.
_EVENT_ID_NAMESPACE: Final = uuid.UUID("6f1c2b1e-4a6e-4f0e-9d55-0b7c1e2a9f10")


def derive_event_id(key: bytes, source: str, raw: bytes, index: int = 0) -> str:
    """A deterministic id for a message that carries none: redelivery maps to the same id.

    Keyed (HMAC-SHA256 with the agent's kept ``governance.event_id_key``): the raw message
    holds the customer's clear id, and the derived id is uploaded beside its pseudonym, so
    without the key nobody can test candidate ids against it.
    """
    digest = hmac.new(key, source.encode("utf-8") + b"\0" + raw, hashlib.sha256).hexdigest()
    return str(uuid.uuid5(_EVENT_ID_NAMESPACE, f"{digest}:{index}"))


@functools.lru_cache(maxsize=8)  # a burst of messages shares one receive time
def format_ts(moment: datetime) -> str:
    """RFC 3339 in UTC with milliseconds and a Z, the envelope's only time format."""
    utc = moment.astimezone(UTC)
    # Not strftime: its %Y drops the leading zeros of years before 1000 on glibc.
    return (
        f"{utc.year:04d}-{utc.month:02d}-{utc.day:02d}T{utc.hour:02d}:{utc.minute:02d}:"
        f"{utc.second:02d}.{utc.microsecond // 1000:03d}Z"
    )


def parse_ts(text: str) -> datetime | None:
    """Parse an RFC 3339 timestamp; None when it is not one, has no time zone, or falls
    outside the calendar in UTC (``9999-12-31T23:59:59-01:00`` is year 10000 there)."""
    if len(text) > _MAX_TS_LENGTH:
        return None
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
        if moment.tzinfo is None:
            return None
        return moment.astimezone(UTC)
    except (ValueError, OverflowError):
        return None


class Event(msgspec.Struct, frozen=True, gc=False):
    """One governed event envelope (DESIGN.md, "The event envelope").

    A frozen msgspec Struct rather than a frozen dataclass: one is built per event, and a
    frozen dataclass's ``__init__`` sets each of its 11 fields through ``object.__setattr__``
    (about 1 µs; the Struct is built in C in about 0.2). Immutable all the same (assigning a
    field raises ``AttributeError``). ``gc=False``: an event refers only to strings and its
    decoded JSON ``data``, never back to itself, so the collector need not track it.
    """

    event_id: str
    type: str
    ts: str  # the device's time when given and sane, else the receive time
    store_id: str
    device_id: str | None
    customer_id: str | None
    source: str  # e.g. "mqtt:edge/store-001/devices/shelf-07/events", "serial:shelf-07"
    data: dict[str, Any]
    received_at: str  # the agent's receive time, always kept
    schema: int = SCHEMA_VERSION
    customer: bool = True  # a customer interaction (kept longest) rather than telemetry

    def envelope(self) -> dict[str, Any]:
        return {
            "event_id": self.event_id,
            "type": self.type,
            "ts": self.ts,
            "store_id": self.store_id,
            "device_id": self.device_id,
            "customer_id": self.customer_id,
            "source": self.source,
            "schema": self.schema,
            "data": self.data,
            "received_at": self.received_at,
        }

    def to_json(self) -> str:
        return json.dumps(self.envelope(), separators=(",", ":"), ensure_ascii=False)


@dataclass(frozen=True, slots=True)
class Rejected:
    """Input that failed a check: quarantined with its reason, never an exception."""

    source: str
    reason: str  # snake_case: not_utf8, not_json, too_large, too_deep, unknown_type, ...
    raw: bytes
    detail: str = ""
    received_at: str = field(default_factory=lambda: format_ts(datetime.now(UTC)))
