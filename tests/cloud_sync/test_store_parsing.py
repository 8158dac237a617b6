"""Property and fuzz tests for what the store reads from outside: bodies, envelopes, cursors."""

from __future__ import annotations

import gzip
import json
from datetime import UTC, datetime
from typing import Any

import pytest
from cstore_helpers import envelope
from hypothesis import given, settings
from hypothesis import strategies as st

from cloud_sync.envelope_schema import default_registry
from cloud_sync.store.batch_scan import WINDOW, batch_spans
from cloud_sync.store.errors import BadRequestError
from cloud_sync.store.ingest import DecodedBody, Limits, check_batch, decode_body
from cloud_sync.store.profiles import decode_cursor, encode_cursor
from cloud_sync.store.records import StoredEvent, parse_ts, sortable_ts

LIMITS = Limits(max_body_bytes=64 * 1024, max_decoded_bytes=256 * 1024, max_events=100)
json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=20,
)


@settings(max_examples=300)
@given(body=st.binary(max_size=2048), gzipped=st.booleans())
def test_any_bytes_are_a_batch_or_a_4xx(body: bytes, gzipped: bool) -> None:
    data = gzip.compress(body) if gzipped else body
    decoded, status = decode_or_status(data, "gzip" if gzipped else None)
    if decoded is None:
        assert status is not None
        assert 400 <= status < 500
        return
    check_batch(decoded.items, "store-001", default_registry())


def decode_or_status(data: bytes, encoding: str | None) -> tuple[DecodedBody | None, int | None]:
    try:
        return decode_body(data, encoding, LIMITS), None
    except BadRequestError as exc:
        return None, exc.status


@settings(max_examples=300)
@given(items=st.lists(json_values, max_size=8))
def test_any_json_items_are_judged_one_by_one(items: list[Any]) -> None:
    body = json.dumps(items).encode()
    decoded = decode_body(body, None, LIMITS)
    batch = check_batch(decoded.items, "store-001", default_registry())
    assert len(batch.rows) + len(batch.rejected) + batch.repeated == len(items)
    assert [r["index"] for r in batch.rejected] == sorted(r["index"] for r in batch.rejected)


@settings(max_examples=200)
@given(
    sku=st.text(max_size=20),
    customer=st.text(min_size=1, max_size=30),
)
def test_valid_envelopes_keep_their_content(sku: str, customer: str) -> None:
    item = envelope(customer_id=customer, data={"sku": sku})
    body = json.dumps([item]).encode()
    decoded = decode_body(body, None, LIMITS)
    batch = check_batch(decoded.items, "store-001", default_registry())
    storable = "\x00" not in sku + customer and _utf8(sku + customer)
    if not storable:
        assert batch.rows == []
        assert batch.rejected[0]["reason"] in ("nul_character", "bad_unicode")
        return
    (row,) = batch.rows
    assert row.customer_id == customer
    assert json.loads(row.data_json) == {"sku": sku}


def _utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


@given(
    moment=st.datetimes(
        min_value=datetime(2000, 1, 1), max_value=datetime(2100, 1, 1), timezones=st.just(UTC)
    ),
    seq=st.integers(min_value=0, max_value=2**62),
)
def test_cursor_round_trip(moment: datetime, seq: int) -> None:
    event = StoredEvent(seq, moment, {})
    assert decode_cursor(encode_cursor(event)) == (moment, seq)
    assert parse_ts(sortable_ts(moment)) == moment


@given(text=st.text(max_size=60))
def test_any_cursor_text_is_a_position_or_a_400(text: str) -> None:
    status = None
    try:
        decode_cursor(text)
    except BadRequestError as exc:
        status = exc.status
    assert status in (None, 400)


@pytest.mark.parametrize(
    ("content_encoding", "status"), [("deflate", 415), ("gzip, gzip", 415), ("GZIP", 400)]
)
def test_encodings(content_encoding: str, status: int) -> None:
    with pytest.raises(BadRequestError) as refused:
        decode_body(b"[]", content_encoding, LIMITS)
    assert refused.value.status == status


def _depth(value: Any) -> int:
    if isinstance(value, dict):
        return 1 + max((_depth(v) for v in value.values()), default=0)
    if isinstance(value, list):
        return 1 + max((_depth(v) for v in value), default=0)
    return 0


@settings(max_examples=300)
@given(
    items=st.lists(json_values, max_size=8),
    spacing=st.sampled_from([None, 1, "\t"]),
    wrapped=st.booleans(),
)
def test_scanned_spans_are_the_elements_json_loads_sees(
    items: list[Any], spacing: int | str | None, wrapped: bool
) -> None:
    document: Any = {"events": items} if wrapped else items
    body = json.dumps(document, indent=spacing, ensure_ascii=False).encode()
    spans = batch_spans(body, 100)
    assert [json.loads(body[s.start : s.end]) for s in spans] == items
    assert [s.depth for s in spans] == [_depth(item) for item in items]


def test_scan_windows_carry_strings_escapes_and_levels_across_their_edges() -> None:
    # Long strings with escaped quotes and brackets straddle the numpy windows.
    tricky = 'a\\"[{,}]\\\\' * 30_000
    items = [{"s": tricky, "n": [[[1]]]}, {"s": "]" * 200_000}, [["x" * 300_000]], 5]
    body = json.dumps(items).encode()
    assert len(body) > 3 * WINDOW
    spans = batch_spans(body, 10)
    assert [json.loads(body[s.start : s.end]) for s in spans] == items
    assert [s.depth for s in spans] == [4, 1, 2, 0]
