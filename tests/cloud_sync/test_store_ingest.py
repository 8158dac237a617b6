"""POST /v1/events on both backends: idempotency, gzip, per-envelope rejection, 4xx paths."""

from __future__ import annotations

import asyncio
import gzip
import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import psycopg
from aiohttp.test_utils import TestClient, TestServer
from conftest import TEST_LIMITS, Tokens
from cstore_helpers import batch, envelope

from cloud_sync.envelope_schema import default_registry
from cloud_sync.store import auth
from cloud_sync.store.app import create_app
from cloud_sync.store.backend import Backend, open_backend
from cloud_sync.store.ingest import Piece, check_batch
from cloud_sync.store.server import RUNNER_OPTIONS

Client = TestClient[Any, Any]
JSON = {"Content-Type": "application/json"}


async def post(client: Client, headers: dict[str, str], body: Any, **extra: str) -> Any:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    return await client.post("/v1/events", data=data, headers={**JSON, **headers, **extra})


async def test_same_batch_twice_is_accepted_then_duplicates(
    client: Client, tokens: Tokens, backend: Backend
) -> None:
    headers = await tokens.agent()
    events = batch(50)
    first = await post(client, headers, events)
    assert first.status == 200
    assert await first.json() == {"accepted": 50, "duplicates": 0, "erased": 0, "rejected": []}
    second = await post(client, headers, {"events": events})
    assert await second.json() == {"accepted": 0, "duplicates": 50, "erased": 0, "rejected": []}
    stats = await backend.stats()
    assert stats.events == 50
    assert stats.customers == 10


async def test_overlapping_batches_store_each_event_once(
    client: Client, tokens: Tokens, backend: Backend
) -> None:
    headers = await tokens.agent()
    events = batch(30)
    repeated = [*events[:10], events[0]]  # one id twice within the batch too
    assert (await (await post(client, headers, repeated)).json())["duplicates"] == 1
    answer = await (await post(client, headers, events)).json()
    assert (answer["accepted"], answer["duplicates"]) == (20, 10)
    assert (await backend.stats()).events == 30


async def test_gzip_body_is_accepted(client: Client, tokens: Tokens, backend: Backend) -> None:
    headers = await tokens.agent()
    body = gzip.compress(json.dumps(batch(40)).encode())
    response = await post(client, headers, body, **{"Content-Encoding": "gzip"})
    assert response.status == 200
    assert (await response.json())["accepted"] == 40
    assert (await backend.stats()).events == 40


async def test_invalid_envelopes_are_rejected_and_the_rest_stored(
    client: Client, tokens: Tokens, backend: Backend
) -> None:
    headers = await tokens.agent("store-001")
    good = batch(3)
    unknown = envelope("no.such.type")
    missing_sku = envelope("product.pickup", data={"weight_g": 3})
    bad_ts = {**envelope(), "ts": "yesterday"}
    other_store = envelope(store_id="store-999")
    nul = envelope(data={"sku": "SKU\u0000"})
    surrogate = envelope(data={"sku": "SKU-\ud800"})  # json.dumps writes it as an escape
    items = [good[0], unknown, missing_sku, 42, good[1], bad_ts, other_store, nul, good[2]]
    items.append(surrogate)
    answer = await (await post(client, headers, items)).json()
    assert answer["accepted"] == 3
    reasons = {r["index"]: r["reason"] for r in answer["rejected"]}
    assert reasons == {
        1: "unknown_type",
        2: "missing_field",
        3: "not_an_object",
        5: "bad_ts",
        6: "store_mismatch",
        7: "nul_character",
        9: "bad_unicode",
    }
    by_index = {r["index"]: r["event_id"] for r in answer["rejected"]}
    assert by_index[1] == unknown["event_id"]
    assert by_index[3] is None
    assert (await backend.stats()).events == 3


async def test_missing_or_wrong_token_is_401(client: Client, backend: Backend) -> None:
    for headers in ({}, {"Authorization": "Bearer cst_agent_nope"}, {"Authorization": "Basic x"}):
        response = await post(client, headers, batch(1))
        assert response.status == 401
        assert response.headers["WWW-Authenticate"].startswith("Bearer")
        assert (await response.json())["error"] == "unauthorized"
    assert (await backend.stats()).events == 0


async def test_only_agents_upload(client: Client, tokens: Tokens) -> None:
    for headers in (await tokens.admin(), await tokens.partner("profiles:read")):
        response = await post(client, headers, batch(1))
        assert response.status == 403


async def test_refused_requests_are_4xx_and_write_nothing(
    client: Client, tokens: Tokens, backend: Backend
) -> None:
    headers = await tokens.agent()
    good = json.dumps(batch(2)).encode()
    cases: list[tuple[int, str, bytes, dict[str, str]]] = [
        (400, "malformed_json", b'[{"event_id": ', {}),
        (400, "malformed_json", b"\xff\xfe not utf-8", {}),
        (400, "malformed_json", json.dumps(batch(1)).encode("utf-16"), {}),
        (400, "bad_batch_shape", b'{"not_events": []}', {}),
        (400, "bad_gzip", b"not gzip at all", {"Content-Encoding": "gzip"}),
        (400, "bad_gzip", gzip.compress(good)[:-8], {"Content-Encoding": "gzip"}),
        (413, "too_many_events", json.dumps(batch(TEST_LIMITS.max_events + 1)).encode(), {}),
        (413, "body_too_large", b" " * (TEST_LIMITS.max_body_bytes + 10) + good, {}),
        (
            413,
            "body_too_large",
            gzip.compress(b" " * (TEST_LIMITS.max_decoded_bytes + 10) + good),
            {"Content-Encoding": "gzip"},
        ),
        (415, "unsupported_encoding", good, {"Content-Encoding": "br"}),
        (415, "unsupported_media_type", good, {"Content-Type": "text/plain"}),
    ]
    for status, reason, body, extra in cases:
        response = await post(client, headers, body, **extra)
        assert response.status == status, (reason, await response.text())
        assert (await response.json())["error"] == reason
    assert (await backend.stats()).events == 0


async def test_json_with_charset_is_accepted(client: Client, tokens: Tokens) -> None:
    headers = await tokens.agent()
    extra = {"Content-Type": "application/json; charset=utf-8"}
    response = await post(client, headers, batch(1), **extra)
    assert response.status == 200


async def test_health_and_openapi(client: Client) -> None:
    assert (await client.get("/healthz")).status == 200
    assert (await client.get("/readyz")).status == 200
    document = await (await client.get("/openapi.json")).json()
    assert document["openapi"].startswith("3.")
    assert "/v1/events" in document["paths"]


async def test_two_instances_ingesting_overlapping_batches_store_each_event_once(
    backend: Backend, db_url: str
) -> None:
    """A second backend (its own pool) stands for a second service instance."""
    other = await open_backend(db_url, pool_size=4)
    try:
        registry = default_registry()
        pieces = [Piece(envelope) for envelope in batch(400)]
        events = check_batch(pieces, "store-001", registry).rows
        chunks = [events[i : i + 100] for i in range(0, 400, 100)]
        now = datetime.now(UTC)
        # Every chunk goes to both instances at once, in opposite orders.
        counts = await asyncio.gather(
            *(backend.ingest(c, now) for c in chunks),
            *(other.ingest(c[::-1], now) for c in reversed(chunks)),
        )
    finally:
        await other.close()
    assert sum(c.accepted for c in counts) == 400
    assert sum(c.duplicates for c in counts) == 400
    assert (await backend.stats()).events == 400


async def test_chunked_body_over_the_limit_is_413(client: Client, tokens: Tokens) -> None:
    headers = await tokens.agent()

    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(8):  # no Content-Length: the limit must hold while reading
            yield b" " * (TEST_LIMITS.max_body_bytes // 4)

    response = await client.post("/v1/events", data=chunks(), headers={**JSON, **headers})
    assert response.status == 413
    assert (await response.json())["error"] == "body_too_large"


async def test_database_connections_lost_is_503_then_recovers(pg_url: str) -> None:
    backend = await open_backend(pg_url, pool_size=2)
    try:
        token = await auth.create_credential(backend, "agent", name="t", store_id="store-001")
        headers = {**JSON, "Authorization": f"Bearer {token}"}
        server = TestServer(create_app(backend, TEST_LIMITS))
        await server.start_server(**RUNNER_OPTIONS)
        async with TestClient(server) as client:
            assert (await post(client, headers, batch(5))).status == 200
            with psycopg.connect(pg_url, autocommit=True) as conn:
                conn.execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                    " WHERE datname = current_database() AND pid <> pg_backend_pid()"
                )
            statuses = []
            for _ in range(5):  # bounded: the pool replaces each broken connection once
                response = await post(client, headers, batch(5))
                statuses.append(response.status)
                if response.status == 200:
                    break
                assert response.status == 503
                assert response.headers["Retry-After"] == "1"
            assert statuses[0] == 503
            assert statuses[-1] == 200
    finally:
        await backend.close()
