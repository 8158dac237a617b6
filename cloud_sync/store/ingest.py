"""From request bytes to rows: content checks, bounded gzip, JSON, per-envelope validation.

A batch is refused whole (4xx, nothing written) when the request itself is wrong: content
type, encoding, size, JSON syntax, shape. Inside a well-formed batch each envelope is judged
alone: valid ones are stored, invalid ones come back in ``rejected`` with a reason, so one
bad event never blocks an agent's upload queue.
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from cloud_sync.envelope_schema import Registry, check_envelope_head
from cloud_sync.store.errors import BadRequestError
from cloud_sync.store.records import EventRow, parse_ts

JSON_TYPES: Final = frozenset({"application/json"})
RISKY_ESCAPES: Final = (b"\\u0000", b"\\ud", b"\\uD")
# One encoder: json.dumps with options builds a new JSONEncoder on every call.
_DATA_ENCODER: Final = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"))


@dataclass(frozen=True, slots=True)
class Limits:
    max_body_bytes: int = 8 * 1024 * 1024  # as sent (compressed when gzip)
    max_decoded_bytes: int = 64 * 1024 * 1024  # after gunzip: bounds a gzip bomb
    max_events: int = 10_000


@dataclass(frozen=True, slots=True)
class DecodedBody:
    items: list[Any]
    # JSON can smuggle U+0000 or a lone surrogate into a string only through a \u escape;
    # without one in the body, the per-string walk for them is skipped (it is the slow part).
    risky_escapes: bool


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
    """The batch's envelopes as parsed JSON values (not yet validated)."""
    if len(body) > limits.max_body_bytes:
        raise BadRequestError(413, "body_too_large", f"{len(body)} > {limits.max_body_bytes} bytes")
    encoding = (content_encoding or "identity").strip().lower()
    if encoding == "gzip":
        text = _gunzip(body, limits.max_decoded_bytes)
    elif encoding == "identity":
        text = body
    else:
        raise BadRequestError(415, "unsupported_encoding", f"{encoding!r}; use gzip or none")
    try:
        # UTF-8 only (RFC 8259); json.loads would also guess UTF-16/32 from bytes.
        document = json.loads(text.decode("utf-8"), parse_constant=_reject_constant)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError and UnicodeDecodeError too
        raise BadRequestError(400, "malformed_json", str(exc)[:200]) from exc
    if isinstance(document, dict) and isinstance(document.get("events"), list):
        items: list[Any] = document["events"]
    elif isinstance(document, list):
        items = document
    else:
        raise BadRequestError(
            400, "bad_batch_shape", 'expected [envelope, ...] or {"events": [...]}'
        )
    if len(items) > limits.max_events:
        raise BadRequestError(413, "too_many_events", f"{len(items)} > {limits.max_events}")
    risky = any(escape in text for escape in RISKY_ESCAPES)
    return DecodedBody(items, risky)


def _gunzip(body: bytes, max_bytes: int) -> bytes:
    inflater = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)
    try:
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
    items: Sequence[Any], store_id: str | None, registry: Registry, *, check_text: bool = True
) -> CheckedBatch:
    """Judge each envelope; ``store_id`` is the uploading agent's store.

    ``check_text=False`` skips the NUL and surrogate checks: only for items decoded from a
    body without ``\\u`` escapes that could produce them (``DecodedBody.risky_escapes``).
    """
    batch = CheckedBatch()
    seen: set[str] = set()
    for index, item in enumerate(items):
        row, reason = to_row(item, registry, check_text=check_text)
        if row is not None and row.store_id != store_id:
            row, reason = None, "store_mismatch"
        if row is None:
            event_id = item.get("event_id") if isinstance(item, dict) else None
            batch.rejected.append(
                {
                    "index": index,
                    "event_id": event_id if isinstance(event_id, str) else None,
                    "reason": reason,
                }
            )
        elif row.event_id in seen:
            batch.repeated += 1
        else:
            seen.add(row.event_id)
            batch.rows.append(row)
    return batch


def to_row(
    item: object, registry: Registry, *, check_text: bool = True
) -> tuple[EventRow | None, str]:
    """One envelope as a row, or None and the reason it is refused."""
    if not isinstance(item, dict):
        return None, "not_an_object"
    reason = check_envelope_head(item, registry)
    if reason is not None:
        return None, reason
    ts = parse_ts(item["ts"])
    if ts is None:
        return None, "bad_ts"
    received_at = item.get("received_at")
    if received_at is not None and not isinstance(received_at, str):
        return None, "wrong_type"
    # The registry's declared fields only: the store keeps nothing an agent should have dropped.
    declared = registry.admit_data(item["type"], item.get("data", {}))
    if isinstance(declared, str):
        return None, declared
    data = declared.data
    if check_text and _has_nul(item):  # neither PostgreSQL text nor jsonb can hold U+0000
        return None, "nul_character"
    data_json = _DATA_ENCODER.encode(data)
    alias = data.get("alias") if item["type"] == "customer.identified" else None
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
    )
    if check_text and not _encodable(row):  # lone surrogates (from \ud800 escapes)
        return None, "bad_unicode"
    return row, ""


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
