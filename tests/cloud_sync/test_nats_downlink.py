"""Erasures and model announcements over NATS: store announcer → real nats-server → agent.

Both store backends (SQLite file, PostgreSQL); the store's real HTTP app on loopback for the
agent's reports and model downloads; a real buffer file at the agent. The notices are
checked against what the HTTP endpoints answer the same token, and attacked: garbled bytes,
a forger's notice, another store's notice replayed, the agent stopped and restarted, the
NATS server killed with -9.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import sqlite3
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import nats
import psycopg
import pytest
from aiohttp.test_utils import TestClient
from conftest import Tokens
from hypothesis import given, settings
from hypothesis import strategies as st
from nats_downlink_helpers import StoreSide, agent_config, agent_side, eventually, pickup

from cloud_sync import downlink_notices as notices
from cloud_sync.erasure_blinding import blind, blinding_key
from cloud_sync.store import model_rollout
from cloud_sync.store.backend import Backend
from cloud_sync.store.model_publish import read_model_dir
from cloud_sync.sync_downlink import ERASURE_CURSOR_KEY, MODEL_ETAG_KEY
from cloud_sync.sync_nats_downlink import SEQ_KEY
from edge_agent.config import config_from_dict
from edge_agent.errors import ConfigError
from tests.support.nats import NatsNode, nats_server, wait_jetstream_ready

Client = TestClient[Any, Any]
STORE = "store-a"
OTHER = "store-b"


@pytest.fixture
def server(tmp_path: Path) -> Iterator[NatsNode]:
    with nats_server(tmp_path / "nats") as node:
        wait_jetstream_ready(node.url)
        yield node


@pytest.fixture
async def store(backend: Backend, server: NatsNode) -> AsyncIterator[StoreSide]:
    side = await StoreSide(backend, server.url).open()
    try:
        yield side
    finally:
        await side.close()


def token_of(headers: dict[str, str]) -> str:
    return headers["Authorization"].removeprefix("Bearer ")


async def stream_messages(url: str, subject: str) -> list[dict[str, Any]]:
    """Every message of ``subject`` kept in the downlink stream, oldest first."""
    nc = await nats.connect(url)
    try:
        js = nc.jetstream(timeout=5)
        info = await js.stream_info(notices.STREAM)
        found = []
        for seq in range(info.state.first_seq, info.state.last_seq + 1):
            message = await js.get_msg(notices.STREAM, seq)
            if message.subject == subject:
                found.append(json.loads(message.data or b""))
        return found
    finally:
        await nc.close()


# ---- the message format ----------------------------------------------------------------


def test_notice_is_authenticated_per_key_and_per_subject() -> None:
    keys = [b"1" * 32, b"2" * 32]  # a rotation: the old and the new token are both valid
    subject = notices.subject(STORE, notices.ERASURE)
    data = notices.erasure_notice(
        subject, "c-9", keys, cursor=7, previous=3, requested_at="2026-11-27T00:00:00.000Z"
    )
    for key in keys:
        read = notices.read_notice(subject, data, key)
        assert isinstance(read, notices.ErasureMessage)
        assert (read.cursor, read.previous) == (7, 3)
        assert blind(key, "c-9") in read.blinded
    assert b"c-9" not in data  # the id never travels in clear
    with pytest.raises(notices.NoticeRefusedError) as refused:
        notices.read_notice(subject, data, b"3" * 32)  # another store's agent
    assert refused.value.reason == "bad_auth"
    with pytest.raises(notices.NoticeRefusedError) as replayed:  # on another store's subject
        notices.read_notice(notices.subject(OTHER, notices.ERASURE), data, keys[0])
    assert replayed.value.reason == "bad_auth"
    body = json.loads(data)
    body["cursor"] = "999"  # a cursor pushed forward would hide the erasures after it
    with pytest.raises(notices.NoticeRefusedError) as moved:
        notices.read_notice(subject, json.dumps(body).encode(), keys[0])
    assert moved.value.reason == "bad_auth"


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=2048) | st.text(max_size=512).map(str.encode))
def test_any_bytes_are_read_or_refused_never_raised(data: bytes) -> None:
    subject = notices.subject(STORE, notices.MODEL)
    reasons = {"too_large", "not_json", "bad_shape", "bad_auth", "wrong_subject"}
    with pytest.raises(notices.NoticeRefusedError) as refused:  # no MAC of this key: refused
        notices.read_notice(subject, data, b"k" * 32)
    assert refused.value.reason in reasons


# ---- erasures ----------------------------------------------------------------------------


async def test_erasure_reaches_the_agent_blinded_as_over_http_and_erases_its_rows(
    store: StoreSide, client: Client, tokens: Tokens, backend: Backend, tmp_path: Path
) -> None:
    agent, other, admin = await tokens.agent(STORE), await tokens.agent(OTHER), await tokens.admin()
    url = str(client.make_url("")).rstrip("/")
    config = agent_config(tmp_path / "a", STORE, store.nats_url, url, token_of(agent))
    async with agent_side(config) as side:
        await side.buffer.commit(
            [pickup(STORE, cid, n) for n in range(3) for cid in ("c-1", "c-2")]
        )
        assert (await client.delete("/v1/customers/c-1", headers=admin)).status == 200
        await store.round()

        # Each store's notice is what GET /v1/erasures answers that store's token.
        for headers, store_id in ((agent, STORE), (other, OTHER)):
            feed = await (await client.get("/v1/erasures", headers=headers)).json()
            sent = await stream_messages(store.nats_url, notices.subject(store_id, "erasure"))
            assert [m["blinded"] for m in sent] == [[e["blinded"] for e in feed["erasures"]]]
            assert [m["cursor"] for m in sent] == [e["cursor"] for e in feed["erasures"]]
            assert "c-1" not in json.dumps(sent)

        async with side.running() as reader:
            await eventually(lambda: _held_without(side.buffer, "c-1"))
            assert await side.buffer.held_customers() == ["c-2"]
            assert side.forgotten == ["c-1"]  # the listeners heard of it (the personalizer)
            assert reader.refused == {}
        cursor = (await (await client.get("/v1/erasures", headers=agent)).json())["next_after"]
        assert await side.buffer.read_meta(ERASURE_CURSOR_KEY) == cursor
        # The report of the pseudonym it uploaded c-1 under: the store erased those too.
        assert (await backend.stats()).erasures == 2
        assert side.buffer.counters.pending == 3  # recounted after the erase


async def _held_without(buffer: Any, customer_id: str) -> bool:
    return customer_id not in await buffer.held_customers()


async def test_agent_down_when_published_applies_after_restart_and_nothing_twice(
    store: StoreSide, client: Client, tokens: Tokens, backend: Backend, tmp_path: Path
) -> None:
    agent, admin = await tokens.agent(STORE), await tokens.admin()
    url = str(client.make_url("")).rstrip("/")
    config = agent_config(tmp_path / "a", STORE, store.nats_url, url, token_of(agent))
    async with agent_side(config) as side:
        await side.buffer.commit(
            [pickup(STORE, cid, n) for n in range(2) for cid in ("c-1", "c-2")]
        )
        assert (await client.delete("/v1/customers/c-1", headers=admin)).status == 200
        await store.round()
        async with side.running():
            await eventually(lambda: _held_without(side.buffer, "c-1"))
        seq_before = await side.buffer.read_meta(SEQ_KEY)
        # The agent is stopped; the store erases c-2 meanwhile; its announcer restarts too.
        assert (await client.delete("/v1/customers/c-2", headers=admin)).status == 200
        restarted = await StoreSide(backend, store.nats_url).open()
        try:
            await restarted.round()
            await restarted.round()
        finally:
            await restarted.close()
        sent = await stream_messages(store.nats_url, notices.subject(STORE, "erasure"))
        feed = await (await client.get("/v1/erasures", headers=agent)).json()
        # One notice per erasure the agent's HTTP feed holds: the restart announced none twice.
        assert [m["cursor"] for m in sent] == [e["cursor"] for e in feed["erasures"]]
        assert len(sent) == 2
        assert await side.buffer.held_customers() == ["c-2"]  # not applied while down
    async with agent_side(config) as side:  # the agent's restart: a new process, same files
        assert await side.buffer.read_meta(SEQ_KEY) == seq_before
        async with side.running() as reader:
            await eventually(lambda: _held_without(side.buffer, "c-2"))
            await asyncio.sleep(0.5)  # let it read whatever else there is
            assert reader.notices == 1  # only the one published while it was down
        assert await side.buffer.held_customers() == []
    # Pseudonym reports: one per customer, none twice.
    assert (await backend.stats()).erasures == 4


async def test_forged_and_garbled_notices_are_refused_counted_and_the_downlink_goes_on(
    store: StoreSide, client: Client, tokens: Tokens, tmp_path: Path
) -> None:
    agent, other, admin = await tokens.agent(STORE), await tokens.agent(OTHER), await tokens.admin()
    url = str(client.make_url("")).rstrip("/")
    config = agent_config(tmp_path / "a", STORE, store.nats_url, url, token_of(agent))
    subject = notices.subject(STORE, notices.ERASURE)
    async with agent_side(config) as side:
        await side.buffer.commit([pickup(STORE, "c-1", 1), pickup(STORE, "c-2", 1)])
        nc = await nats.connect(store.nats_url)
        try:
            js = nc.jetstream(timeout=5)
            await js.publish(subject, b"\x00\xff not json")
            await js.publish(subject, b'{"kind": "erasure"}')  # no auth at all
            forger = notices.erasure_notice(  # knows the format and the id, not the token
                subject, "c-1", [b"f" * 32], cursor=50, previous=0, requested_at="x"
            )
            await js.publish(subject, forger)
            # Another store's genuine notice (its own key) replayed on this store's subject.
            other_key = blinding_key(token_of(other))
            replay = notices.erasure_notice(
                notices.subject(OTHER, "erasure"),
                "c-2",
                [other_key],
                cursor=60,
                previous=0,
                requested_at="x",
            )
            await js.publish(subject, replay)
            big = b'{"x": "' + b"a" * (notices.MAX_NOTICE_BYTES + 10) + b'"}'
            await js.publish(subject, big)
        finally:
            await nc.close()
        async with side.running() as reader:
            await eventually(lambda: _refused_total(reader, 5))
            assert reader.refused == {"not_json": 1, "bad_shape": 1, "bad_auth": 2, "too_large": 1}
            assert sorted(await side.buffer.held_customers()) == ["c-1", "c-2"]
            assert await side.buffer.read_meta(ERASURE_CURSOR_KEY) is None  # not moved
            # The genuine one after them is applied: nothing above stopped the reader.
            assert (await client.delete("/v1/customers/c-2", headers=admin)).status == 200
            await store.round()
            await eventually(lambda: _held_without(side.buffer, "c-2"))
            assert await side.buffer.held_customers() == ["c-1"]


async def _refused_total(reader: Any, total: int) -> bool:
    refused: int = sum(reader.refused.values())
    return refused >= total


async def test_nats_killed_the_agent_keeps_working_and_catches_up(
    store: StoreSide, client: Client, tokens: Tokens, server: NatsNode, tmp_path: Path
) -> None:
    agent, admin = await tokens.agent(STORE), await tokens.admin()
    url = str(client.make_url("")).rstrip("/")
    config = agent_config(tmp_path / "a", STORE, store.nats_url, url, token_of(agent))
    async with agent_side(config) as side:
        await side.buffer.commit([pickup(STORE, "c-1", 1), pickup(STORE, "c-3", 1)])
        async with side.running() as reader:
            await eventually(lambda: _connected(reader, True))
            server.kill()  # -9: the hub is gone
            await eventually(lambda: _connected(reader, False))
            assert (await client.delete("/v1/customers/c-3", headers=admin)).status == 200
            with pytest.raises(Exception):  # noqa: B017,PT011 (the announcer's round fails; its loop retries)
                await asyncio.wait_for(store.round(), 10)
            await side.buffer.commit([pickup(STORE, "c-1", 2)])  # the agent keeps collecting
            assert side.buffer.counters.pending == 3
            server.start()  # same port, same store directory: the stream is still there
            await eventually(lambda: _round_succeeds(store), within_s=30, every=0.5)
            await eventually(lambda: _held_without(side.buffer, "c-3"))
            assert await side.buffer.held_customers() == ["c-1"]
            assert reader.connected


async def _connected(reader: Any, wanted: bool) -> bool:
    return bool(reader.connected) is wanted


async def _round_succeeds(store: StoreSide) -> bool:
    try:
        await asyncio.wait_for(store.round(), 5)
    except Exception:  # not back yet
        return False
    return True


async def test_a_store_added_after_erasures_catches_the_gap_up_over_http(
    store: StoreSide, client: Client, tokens: Tokens, tmp_path: Path
) -> None:
    admin = await tokens.admin()
    await tokens.agent(OTHER)  # the fleet so far: one other store
    assert (await client.delete("/v1/customers/c-old", headers=admin)).status == 200
    await store.round()
    agent = await tokens.agent(STORE)  # joins later: no notice of c-old was made for it
    assert (await client.delete("/v1/customers/c-new", headers=admin)).status == 200
    await store.round()
    url = str(client.make_url("")).rstrip("/")
    config = agent_config(tmp_path / "a", STORE, store.nats_url, url, token_of(agent))
    async with agent_side(config) as side:
        await side.buffer.commit(
            [pickup(STORE, "c-old", 1), pickup(STORE, "c-new", 1), pickup(STORE, "c-kept", 1)]
        )
        async with side.running() as reader:
            await eventually(lambda: _held_without(side.buffer, "c-new"))
            assert await side.buffer.held_customers() == ["c-kept"]
            assert reader.gaps == 1


# ---- models ------------------------------------------------------------------------------


def model_dir(root: Path, version: str, payload: bytes) -> Path:
    directory = root / version
    directory.mkdir(parents=True)
    (directory / "model.onnx").write_bytes(payload)
    manifest = {"version": version, "sha256": hashlib.sha256(payload).hexdigest()}
    (directory / "manifest.json").write_text(json.dumps(manifest))
    return directory


async def publish(backend: Backend, directory: Path) -> None:
    record, artifact = read_model_dir(directory)
    await model_rollout.publish(
        backend,
        directory,
        record,
        artifact,
        canary=None,
        force=True,
        decided_by="test",
        now=datetime.now(UTC),
    )


def tamper(db_url: str, version: str) -> None:
    """The artifact the store serves no longer matches its manifest (a corrupted copy)."""
    if db_url.startswith("sqlite://"):
        with contextlib.closing(sqlite3.connect(db_url.removeprefix("sqlite://"))) as db:
            db.execute("UPDATE models SET artifact = ? WHERE version = ?", (b"evil", version))
            db.commit()
        return
    with psycopg.connect(db_url) as conn:
        conn.execute("UPDATE models SET artifact = %s WHERE version = %s", (b"evil", version))


async def test_model_announcement_is_downloaded_over_http_and_a_tampered_one_refused(
    store: StoreSide,
    client: Client,
    tokens: Tokens,
    backend: Backend,
    db_url: str,
    tmp_path: Path,
) -> None:
    agent = await tokens.agent(STORE)
    url = str(client.make_url("")).rstrip("/")
    config = agent_config(tmp_path / "a", STORE, store.nats_url, url, token_of(agent))
    await publish(backend, model_dir(tmp_path / "models", "1.0.0", b"model one" * 100))
    await store.round()
    latest = await client.get("/v1/models/latest", headers=agent)
    sent = await stream_messages(store.nats_url, notices.subject(STORE, "model"))
    assert [(m["etag"], m["manifest"]) for m in sent] == [
        (latest.headers["ETag"], await latest.json())
    ]
    async with agent_side(config) as side, side.running() as reader:
        await eventually(lambda: _offered(side, 1))
        assert side.offered[0].name == "1.0.0"
        assert (side.offered[0] / "manifest.json").exists()
        assert await side.buffer.read_meta(MODEL_ETAG_KEY) == latest.headers["ETag"]

        await publish(backend, model_dir(tmp_path / "models", "2.0.0", b"model two" * 100))
        tamper(db_url, "2.0.0")
        await store.round()
        await eventually(lambda: _model_error(side, "sha256"))
        await asyncio.sleep(1.0)  # retried meanwhile (interval 0.2 s), refused each time
        assert len(side.offered) == 1  # never offered
        assert not (config.data_dir / "models" / "incoming" / "2.0.0").exists()
        assert await side.buffer.read_meta(MODEL_ETAG_KEY) == latest.headers["ETag"]
        assert reader.refused == {}  # the notice was genuine; the bytes were not


async def _offered(side: Any, count: int) -> bool:
    return len(side.offered) >= count


async def _model_error(side: Any, text: str) -> bool:
    error = side.downlink.last_model_error
    return error is not None and text in error


# ---- the agent's keys --------------------------------------------------------------------


def test_config_nats_downlink_needs_nats_a_downlink_url_and_a_subject_safe_store_id(
    tmp_path: Path,
) -> None:
    base = {"agent": {"store_id": STORE, "data_dir": str(tmp_path)}}
    nats_sync = {"transport": "nats", "url": "nats://127.0.0.1:4222", "token": "t"}
    ok = config_from_dict(
        {
            **base,
            "sync": {**nats_sync, "downlink_url": "http://127.0.0.1:8700", "nats_downlink": True},
        }
    )
    assert ok.sync.nats_downlink
    assert not config_from_dict({**base, "sync": nats_sync}).sync.nats_downlink  # default off
    with pytest.raises(ConfigError, match=r"sync\.nats_downlink"):  # no HTTP for model bytes
        config_from_dict({**base, "sync": {**nats_sync, "nats_downlink": True}})
    with pytest.raises(ConfigError, match=r"sync\.nats_downlink"):  # over HTTP: nothing to read
        config_from_dict(
            {
                **base,
                "sync": {"url": "http://127.0.0.1:8700", "token": "t", "nats_downlink": True},
            }
        )
    with pytest.raises(ConfigError, match=r"agent\.store_id"):  # a.b would be two tokens
        config_from_dict(
            {
                "agent": {"store_id": "store.a", "data_dir": str(tmp_path)},
                "sync": {
                    **nats_sync,
                    "downlink_url": "http://127.0.0.1:8700",
                    "nats_downlink": True,
                },
            }
        )


async def test_a_manifest_too_large_to_announce_is_fetched_over_http(
    store: StoreSide, client: Client, tokens: Tokens, backend: Backend, tmp_path: Path
) -> None:
    agent = await tokens.agent(STORE)
    url = str(client.make_url("")).rstrip("/")
    config = agent_config(tmp_path / "a", STORE, store.nats_url, url, token_of(agent))
    directory = model_dir(tmp_path / "models", "3.0.0", b"model three" * 100)
    manifest = json.loads((directory / "manifest.json").read_text())
    manifest["notes"] = "n" * (notices.MAX_NOTICE_BYTES + 1)  # a big evaluation report, say
    (directory / "manifest.json").write_text(json.dumps(manifest))
    async with agent_side(config) as side, side.running() as reader:
        await eventually(lambda: _connected(reader, True))
        await asyncio.sleep(1.0)  # its start-up look over HTTP found no model yet
        await publish(backend, directory)
        await store.round()  # only the announcement can make it look again
        sent = await stream_messages(store.nats_url, notices.subject(STORE, "model"))
        latest = await client.get("/v1/models/latest", headers=agent)
        assert [(m["etag"], m["manifest"]) for m in sent] == [(latest.headers["ETag"], None)]
        await eventually(lambda: _offered(side, 1))
        assert side.offered[0].name == "3.0.0"
        assert await side.buffer.read_meta(MODEL_ETAG_KEY) == latest.headers["ETag"]
        assert reader.refused == {}
