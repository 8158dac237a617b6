"""``customer-store ingest``: JetStream pull consumers into the store (a real nats-server).

In-process workers against a private single server (R1) whose config maps ``edge.events.*``
to four shard streams, on SQLite and PostgreSQL: valid envelopes are stored once, poison is
terminated and counted (never redelivered), an envelope naming another store than its
subject is refused, and two workers sharing the durable consumers store every event exactly
once. Sharding: the server's partition agrees with ``shard_of`` for many stores, a pinned
worker drains only its shard, workers racing to create the streams all start, a hub whose
mapping disagrees with ``--shards`` is refused (in process and by the CLI, exit 2), and a hub
moving from one stream to shards, or from 4 shards to 2, loses nothing. Reading a fetched
batch (msgspec for the common case) gives every message the piece, or the refusal, that the
HTTP ingest's reader gives it: on hostile and generated messages, and through a real worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sqlite3
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from itertools import zip_longest
from pathlib import Path

import nats
import nats.aio.client
import nats.errors
import psycopg
import pytest
from cstore_helpers import envelope
from hypothesis import given, settings
from hypothesis import strategies as st
from sync_helpers import store_event_ids

from benchmarks.local_broker import free_port
from cloud_sync.envelope_schema import default_registry
from cloud_sync.store.backend import Backend
from cloud_sync.store.errors import BadRequestError
from cloud_sync.store.ingest import Limits, Piece, check_batch, decode_body
from cloud_sync.store.nats_envelopes import read_batch, read_envelope, store_of_subject
from cloud_sync.store.nats_ingest import (
    DURABLE,
    STREAM,
    IngestSettings,
    IngestWorker,
    ShardLayoutError,
    prepare,
)
from cloud_sync.store.nats_shards import PROBES, server_mapping, shard_of, shard_stream
from tests.support.nats import (
    NatsNode,
    jetstream_ready,
    nats_server,
    shard_mapping,
    wait_jetstream_ready,
)

BOUND_S = 30.0
SHARDS = 4


@pytest.fixture
def server(tmp_path: Path) -> Iterator[NatsNode]:
    with nats_server(tmp_path / "nats", shards=SHARDS) as node:
        wait_jetstream_ready(node.url)
        yield node


@pytest.fixture
async def js_client(server: NatsNode) -> AsyncIterator[nats.aio.client.Client]:
    nc = await nats.connect(server.url)
    try:
        yield nc
    finally:
        await nc.close()


def stream_of(store_id: str, shards: int = SHARDS) -> str:
    return shard_stream(STREAM, shard_of(store_id, shards))


async def publish(
    nc: nats.aio.client.Client, subject: str, payload: bytes, msg_id: str | None = None
) -> bool:
    """Publish to JetStream; return whether the PubAck says duplicate."""
    headers = {"Nats-Msg-Id": msg_id} if msg_id else None
    ack = await nc.jetstream().publish(subject, payload, headers=headers, timeout=5)
    return bool(ack.duplicate)


async def publish_events(nc: nats.aio.client.Client, events: list[dict[str, str]]) -> list[str]:
    """Publish envelopes as their stores' agents do; return the stream of each PubAck."""
    js = nc.jetstream()
    streams = []
    for item in events:
        ack = await js.publish(
            f"edge.events.{item['store_id']}",
            json.dumps(item).encode(),
            headers={"Nats-Msg-Id": f"{item['store_id']}:{item['event_id']}"},
            timeout=5,
        )
        streams.append(ack.stream)
    return streams


async def until(predicate: Callable[[], bool], within: float = BOUND_S) -> None:
    deadline = time.monotonic() + within
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"not reached within {within}s")
        await asyncio.sleep(0.05)


async def consumer_idle(nc: nats.aio.client.Client, stream: str) -> tuple[int, int]:
    info = await nc.jetstream().consumer_info(stream, DURABLE)
    return info.num_pending, info.num_ack_pending


async def stream_messages(nc: nats.aio.client.Client, stream: str) -> int:
    return int((await nc.jetstream().stream_info(stream)).state.messages)


async def stop(*tasks: asyncio.Task[None]) -> None:
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


async def test_valid_events_stored_poison_terminated_and_counted(
    server: NatsNode, js_client: nats.aio.client.Client, backend: Backend, db_url: str
) -> None:
    settings = IngestSettings(url=server.url, fetch_timeout_s=0.2)
    good = [envelope(store_id="store-a", event_id=f"ev-{n}") for n in range(20)]
    worker = IngestWorker(settings, backend)
    ready = asyncio.Event()
    task = asyncio.create_task(worker.run(ready))
    try:
        await asyncio.wait_for(ready.wait(), BOUND_S)
        for item in good:
            await publish(
                js_client, "edge.events.store-a", json.dumps(item).encode(), item["event_id"]
            )
        # The same event again outside JetStream's de-dup (another msg id): the store de-dupes.
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
        await until(lambda: worker.stats.messages >= len(good) + len(poison) + 1)
        assert await consumer_idle(js_client, stream_of("store-a")) == (0, 0)
    finally:
        await stop(task)
    assert sorted(store_event_ids(db_url)) == sorted(item["event_id"] for item in good)
    assert worker.stats.accepted == len(good)
    assert worker.stats.duplicates == 1
    assert worker.stats.probes == PROBES  # its own layout check, acknowledged, not stored
    rejected = dict(worker.stats.rejected)
    assert sum(rejected.values()) == len(poison)
    assert rejected.get("store_mismatch") == 1
    assert rejected.get("malformed_json", 0) + rejected.get("bad_unicode", 0) >= 1
    # Terminated means gone for good: no redelivery loop, nothing left in any work queue.
    for shard in range(SHARDS):
        assert await stream_messages(js_client, shard_stream(STREAM, shard)) == 0


async def test_the_servers_partition_is_shard_of_for_many_stores(
    server: NatsNode, js_client: nats.aio.client.Client
) -> None:
    """Each store's events land in the stream ``shard_of`` names, and every shard gets some."""
    await prepare(js_client.jetstream(), IngestSettings(url=server.url))
    events = [envelope(store_id=f"store-{n:04d}", event_id=f"e{n}") for n in range(300)]
    streams = await publish_events(js_client, events)
    assert streams == [stream_of(item["store_id"]) for item in events]
    per_stream = {name: streams.count(name) for name in set(streams)}
    assert len(per_stream) == SHARDS, per_stream
    assert min(per_stream.values()) > 30, per_stream
    for name, count in per_stream.items():  # plus the 32 probes, not yet drained
        probes = sum(stream_of(f"_shardprobe-{i}") == name for i in range(PROBES))
        assert await stream_messages(js_client, name) == count + probes


async def test_two_workers_share_the_consumers_each_event_once(
    server: NatsNode, js_client: nats.aio.client.Client, backend: Backend, db_url: str
) -> None:
    settings = IngestSettings(url=server.url, batch=25, fetch_timeout_s=0.2)
    workers = [IngestWorker(settings, backend) for _ in range(2)]
    readies = [asyncio.Event() for _ in workers]
    tasks = [asyncio.create_task(w.run(r)) for w, r in zip(workers, readies, strict=True)]
    total = 600
    try:
        await asyncio.wait_for(asyncio.gather(*(r.wait() for r in readies)), BOUND_S)
        events = [envelope(store_id=f"store-{n % 7}", event_id=f"e-{n:05d}") for n in range(total)]
        await publish_events(js_client, events)
        await until(lambda: sum(w.stats.messages for w in workers) >= total)
    finally:
        await stop(*tasks)
    ids = store_event_ids(db_url)
    assert len(ids) == total
    assert len(set(ids)) == total
    assert all(w.stats.messages > 0 for w in workers), [w.stats for w in workers]
    assert sum(w.stats.accepted for w in workers) == total
    drained = sum((w.stats.by_stream for w in workers), start=type(workers[0].stats.by_stream)())
    assert set(drained) == {stream_of(f"store-{n}") for n in range(7)}


async def test_a_pinned_worker_drains_only_its_shard(
    server: NatsNode, js_client: nats.aio.client.Client, backend: Backend, db_url: str
) -> None:
    events = [envelope(store_id=f"s-{n % 40}", event_id=f"p-{n:04d}") for n in range(400)]
    pinned = 1
    mine = [item for item in events if shard_of(item["store_id"], SHARDS) == pinned]
    assert 0 < len(mine) < len(events)
    worker = IngestWorker(IngestSettings(url=server.url, pinned=(pinned,)), backend)
    task = asyncio.create_task(worker.run())
    try:
        await until(lambda: worker.stats.probes > 0)  # subscribed, its share of probes taken
        await publish_events(js_client, events)
        await until(lambda: worker.stats.messages >= len(mine))
        await asyncio.sleep(1.0)  # room for a wrong extra fetch to show up
    finally:
        await stop(task)
    assert worker.streams == [shard_stream(STREAM, pinned)]
    assert sorted(store_event_ids(db_url)) == sorted(item["event_id"] for item in mine)
    assert worker.stats.messages == len(mine)
    for shard in range(SHARDS):
        left = await stream_messages(js_client, shard_stream(STREAM, shard))
        others = sum(shard_of(item["store_id"], SHARDS) == shard for item in events)
        probes = sum(shard_of(f"_shardprobe-{i}", SHARDS) == shard for i in range(PROBES))
        assert left == (0 if shard == pinned else others + probes), shard


async def test_workers_starting_together_create_the_streams_once(server: NatsNode) -> None:
    settings = IngestSettings(url=server.url)
    clients = [await nats.connect(server.url) for _ in range(6)]
    try:
        results = await asyncio.gather(*(prepare(nc.jetstream(), settings) for nc in clients))
        assert [replicas for replicas, _ in results] == [1] * 6
        names = sorted(str(s.config.name) for s in await clients[0].jetstream().streams_info())
        assert names == [shard_stream(STREAM, k) for k in range(SHARDS)]
    finally:
        for nc in clients:
            await nc.close()


@pytest.mark.parametrize("shards", [8, 2, 0])
async def test_a_worker_whose_shards_disagree_with_the_mapping_is_refused(
    server: NatsNode, backend: Backend, shards: int
) -> None:
    worker = IngestWorker(IngestSettings(url=server.url, shards=shards), backend)
    with pytest.raises(ShardLayoutError, match=r"mapping|no stream took") as refused:
        await asyncio.wait_for(worker.run(), BOUND_S)
    assert f"--shards {shards}" in str(refused.value)
    assert worker.stats.messages == 0


async def test_a_sharded_worker_on_a_server_without_mapping_is_refused(
    tmp_path: Path, backend: Backend
) -> None:
    with nats_server(tmp_path / "plain") as node:
        await jetstream_ready(node.url)
        worker = IngestWorker(IngestSettings(url=node.url, shards=SHARDS), backend)
        with pytest.raises(ShardLayoutError, match=r"no stream took edge\.events\._shardprobe-"):
            await asyncio.wait_for(worker.run(), BOUND_S)


def test_pinning_a_shard_the_hub_does_not_have_is_refused() -> None:
    with pytest.raises(ShardLayoutError, match="--shard 4: the hub has 4 shards"):
        IngestSettings(url="nats://127.0.0.1:1", shards=4, pinned=(4,))


def test_the_cli_refuses_a_mismatch_with_exit_2(server: NatsNode, tmp_path: Path) -> None:
    command = [sys.executable, "-m", "cloud_sync.store", "ingest", "--from", server.url]
    command += ["--db", f"sqlite:///{tmp_path / 'store.db'}", "--shards", "8"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stdout == ""  # never said "ingesting"
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("customer-store: error: this worker runs --shards 8, but "), last


async def test_duplicate_msg_id_inside_the_window_is_dropped_per_shard(
    server: NatsNode, js_client: nats.aio.client.Client
) -> None:
    await prepare(js_client.jetstream(), IngestSettings(url=server.url))
    payload = json.dumps(envelope(store_id="store-a", event_id="dup")).encode()
    assert not await publish(js_client, "edge.events.store-a", payload, "store-a:dup")
    assert await publish(js_client, "edge.events.store-a", payload, "store-a:dup")
    info = await js_client.jetstream().stream_info(stream_of("store-a"))
    probes = sum(stream_of(f"_shardprobe-{i}") == stream_of("store-a") for i in range(PROBES))
    assert info.state.messages == 1 + probes
    assert info.config.num_replicas == 1  # a single server: R1


async def test_from_one_stream_to_4_shards_to_2_events_waiting_in_old_streams_kept(
    tmp_path: Path, backend: Backend, db_url: str
) -> None:
    """The resharding procedure of docs/scaling.md on one server: events still waiting in
    the old layouts' streams (the unsharded one, shards 2 and 3 of four) are drained by a
    worker of the new layout, beside the events the new mapping sends to its shards."""
    node = NatsNode(tmp_path / "hub", "hub")
    node.start()
    expected: list[str] = []
    try:
        for shards in (0, 4, 2):  # a restart with the new mapping (or nats-server --signal reload)
            if shards:
                node.stop()
                node.extra = shard_mapping(shards)
                node.write_config([])
                node.start()
            await jetstream_ready(node.url)
            nc = await nats.connect(node.url)
            try:
                await prepare(nc.jetstream(), IngestSettings(url=node.url, shards=shards))
                batch = [
                    envelope(store_id=f"r-{n % 9}", event_id=f"l{shards}-{n}") for n in range(90)
                ]
                want = [stream_of(item["store_id"], shards) if shards else STREAM for item in batch]
                assert await publish_events(nc, batch) == want
                expected += [item["event_id"] for item in batch]
            finally:
                await nc.close()
        nc = await nats.connect(node.url)
        try:
            waiting = [shard_stream(STREAM, 2), shard_stream(STREAM, 3), STREAM]
            assert all([await stream_messages(nc, name) > 0 for name in waiting])
            worker = IngestWorker(IngestSettings(url=node.url, shards=2), backend)
            task = asyncio.create_task(worker.run())
            try:
                await until(lambda: len(store_event_ids(db_url)) >= len(expected))
                # Stored is not yet acknowledged: the ack follows the commit, so stopping the
                # worker now could leave a batch to be redelivered (and skipped as duplicates).
                deadline = time.monotonic() + BOUND_S
                while not all([await consumer_idle(nc, name) == (0, 0) for name in worker.streams]):
                    assert time.monotonic() < deadline, "acknowledgements still pending"
                    await asyncio.sleep(0.05)
            finally:
                await stop(task)
            assert set(waiting) <= set(worker.streams), worker.streams
            for name in worker.streams:
                assert await consumer_idle(nc, name) == (0, 0), name
                assert await stream_messages(nc, name) == 0, name
        finally:
            await nc.close()
        ids = store_event_ids(db_url)
        assert sorted(ids) == sorted(expected)
        assert worker.stats.accepted == len(expected)
    finally:
        node.stop()


async def test_a_store_leaf_node_needs_no_mapping_and_stays_confined(
    tmp_path: Path, backend: Backend, db_url: str
) -> None:
    """The mapping lives on the hub only: a leaf node without JetStream or mapping forwards
    edge.events.store-001 and the hub maps it into store-001's shard; the leaf's user may not
    bring in another store's events, before or after the mapping."""
    leaf_port = free_port()
    store_only = '["edge.events.store-001", "edge.shard.*.store-001", "$JS.hub.API.>", "_INBOX.>"]'
    hub = NatsNode(
        tmp_path / "hub",
        "hub",
        domain="hub",
        extra=(
            f"leafnodes {{\n  listen: 127.0.0.1:{leaf_port}\n}}\n"
            "accounts {\n  EDGE {\n    jetstream: enabled\n"
            + server_mapping(SHARDS)
            + "    users: [\n      { user: ingest, password: ig }\n"
            "      { user: leaf-001, password: l1, permissions: {\n"
            f"          publish: {store_only}\n"
            '          subscribe: ["_INBOX.>", "$JS.hub.API.>"] } }\n    ]\n  }\n}\n'
        ),
    )
    leaf = NatsNode(
        tmp_path / "leaf",
        "leaf",
        jetstream=False,
        extra=(
            "leafnodes {\n  remotes = [ { urls: "
            f'["nats://leaf-001:l1@127.0.0.1:{leaf_port}"] }} ]\n}}\n'
        ),
    )
    hub.start()
    task: asyncio.Task[None] | None = None
    try:
        hub_url = f"nats://ingest:ig@127.0.0.1:{hub.port}"
        await jetstream_ready(hub_url)
        leaf.start()
        worker = IngestWorker(
            IngestSettings(url=hub.url, user="ingest", password="ig", fetch_timeout_s=0.3),
            backend,
        )
        ready = asyncio.Event()
        task = asyncio.create_task(worker.run(ready))
        await asyncio.wait_for(ready.wait(), BOUND_S)
        nc = await nats.connect(leaf.url)  # a store-side client: no credentials at the leaf
        try:
            js = nc.jetstream(domain="hub", timeout=2)
            item = envelope(store_id="store-001", event_id="via-leaf")
            deadline = time.monotonic() + BOUND_S
            while True:  # until the leaf connection is up (bounded)
                try:
                    ack = await js.publish("edge.events.store-001", json.dumps(item).encode())
                    break
                except nats.errors.Error:
                    if time.monotonic() > deadline:
                        raise
                    await asyncio.sleep(0.2)
            assert ack.stream == stream_of("store-001")
            forged = json.dumps(envelope(store_id="store-002", event_id="forged")).encode()
            for subject in ("edge.events.store-002", "edge.shard.1.store-002"):
                with pytest.raises(nats.errors.Error):
                    await js.publish(subject, forged)
        finally:
            await nc.close()
        await until(lambda: worker.stats.accepted >= 1)
        await asyncio.sleep(1.0)  # room for a forged event, were it let through
    finally:
        if task is not None:
            await stop(task)
        leaf.stop()
        hub.stop()
    assert store_event_ids(db_url) == ["via-leaf"]


LIMITS = Limits()


def read_as_http(data: bytes, limits: Limits = LIMITS) -> Piece:
    """The reference: the HTTP ingest's reader on a one-element array (the workers' old way)."""
    try:
        items = decode_body(b"[" + data + b"]", None, limits).items
    except BadRequestError as exc:
        return Piece(refused=exc.reason)
    except ValueError:
        return Piece(refused="malformed_json")
    return items[0] if len(items) == 1 else Piece(refused="not_one_envelope")


def nested(depth: int) -> bytes:
    return b'{"a":' * (depth - 1) + b"{}" + b"}" * (depth - 1)


VALID = json.dumps(envelope(store_id="store-a", event_id="ok")).encode()
HOSTILE = [
    VALID,
    b"  " + VALID + b"\n",
    b"{not json",
    b"",
    b" ",
    b"1,2",
    b"1],[2",
    b"]",
    b"[",
    b'{"a":1}{"b":2}',
    b'{"a": NaN}',
    b'{"a": -Infinity}',
    b'{"a": 1e400}',
    b'{"a": 1e-400}',
    b'{"a": 9223372036854775808}',
    b'{"a": 123456789012345678}',
    b'{"a": ' + b"7" * 5000 + b"}",
    b'{"a": "\\ud800"}',
    b'{"a": "\\u0000"}',
    b'{"\\uD83D\\uDE00": "\\ud83d\\ude00"}',
    b'{"a": "\xff"}',
    b'{"a": "\xed\xa0\x80"}',
    b"\xef\xbb\xbf{}",
    b'{"a": "\x01"}',
    b'{"a": 1, "a": 2}',
    b'{"a": 01}',
    b'{"a": [1, 2,]}',
    nested(LIMITS.max_depth),
    nested(LIMITS.max_depth + 1),
    b'{"a": "' + b"[" * 40 + b'"}',  # brackets inside a string: not nesting
    b'{"a": "' + b"x" * LIMITS.max_envelope_bytes + b'"}',
    b'{"a": "' + b"x" * (LIMITS.max_envelope_bytes - 10) + b'"}',
    b"null",
    b'"just a string"',
    b"[]",
]


def assert_read_alike(data: bytes) -> None:
    fast, reference = read_envelope(data, LIMITS), read_as_http(data)
    assert fast.refused == reference.refused, data[:200]
    assert fast.value == reference.value, data[:200]
    assert type(fast.value) is type(reference.value), data[:200]
    if fast.refused is None:
        assert fast.risky == reference.risky, data[:200]


@pytest.mark.parametrize("data", HOSTILE, ids=range(len(HOSTILE)))
def test_a_message_reads_as_the_http_ingest_reads_it(data: bytes) -> None:
    assert_read_alike(data)


JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=30,
)


@settings(max_examples=300, deadline=None)
@given(value=JSON_VALUES, ascii_only=st.booleans(), spaced=st.booleans())
def test_generated_json_reads_alike(value: object, ascii_only: bool, spaced: bool) -> None:
    text = json.dumps(value, ensure_ascii=ascii_only, indent=1 if spaced else None)
    assert_read_alike(text.encode("utf-8"))


@settings(max_examples=300, deadline=None)
@given(cut=st.integers(min_value=0, max_value=len(VALID)), junk=st.binary(max_size=6))
def test_damaged_envelopes_read_alike(cut: int, junk: bytes) -> None:
    assert_read_alike(VALID[:cut] + junk + VALID[cut:])
    assert_read_alike(VALID[:cut] + junk)


def test_the_store_id_comes_from_the_subject_only() -> None:
    def of(subject: str) -> str:
        return store_of_subject(subject, "edge.events", "edge.shard")

    assert of("edge.shard.3.store-7") == "store-7"
    assert of("edge.events.store-7") == "store-7"
    assert of("edge.shard.x.store-7") == ""  # not a shard number
    assert of("edge.shard.3.a.b") == ""  # a store id is one token
    assert of("edge.shard.3") == ""
    assert of("other.store-7") == ""

    class Msg:
        def __init__(self, subject: str, data: bytes) -> None:
            self.subject, self.data = subject, data

    read = read_batch(
        [Msg("edge.shard.1.s-1", VALID), Msg("nowhere", VALID), Msg("edge.events.s-2", b"{")],
        "edge.events",
        "edge.shard",
        LIMITS,
    )
    assert [store for store, _ in read] == ["s-1", "", "s-2"]
    assert [piece.refused for _, piece in read] == [None, "bad_subject", "malformed_json"]
    assert read[0][1].value == json.loads(VALID)


async def test_a_mixed_batch_refuses_each_message_for_the_http_ingests_reason(
    server: NatsNode, js_client: nats.aio.client.Client, backend: Backend, db_url: str
) -> None:
    """Valid and hostile messages interleaved in fetched batches: the valid ones stored, each
    hostile one terminated and counted under the reason the HTTP ingest gives it."""
    store = "store-a"
    good = [envelope(store_id=store, event_id=f"mix-{n}") for n in range(30)]
    hostile = [data for data in HOSTILE if data.strip() != VALID]
    big = envelope(store_id=store, event_id="big-int", data={"sku": "S-1", "weight_g": 2**64})
    hostile.append(json.dumps(big).encode())
    hostile.append(json.dumps(envelope(store_id="store-b", event_id="theirs")).encode())
    expected: dict[str, int] = {}
    for data in hostile:
        checked = check_batch([read_as_http(data)], store, default_registry())
        assert not checked.rows, data[:100]  # every one of them is refused by HTTP too
        reason = str(checked.rejected[0]["reason"])
        expected[reason] = expected.get(reason, 0) + 1
    payloads = [json.dumps(item).encode() for item in good]
    mixed = [p for pair in zip_longest(payloads, hostile) for p in pair if p is not None]
    assert len(mixed) == len(good) + len(hostile)
    worker = IngestWorker(IngestSettings(url=server.url, batch=16, fetch_timeout_s=0.2), backend)
    ready = asyncio.Event()
    task = asyncio.create_task(worker.run(ready))
    try:
        await asyncio.wait_for(ready.wait(), BOUND_S)
        for number, payload in enumerate(mixed):
            await publish(js_client, f"edge.events.{store}", payload, f"m-{number}")
        await until(lambda: worker.stats.messages >= len(mixed))
        assert await consumer_idle(js_client, stream_of(store)) == (0, 0)
    finally:
        await stop(task)
    assert sorted(store_event_ids(db_url)) == sorted(item["event_id"] for item in good)
    assert dict(worker.stats.rejected) == expected
    assert worker.stats.batches >= 2  # more than one fetched batch went through
    assert await stream_messages(js_client, stream_of(store)) == 0


def rename_events_table(db_url: str, old: str, new: str) -> None:
    """Make the store's writes fail (its events table gone) or work again, from outside."""
    statement = f"ALTER TABLE {old} RENAME TO {new}"
    if db_url.startswith("sqlite://"):
        path = db_url.removeprefix("sqlite://")
        with contextlib.closing(sqlite3.connect(path, timeout=10)) as db:
            db.execute(statement)
            db.commit()
        return
    with psycopg.connect(db_url) as conn:
        conn.execute(statement)


async def test_a_database_down_longer_than_max_deliver_tries_loses_nothing(
    server: NatsNode, js_client: nats.aio.client.Client, backend: Backend, db_url: str
) -> None:
    """JetStream stops delivering a message after max_deliver tries: a worker that handed
    its batch back (nak) at each database failure left acknowledged events in the stream,
    never to be stored, once the database was away longer than those tries. The worker
    keeps the batch and retries until the database takes it."""
    settings = IngestSettings(
        url=server.url, fetch_timeout_s=0.2, max_deliver=3, retry_delay_s=0.1, ack_wait_s=5
    )
    events = [envelope(store_id="store-a", event_id=f"down-{n}") for n in range(10)]
    worker = IngestWorker(settings, backend)
    ready = asyncio.Event()
    task = asyncio.create_task(worker.run(ready))
    try:
        await asyncio.wait_for(ready.wait(), BOUND_S)
        rename_events_table(db_url, "events", "events_away")
        try:
            await publish_events(js_client, events)
            await until(lambda: worker.stats.failures > 0)
            # Away far longer than max_deliver handings-back take (3 x 0.1 s): a worker that
            # naks has every event delivered max_deliver times meanwhile, then never again.
            await asyncio.sleep(3.0)
        finally:
            rename_events_table(db_url, "events_away", "events")
        await until(lambda: len(store_event_ids(db_url)) >= len(events))
        assert await consumer_idle(js_client, stream_of("store-a")) == (0, 0)
    finally:
        await stop(task)
    assert sorted(store_event_ids(db_url)) == sorted(item["event_id"] for item in events)
    assert worker.stats.accepted == len(events)
