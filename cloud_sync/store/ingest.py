"""From request bytes to rows: content checks, bounded gzip, JSON, per-envelope validation.

A batch is refused whole (4xx, nothing written) when the request itself is wrong: content
type, encoding, size, the batch array's skeleton, shape. Inside it each envelope is judged
alone: an envelope too large or too deeply nested is refused before it is parsed, one that
does not parse or holds a value no database can store is refused with its reason, valid
ones are stored; so one bad event never blocks an agent's upload queue, and memory stays
bounded by the limits, never by what a body inflates to.
"""

from __future__ import annotations

import json
import math
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Final

from cloud_sync.envelope_schema import Registry, check_envelope_head
from cloud_sync.store.batch_scan import Span, batch_spans
from cloud_sync.store.errors import BadRequestError
from cloud_sync.store.records import EventRow, parse_ts

JSON_TYPES: Final = frozenset({"application/json"})
RISKY_ESCAPES: Final = (b"\\u0000", b"\\ud", b"\\uD")
# One encoder: json.dumps with options builds a new JSONEncoder on every call.
_DATA_ENCODER: Final = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"))
# Field lengths: ids are bounded by the shared schema (MAX_ID_LENGTH); these bound the rest.
MAX_SOURCE_CHARS: Final = 512
MAX_RECEIVED_AT_CHARS: Final = 64
MAX_TEXT_CHARS: Final = 4096  # any string (or key) inside data
# What both databases can hold: SQLite's json functions read 64-bit integers, jsonb no NaN.
INT64: Final = 2**63 - 1
EARLIEST_TS: Final = datetime(1970, 1, 1, tzinfo=UTC)
DEFAULT_FUTURE_SKEW_S: Final = 300.0


@dataclass(frozen=True, slots=True)
class Limits:
    max_body_bytes: int = 8 * 1024 * 1024  # as sent (compressed when gzip)
    # After gunzip: bounds a gzip bomb, and the scan's work (linear in these bytes).
    max_decoded_bytes: int = 8 * 1024 * 1024
    max_events: int = 10_000
    max_envelope_bytes: int = 64 * 1024  # one envelope as sent, before it is parsed
    max_depth: int = 16  # nesting inside one envelope (the envelope object is 1)
    max_future_skew_s: float = DEFAULT_FUTURE_SKEW_S  # dated later than receipt + this: refused
    max_concurrent_ingests: int = 4  # per credential; more at once is a 429


@dataclass(frozen=True, slots=True)
class Piece:
    """One element of the batch array: parsed, or refused while reading with a reason."""

    value: Any = None
    refused: str | None = None
    # JSON can smuggle U+0000 or a lone surrogate into a string only through a \u escape;
    # without one in the element, the per-string walk for them is skipped.
    risky: bool = True


@dataclass(frozen=True, slots=True)
class DecodedBody:
    items: list[Piece]


@dataclass(slots=True)
class CheckedBatch:
    rows: list[EventRow] = field(default_factory=list)
    rejected: list[dict[str, Any]] = field(default_factory=list)
    repeated: int = 0  # the same event_id twice in one batch: a duplicate, stored once


def check_content_type(content_type: str | None) -> None:
    media = (content_type or "").split(";", 1)[0].strip().lower()
    if media not in JSON_TYPES:
        raise BadRequestError(
            415, "unsupported_media_type", f"expected application/json, got {media!r}"
        )


def decode_body(body: bytes, content_encoding: str | None, limits: Limits) -> DecodedBody:
    """The batch's elements, each parsed alone when within the limits (not yet validated)."""
    if len(body) > limits.max_body_bytes:
        raise BadRequestError(413, "body_too_large", f"{len(body)} > {limits.max_body_bytes} bytes")
    encoding = (content_encoding or "identity").strip().lower()
    if encoding == "gzip":
        text = _gunzip(body, limits.max_decoded_bytes)
    elif encoding == "identity":
        text = body
    else:
        raise BadRequestError(415, "unsupported_encoding", f"{encoding!r}; use gzip or none")
    if len(text) > limits.max_decoded_bytes:
        raise BadRequestError(413, "body_too_large", f"more than {limits.max_decoded_bytes} bytes")
    spans = batch_spans(text, limits.max_events)
    return DecodedBody([_parse(text[s.start : s.end], s, limits) for s in spans])


def _parse(chunk: bytes, span: Span, limits: Limits) -> Piece:
    if span.size > limits.max_envelope_bytes:
        return Piece(refused="envelope_too_large")
    if span.depth > limits.max_depth:
        return Piece(refused="too_deep")
    try:
        # UTF-8 only (RFC 8259); json.loads would also guess UTF-16/32 from bytes.
        value = json.loads(chunk.decode("utf-8"), parse_constant=_reject_constant)
    except UnicodeDecodeError:
        return Piece(refused="bad_unicode")
    except ValueError:  # JSONDecodeError; the depth limit rules out RecursionError
        return Piece(refused="malformed_json")
    return Piece(value, None, any(escape in chunk for escape in RISKY_ESCAPES))


def _gunzip(body: bytes, max_bytes: int) -> bytes:
    inflater = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)
    try:
        # Inflates at most max_bytes + 1: a bomb stops here, it never reaches memory whole.
        out = inflater.decompress(body, max_bytes + 1)
    except zlib.error as exc:
        raise BadRequestError(400, "bad_gzip", str(exc)) from exc
    if len(out) > max_bytes:
        raise BadRequestError(413, "body_too_large", f"more than {max_bytes} bytes once gunzipped")
    if not inflater.eof or inflater.unused_data:
        raise BadRequestError(400, "bad_gzip", "truncated or more than one gzip member")
    return out


def _reject_constant(name: str) -> Any:
    # NaN and Infinity are not JSON, and PostgreSQL's jsonb refuses them.
    raise ValueError(f"{name} is not valid JSON")


def check_batch(
    items: Sequence[Piece],
    store_id: str | None,
    registry: Registry,
    *,
    now: datetime | None = None,
    max_future_skew_s: float = DEFAULT_FUTURE_SKEW_S,
) -> CheckedBatch:
    """Judge each envelope; ``store_id`` is the uploading agent's store, ``now`` the receipt."""
    latest = (now or datetime.now(UTC)) + timedelta(seconds=max_future_skew_s)
    batch = CheckedBatch()
    seen: set[tuple[str, str]] = set()
    for index, item in enumerate(items):
        if item.refused is not None:
            row, reason = None, item.refused
        else:
            row, reason = to_row(item.value, registry, latest=latest, check_text=item.risky)
        if row is not None and row.store_id != store_id:
            row, reason = None, "store_mismatch"
        if row is None:
            value = item.value
            event_id = value.get("event_id") if isinstance(value, dict) else None
            batch.rejected.append(
                {
                    "index": index,
                    "event_id": event_id if isinstance(event_id, str) else None,
                    "reason": reason,
                }
            )
        elif (row.store_id, row.event_id) in seen:
            batch.repeated += 1
        else:
            seen.add((row.store_id, row.event_id))
            batch.rows.append(row)
    return batch


def to_row(
    item: object, registry: Registry, *, latest: datetime | None = None, check_text: bool = True
) -> tuple[EventRow | None, str]:
    """One envelope as a row, or None and the reason it is refused.

    ``latest`` is the last acceptable event time (receipt plus the allowed clock skew; by
    default now plus the default skew): an event dated later is refused, so a forged
    far-future consent cannot outrank real ones.
    """
    if latest is None:
        latest = datetime.now(UTC) + timedelta(seconds=DEFAULT_FUTURE_SKEW_S)
    if not isinstance(item, dict):
        return None, "not_an_object"
    reason = check_envelope_head(item, registry)
    if reason is not None:
        return None, reason
    ts = parse_ts(item["ts"])
    if ts is None or ts < EARLIEST_TS:
        return None, "bad_ts"
    if ts > latest:
        return None, "ts_in_future"
    received_at = item.get("received_at")
    if received_at is not None and not isinstance(received_at, str):
        return None, "wrong_type"
    if len(item["source"]) > MAX_SOURCE_CHARS or len(received_at or "") > MAX_RECEIVED_AT_CHARS:
        return None, "field_too_long"
    reason = _unstorable(item.get("data", {}))
    if reason is not None:
        return None, reason
    # The registry's declared fields only: the store keeps nothing an agent should have dropped.
    declared = registry.admit_data(item["type"], item.get("data", {}))
    if isinstance(declared, str):
        return None, declared
    data = declared.data
    if check_text and _has_nul(item):  # neither PostgreSQL text nor jsonb can hold U+0000
        return None, "nul_character"
    data_json = _DATA_ENCODER.encode(data)
    alias = data.get("alias") if item["type"] == "customer.identified" else None
    method = data.get("method") if item["type"] == "customer.identified" else None
    row = EventRow(
        event_id=item["event_id"],
        type=item["type"],
        ts=ts,
        store_id=item["store_id"],
        device_id=item.get("device_id"),
        customer_id=item.get("customer_id"),
        source=item["source"],
        schema=int(item.get("schema", registry.version)),
        data_json=data_json,
        received_at=received_at,
        alias=alias if isinstance(alias, str) and alias else None,
        method=method if isinstance(method, str) else None,
    )
    if check_text and not _encodable(row):  # lone surrogates (from \ud800 escapes)
        return None, "bad_unicode"
    return row, ""


def _unstorable(value: object) -> str | None:
    """Why a value inside ``data`` cannot be stored as it is, or None."""
    if isinstance(value, str):
        return "field_too_long" if len(value) > MAX_TEXT_CHARS else None
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, int):
        return None if -INT64 - 1 <= value <= INT64 else "unstorable_number"
    if isinstance(value, float):
        return None if math.isfinite(value) else "unstorable_number"  # 1e400 parses as inf
    if isinstance(value, dict):
        for key, inner in value.items():
            reason = _unstorable(key) or _unstorable(inner)
            if reason is not None:
                return reason
        return None
    if isinstance(value, list):
        for inner in value:
            reason = _unstorable(inner)
            if reason is not None:
                return reason
    return None


def _has_nul(value: object) -> bool:
    if isinstance(value, str):
        return "\x00" in value
    if isinstance(value, Mapping):
        return any(_has_nul(k) or _has_nul(v) for k, v in value.items())
    if isinstance(value, list):
        return any(_has_nul(v) for v in value)
    return False


def _encodable(row: EventRow) -> bool:
    texts = (
        row.event_id,
        row.type,
        row.store_id,
        row.device_id,
        row.customer_id,
        row.source,
        row.received_at,
        row.data_json,
    )
    try:
        for text in texts:
            if text is not None:
                text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True
