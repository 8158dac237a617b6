"""``customer-store ingest``: JetStream pull consumers into the store (a real nats-server).

In-process workers against a private single server (R1), on SQLite and PostgreSQL: valid
envelopes are stored once, poison is terminated and counted (never redelivered), an
envelope naming another store than its subject is refused, and two workers sharing the one
durable consumer store every event exactly once.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import nats
import pytest
from cstore_helpers import envelope
from sync_helpers import store_event_ids

from cloud_sync.store.backend import Backend
from cloud_sync.store.nats_ingest import (
    DURABLE,
    STREAM,
    IngestSettings,
    IngestWorker,
    ensure_stream,
)
from tests.support.nats import NatsNode, nats_server, wait_jetstream_ready

BOUND_S = 30.0


@pytest.fixture
def server(tmp_path: Path) -> Iterator[NatsNode]:
    with nats_server(tmp_path / "nats") as node:
        wait_jetstream_ready(node.url)
        yield node


@pytest.fixture
async def js_client(server: NatsNode) -> AsyncIterator[nats.aio.client.Client]:
    nc = await nats.connect(server.url)
    try:
        yield nc
    finally:
        await nc.close()


async def publish(
    nc: nats.aio.client.Client, subject: str, payload: bytes, msg_id: str | None = None
) -> bool:
    """Publish to JetStream; return whether the PubAck says duplicate."""
    headers = {"Nats-Msg-Id": msg_id} if msg_id else None
    ack = await nc.jetstream().publish(subject, payload, headers=headers, timeout=5)
    return bool(ack.duplicate)


async def until(predicate: object, within: float = BOUND_S) -> None:
    deadline = time.monotonic() + within
    while not predicate():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise TimeoutError(f"not reached within {within}s")
        await asyncio.sleep(0.05)


async def consumer_idle(nc: nats.aio.client.Client) -> tuple[int, int]:
    info = await nc.jetstream().consumer_info(STREAM, DURABLE)
    return info.num_pending, info.num_ack_pending


async def test_valid_events_stored_poison_terminated_and_counted(
    server: NatsNode, js_client: nats.aio.client.Client, backend: Backend, db_url: str
) -> None:
    settings = IngestSettings(url=server.url, fetch_timeout_s=0.2)
    await ensure_stream(js_client.jetstream(), settings)
    good = [envelope(store_id="store-a", event_id=f"ev-{n}") for n in range(20)]
    for item in good:
        await publish(js_client, "edge.events.store-a", json.dumps(item).encode(), item["event_id"])
    # The same event again outside JetStream's de-dup (another msg id): the store de-dupes it.
    await publish(js_client, "edge.events.store-a", json.dumps(good[0]).encode(), "other-id")
    poison = {
        b"{not json": "malformed_json",
        b"\xff\xfe binary": "bad_unicode",
        json.dumps(envelope(store_id="store-b")).encode(): "store_mismatch",
        b'{"event_id": "x"}': "missing_field",
        b"1,2": "not_one_envelope",
    }
    for payload in poison:
        await publish(js_client, "edge.events.store-a", payload)
    worker = IngestWorker(settings, backend)
    task = asyncio.create_task(worker.run())
    try:
        await until(lambda: worker.stats.messages >= len(good) + len(poison) + 1)
        assert await consumer_idle(js_client) == (0, 0)
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    assert sorted(store_event_ids(db_url)) == sorted(item["event_id"] for item in good)
    assert worker.stats.accepted == len(good)
    assert worker.stats.duplicates == 1
    rejected = dict(worker.stats.rejected)
    assert sum(rejected.values()) == len(poison)
    assert rejected.get("store_mismatch") == 1
    assert rejected.get("malformed_json", 0) + rejected.get("bad_unicode", 0) >= 1
    # Terminated means gone for good: no redelivery loop, nothing left in the work queue.
    stream = await js_client.jetstream().stream_info(STREAM)
    assert stream.state.messages == 0


async def test_two_workers_share_one_consumer_each_event_once(
    server: NatsNode, js_client: nats.aio.client.Client, backend: Backend, db_url: str
) -> None:
    settings = IngestSettings(url=server.url, batch=25, fetch_timeout_s=0.2)
    await ensure_stream(js_client.jetstream(), settings)
    workers = [IngestWorker(settings, backend) for _ in range(2)]
    tasks = [asyncio.create_task(w.run()) for w in workers]
    total = 600
    try:
        js = js_client.jetstream()
        for n in range(total):
            item = envelope(store_id=f"store-{n % 3}", event_id=f"e-{n:05d}")
            await js.publish(
                f"edge.events.store-{n % 3}",
                json.dumps(item).encode(),
                headers={"Nats-Msg-Id": f"store-{n % 3}:e-{n:05d}"},
            )
        await until(lambda: sum(w.stats.messages for w in workers) >= total)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    ids = store_event_ids(db_url)
    assert len(ids) == total
    assert len(set(ids)) == total
    assert all(w.stats.messages > 0 for w in workers), [w.stats for w in workers]
    assert sum(w.stats.accepted for w in workers) == total


async def test_duplicate_msg_id_inside_the_window_is_dropped_by_jetstream(
    server: NatsNode, js_client: nats.aio.client.Client
) -> None:
    await ensure_stream(js_client.jetstream(), IngestSettings(url=server.url))
    payload = json.dumps(envelope(store_id="store-a", event_id="dup")).encode()
    assert not await publish(js_client, "edge.events.store-a", payload, "store-a:dup")
    assert await publish(js_client, "edge.events.store-a", payload, "store-a:dup")
    info = await js_client.jetstream().stream_info(STREAM)
    assert info.state.messages == 1
    assert info.config.num_replicas == 1  # a single server: R1
