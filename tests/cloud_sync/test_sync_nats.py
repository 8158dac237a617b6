"""The agent's NATS transport (``cloud_sync.sync_nats``) against a private nats-server, and
its config keys.

The envelopes go through the same upload rule as HTTP (a customer without profile sharing
leaves as a pseudonym); each is one message on ``edge.events.<store_id>`` with
``Nats-Msg-Id: <store_id>:<event_id>``; a resend is a JetStream duplicate; a hub that is not
there is a ``StoreUnavailableError`` (the uploader's retry), never a hang.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from pathlib import Path

import nats
import nats.aio.client
import pytest

from cloud_sync.store.nats_ingest import STREAM, IngestSettings, ensure_stream
from cloud_sync.sync_client import StoreUnavailableError
from cloud_sync.sync_nats import NatsEvents, connect_options, event_subject
from edge_agent.buffer.reads import PendingRow
from edge_agent.config import SyncSection, config_from_dict, load_config
from edge_agent.errors import ConfigError
from edge_agent.governance import PSEUDONYM_PREFIX, ConsentLedger
from tests.support.broker import free_port
from tests.support.nats import NatsNode, jetstream_ready, nats_server, wait_jetstream_ready

STORE = "store-n1"


@pytest.fixture
def server(tmp_path: Path) -> Iterator[NatsNode]:
    with nats_server(tmp_path / "nats") as node:
        wait_jetstream_ready(node.url)
        yield node


def row(seq: int, customer_id: str | None = "c-1") -> PendingRow:
    document = {
        "event_id": f"ev-{seq}",
        "type": "product.pickup",
        "ts": "2026-11-22T08:00:00.000Z",
        "store_id": STORE,
        "device_id": "shelf-1",
        "customer_id": customer_id,
        "source": f"mqtt:edge/{STORE}/devices/shelf-1/events",
        "schema": 1,
        "data": {"sku": "SKU-1"},
    }
    return PendingRow(seq, json.dumps(document, separators=(",", ":")), True, customer_id)


def settings(url: str, **overrides: object) -> SyncSection:
    options: dict[str, object] = {"timeout_s": 2.0, **overrides}
    return SyncSection(transport="nats", url=url, **options)  # type: ignore[arg-type]


async def test_published_governed_with_msg_id_and_a_resend_is_a_duplicate(
    server: NatsNode,
) -> None:
    nc = await nats.connect(server.url)
    try:
        js = nc.jetstream()
        await ensure_stream(js, IngestSettings(url=server.url))
        rows = [row(n) for n in range(10)]
        consent = ConsentLedger(require_consent=True)  # nobody has profile sharing
        async with NatsEvents(settings(server.url), STORE) as sink:
            first = await sink.post_rows(rows, consent, b"k" * 32, compress=True)
            again = await sink.post_rows(rows, consent, b"k" * 32, compress=True)
        assert (first.accepted, first.duplicates, first.rejected) == (10, 0, [])
        assert (again.accepted, again.duplicates) == (0, 10)
        info = await js.stream_info(STREAM)
        assert info.state.messages == 10
        for seq in range(1, 11):
            stored = await js.get_msg(STREAM, seq)
            assert stored.subject == event_subject("edge.events", STORE)
            envelope = json.loads(stored.data or b"")
            assert stored.headers is not None
            assert stored.headers["Nats-Msg-Id"] == f"{STORE}:{envelope['event_id']}"
            assert envelope["event_id"] == f"ev-{seq - 1}"  # the buffer's order
            assert envelope["customer_id"].startswith(PSEUDONYM_PREFIX)  # never in clear
    finally:
        await nc.close()


async def test_hub_absent_is_unavailable_within_the_timeout_then_ready(
    tmp_path: Path,
) -> None:
    node = NatsNode(tmp_path / "later", "later")
    sink = NatsEvents(settings(node.url), STORE)
    async with sink:
        started = time.monotonic()
        with pytest.raises(StoreUnavailableError):
            await sink.post_rows([row(1)], ConsentLedger(False), b"k" * 32, compress=False)
        assert time.monotonic() - started < 30  # bounded (the test's own guard, not a goal)
        assert not await sink.ready(1.0)
        node.start()
        try:
            await jetstream_ready(node.url)
            assert await sink.ready(2.0)
        finally:
            node.stop()


async def _listener(
    url: str, subject: str, count: int
) -> tuple[nats.aio.client.Client, asyncio.Event]:
    """A plain subscriber on ``subject`` (no stream): messages arrive, PubAcks never come,
    and there is a responder, so the publishes are not refused with "no responders"."""
    nc = await nats.connect(url, allow_reconnect=False)
    arrived = asyncio.Event()
    seen = 0

    async def on_message(_msg: object) -> None:
        nonlocal seen
        seen += 1
        if seen >= count:
            arrived.set()

    await nc.subscribe(subject, cb=on_message)
    await nc.flush()
    return nc, arrived


async def test_connection_lost_with_pubacks_due_fails_the_batch_at_once_then_resends(
    tmp_path: Path,
) -> None:
    """The server killed (-9) while a batch waits for its PubAcks: the batch fails because
    the connection dropped, not at its 30 s deadline; after the restart the same sink
    reconnects and the resend is stored, each event once."""
    node = NatsNode(tmp_path / "node", "node")
    node.start()
    try:
        await jetstream_ready(node.url)
        listener, arrived = await _listener(node.url, event_subject("edge.events", STORE), 20)
        rows = [row(n) for n in range(20)]
        async with NatsEvents(settings(node.url, timeout_s=30.0), STORE) as sink:
            send = asyncio.create_task(sink.post_rows(rows, ConsentLedger(False), b"k" * 32, False))
            await asyncio.wait_for(arrived.wait(), 10)  # all 20 written, their PubAcks due
            assert not send.done()
            await listener.close()
            node.kill()
            with pytest.raises(StoreUnavailableError, match="connection lost with 20 PubAcks"):
                await asyncio.wait_for(send, 25)  # (the test's guard, below the deadline)
            node.start()
            await jetstream_ready(node.url)
            nc = await nats.connect(node.url)
            try:
                await ensure_stream(nc.jetstream(), IngestSettings(url=node.url))
                result = None
                for _ in range(50):  # until the sink's own reconnect is through (bounded)
                    try:
                        result = await sink.post_rows(rows, ConsentLedger(False), b"k" * 32, False)
                        break
                    except StoreUnavailableError:
                        await asyncio.sleep(0.2)
                assert result is not None
                again = await sink.post_rows(rows, ConsentLedger(False), b"k" * 32, False)
                info = await nc.jetstream().stream_info(STREAM)
            finally:
                await nc.close()
        assert (result.accepted, result.duplicates) == (20, 0)
        assert (again.accepted, again.duplicates) == (0, 20)
        assert info.state.messages == 20
    finally:
        node.stop()


async def test_pubacks_that_never_come_end_at_the_batch_deadline(server: NatsNode) -> None:
    """No stream behind the subject and no disconnect: the batch ends at ``timeout_s``,
    unacknowledged, so the uploader keeps its rows; the sink still works afterwards."""
    listener, arrived = await _listener(server.url, event_subject("edge.events", STORE), 5)
    try:
        rows = [row(n) for n in range(5)]
        async with NatsEvents(settings(server.url, timeout_s=1.0), STORE) as sink:
            with pytest.raises(StoreUnavailableError, match="TimeoutError"):
                await asyncio.wait_for(
                    sink.post_rows(rows, ConsentLedger(False), b"k" * 32, False), 20
                )
            assert arrived.is_set()
            await listener.close()
            nc = await nats.connect(server.url)
            try:
                await ensure_stream(nc.jetstream(), IngestSettings(url=server.url))
            finally:
                await nc.close()
            result = await sink.post_rows(rows, ConsentLedger(False), b"k" * 32, False)
        assert (result.accepted, result.duplicates) == (5, 0)
    finally:
        if not listener.is_closed:
            await listener.close()


def test_config_nats_transport_keys(tmp_path: Path) -> None:
    base = {"agent": {"store_id": STORE, "data_dir": str(tmp_path)}}
    ok = config_from_dict({**base, "sync": {"transport": "nats", "url": "nats://127.0.0.1:4222"}})
    assert ok.sync.http_url == ""  # no downlink: no token needed
    with pytest.raises(ConfigError, match=r"sync\.transport"):
        config_from_dict({**base, "sync": {"transport": "kafka", "url": "nats://127.0.0.1:1"}})
    with pytest.raises(ConfigError, match=r"sync\.url"):
        config_from_dict({**base, "sync": {"transport": "nats", "url": "https://x.example"}})
    with pytest.raises(ConfigError, match=r"sync\.url"):  # plain NATS across the network
        config_from_dict({**base, "sync": {"transport": "nats", "url": "nats://hub.example:4222"}})
    tls = config_from_dict(
        {**base, "sync": {"transport": "nats", "url": "tls://hub.example:4222,tls://hub2:4222"}}
    )
    assert connect_options(tls.sync)["servers"] == ["tls://hub.example:4222", "tls://hub2:4222"]
    for dotted in ("store.a", "a.b.c", "store-*", "store>"):  # not one subject token
        with pytest.raises(ConfigError, match=r"agent\.store_id"):
            config_from_dict(
                {
                    "agent": {"store_id": dotted, "data_dir": str(tmp_path)},
                    "sync": {"transport": "nats", "url": "nats://127.0.0.1:4222"},
                }
            )
    dotted_http = {"store_id": "store.a", "data_dir": str(tmp_path)}  # fine over HTTP
    assert config_from_dict({"agent": dotted_http}).agent.store_id == "store.a"
    with pytest.raises(ConfigError, match=r"sync\.token"):  # a downlink needs the token
        config_from_dict(
            {
                **base,
                "sync": {
                    "transport": "nats",
                    "url": "nats://127.0.0.1:4222",
                    "downlink_url": "https://store.example",
                },
            }
        )


def test_nats_credentials_from_systemd(tmp_path: Path) -> None:
    config = tmp_path / "agent.toml"
    config.write_text(
        f'[agent]\nstore_id = "{STORE}"\ndata_dir = "{tmp_path}"\n'
        '[sync]\ntransport = "nats"\nurl = "nats://127.0.0.1:4222"\nnats_user = "store-n1"\n'
    )
    credentials = tmp_path / "credentials"
    credentials.mkdir()
    (credentials / "nats-password").write_text("secret\n")
    (credentials / "nats-creds").write_text("-----BEGIN NATS USER JWT-----\n")
    loaded = load_config(config, {"CREDENTIALS_DIRECTORY": str(credentials)})
    assert loaded.sync.nats_password == "secret"
    assert loaded.sync.nats_creds == str(credentials / "nats-creds")
    options = connect_options(loaded.sync)
    assert options["user_credentials"] == str(credentials / "nats-creds")  # creds win


async def test_through_a_store_leaf_node_without_jetstream(tmp_path: Path) -> None:
    """docs/operations.md's leaf node: PubAcks come from the hub's stream through the leaf."""
    leaf_port = free_port()
    hub = NatsNode(
        tmp_path / "hub",
        "hub",
        domain="hub",
        extra=f"leafnodes {{\n  listen: 127.0.0.1:{leaf_port}\n}}\n",
    )
    leaf = NatsNode(
        tmp_path / "leaf",
        "leaf",
        jetstream=False,
        extra=f'leafnodes {{\n  remotes = [ {{ urls: ["nats://127.0.0.1:{leaf_port}"] }} ]\n}}\n',
    )
    hub.start()
    try:
        await jetstream_ready(hub.url)
        leaf.start()
        nc = await nats.connect(hub.url)
        try:
            await ensure_stream(nc.jetstream(), IngestSettings(url=hub.url))
            async with NatsEvents(settings(leaf.url, nats_domain="hub"), STORE) as sink:
                for _ in range(100):  # until the leaf connection is up (bounded)
                    if await sink.ready(1.0):
                        break
                    await asyncio.sleep(0.1)
                assert await sink.ready(1.0)  # JetStream answers through the leaf
                result = await sink.post_rows(
                    [row(n) for n in range(5)], ConsentLedger(False), b"k" * 32, compress=False
                )
            assert (result.accepted, result.duplicates) == (5, 0)
            assert (await nc.jetstream().stream_info(STREAM)).state.messages == 5
        finally:
            await nc.close()
    finally:
        leaf.stop()
        hub.stop()
