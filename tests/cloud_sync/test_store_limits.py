"""Bounded memory at the store: hostile bodies against a real store process, unstorable values
and per-credential concurrency against the app, on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import gzip
import json
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestClient, TestServer
from conftest import TEST_LIMITS, Tokens
from cstore_helpers import batch, envelope
from sync_helpers import StoreProcess

from cloud_sync.store.app import SLOTS, create_app
from cloud_sync.store.backend import Backend
from cloud_sync.store.ingest import Limits
from cloud_sync.store.server import RUNNER_OPTIONS

Client = TestClient[Any, Any]
JSON = {"Content-Type": "application/json"}
# Loose on purpose: the old store grew past 1.7 GB on the same body; the bounded one stays
# near its resting size (measured figures are in the store's README).
MAX_PEAK_RSS_KB = 300 * 1024


def hostile_event(nested_bytes: int) -> bytes:
    """One envelope whose data holds ``nested_bytes`` of empty arrays: ``[[],[],...]``."""
    fields = envelope()
    del fields["data"], fields["received_at"]
    head = json.dumps(fields)[:-1].encode()  # open: data follows
    return head + b', "data": {"sku": "SKU-1", "junk": [' + b"[]," * (nested_bytes // 3) + b"[]]}}"


def peak_rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError("no VmHWM in /proc/PID/status")


def create_token(db_url: str) -> str:
    command = [sys.executable, "-m", "cloud_sync.store", "token", "create", "--db", db_url]
    done = subprocess.run(
        [*command, "--store", "store-001"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return done.stdout.strip().splitlines()[-1]


@pytest.mark.parametrize("backend_name", ["sqlite", "postgres"])
async def test_gzip_bomb_of_nested_arrays_is_refused_and_memory_stays_bounded(
    backend_name: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    db_url = str(request.getfixturevalue("sqlite_url" if backend_name == "sqlite" else "pg_url"))
    token = await asyncio.to_thread(create_token, db_url)
    # The reported body: 62 KiB of gzip inflating to 63 MiB of nested empty arrays.
    bomb = gzip.compress(b"[" + hostile_event(63 * 1024 * 1024) + b"]", 9)
    # Under the decoded limit (8 MiB), one envelope far over the envelope limit, beside a good one.
    big = b"[" + hostile_event(6 * 1024 * 1024) + b"," + json.dumps(batch(1)[0]).encode() + b"]"
    store = StoreProcess(db_url, tmp_path / "store.log")
    await asyncio.to_thread(store.start)
    try:
        assert store.proc is not None
        headers = {**JSON, "Authorization": f"Bearer {token}", "Content-Encoding": "gzip"}
        timeout = aiohttp.ClientTimeout(total=120)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            url = f"{store.url}/v1/events"
            async with session.post(url, data=bomb, headers=headers) as response:
                assert response.status == 413
                assert (await response.json())["error"] == "body_too_large"
            async with session.post(url, data=gzip.compress(big), headers=headers) as response:
                assert response.status == 200
                answer = await response.json()
            assert answer["accepted"] == 1, answer
            assert answer["rejected"] == [
                {"index": 0, "event_id": None, "reason": "envelope_too_large"}
            ]
            async with session.get(f"{store.url}/healthz") as response:
                assert response.status == 200
        assert store.proc.poll() is None
        assert peak_rss_kb(store.proc.pid) < MAX_PEAK_RSS_KB
    finally:
        await asyncio.to_thread(store.stop)


async def post(client: Client, headers: dict[str, str], items: list[Any] | bytes) -> Any:
    body = items if isinstance(items, bytes) else json.dumps(items).encode()
    return await client.post("/v1/events", data=body, headers={**JSON, **headers})


async def test_unstorable_values_are_rejected_one_by_one(
    client: Client, tokens: Tokens, backend: Backend
) -> None:
    headers = await tokens.agent()
    good = batch(2)
    far_future = {**envelope(), "ts": "9999-12-31T23:59:59-01:00"}  # overflows once in UTC
    dated_2099 = {**envelope(), "ts": "2099-01-01T00:00:00Z"}
    before_1970 = {**envelope(), "ts": "0001-01-01T00:00:00+01:00"}
    long_source = {**envelope(), "source": "s" * 5000}
    long_text = envelope(data={"sku": "x" * 5000})
    deep = envelope(data={"sku": "S", "junk": json.loads("[" * 40 + "]" * 40)})
    items = [good[0], far_future, dated_2099, before_1970, long_source, long_text, deep]
    body = json.dumps(items).encode()[:-1]
    # Values json.dumps will not write: 1e400 (infinite once parsed), NaN, a lone surrogate,
    # an integer no database column of ours holds, and bytes that are not UTF-8.
    extras = [
        b'{"sku": "S", "weight_g": 1e400}',
        b'{"sku": "S", "weight_g": NaN}',
        b'{"sku": "\\udc00"}',
        b'{"sku": "S", "n": 18446744073709551616}',
        b'{"sku": "\xff\xfe"}',
    ]
    for data in extras:
        text = json.dumps(envelope(data={"sku": "PLACEHOLDER"})).encode()
        body += b", " + text.replace(b'{"sku": "PLACEHOLDER"}', data)
    body += b", " + json.dumps(good[1]).encode() + b"]"
    response = await post(client, headers, body)
    assert response.status == 200
    answer = await response.json()
    assert answer["accepted"] == 2
    assert [r["reason"] for r in answer["rejected"]] == [
        "bad_ts",
        "ts_in_future",
        "bad_ts",
        "field_too_long",
        "field_too_long",
        "too_deep",
        "unstorable_number",
        "malformed_json",
        "bad_unicode",
        "unstorable_number",
        "bad_unicode",
    ]
    assert (await backend.stats()).events == 2


async def test_each_credential_has_a_bounded_number_of_ingests_at_once(
    backend: Backend, tokens: Tokens
) -> None:
    limits = Limits(
        max_body_bytes=TEST_LIMITS.max_body_bytes,
        max_decoded_bytes=TEST_LIMITS.max_decoded_bytes,
        max_events=TEST_LIMITS.max_events,
        max_concurrent_ingests=1,
    )
    server = TestServer(create_app(backend, limits))
    await server.start_server(**RUNNER_OPTIONS)
    slow, other = await tokens.agent(), await tokens.agent("store-002")
    release = asyncio.Event()

    async def held_body() -> AsyncIterator[bytes]:
        yield b"["
        await release.wait()  # the handler holds its slot while it reads the body
        yield json.dumps(batch(1)[0]).encode() + b"]"

    async with TestClient(server) as client:
        first = asyncio.create_task(
            client.post("/v1/events", data=held_body(), headers={**JSON, **slow})
        )
        slots = server.app[SLOTS]
        for _ in range(500):  # bounded: until the held request's handler has its slot
            if slots.in_progress() == 1:
                break
            await asyncio.sleep(0.01)
        response = await post(client, slow, [])
        assert response.status == 429
        assert response.headers["Retry-After"] == "1"
        assert (await response.json())["error"] == "too_many_concurrent_ingests"
        assert (await post(client, other, batch(1, store_id="store-002"))).status == 200
        release.set()
        assert (await first).status == 200
        assert (await post(client, slow, [])).status == 200  # the slot was given back
    assert (await backend.stats()).events == 2
