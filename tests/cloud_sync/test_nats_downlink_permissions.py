"""Per-store NATS permissions for the downlink, on a real nats-server with users.

The users are the ones docs/scaling.md describes: the announcer may publish the downlink,
each store's user may create and read only the consumer named for it, filtered on its own
subjects, with replies in its own inbox prefix. Store B is then shown unable to read store A's
notices by every route the JetStream API offers (a consumer on A's subjects under either name,
an unfiltered consumer, a direct message get, a plain subscription) or to forge one for A,
while both stores' own readers receive theirs on the same server.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import nats
import nats.errors
import pytest
from aiohttp.test_utils import TestClient
from conftest import Tokens
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats_downlink_helpers import StoreSide, agent_config, agent_side, eventually, pickup

from cloud_sync import downlink_notices as notices
from cloud_sync.store.backend import Backend
from cloud_sync.sync_nats import inbox_prefix
from tests.support.nats import NatsNode

Client = TestClient[Any, Any]
STORE_A, STORE_B = "store-a", "store-b"
PASSWORDS = {"announcer": "pw-announcer", STORE_A: "pw-a", STORE_B: "pw-b"}


def store_user(store_id: str) -> str:
    """One store's user, as in docs/scaling.md (its uplink subject, its downlink consumer)."""
    consumer = notices.consumer_name(store_id)
    api = f"$JS.API.CONSUMER.%s.{notices.STREAM}.{consumer}"
    allow = [
        f"edge.events.{store_id}",
        f"{api % 'CREATE'}.{notices.store_filter(store_id)}",
        api % "DELETE",
        api % "INFO",
        f"$JS.API.CONSUMER.MSG.NEXT.{notices.STREAM}.{consumer}",
        f"$JS.ACK.{notices.STREAM}.{consumer}.>",
    ]
    quoted = ", ".join(json.dumps(subject) for subject in allow)
    return (
        f"{{user: {store_id}, password: {PASSWORDS[store_id]}, permissions: {{"
        f" publish: {{allow: [{quoted}]}},"
        f' subscribe: {{allow: ["{inbox_prefix(store_id)}.>"]}} }} }}'
    )


def accounts_config() -> str:
    users = ",\n".join(
        [
            # customer-store announce, with the permissions docs/scaling.md gives it
            "{user: announcer, password: pw-announcer, permissions: {"
            ' publish: ["$JS.API.>", "edge.downlink.>", "$KV.EDGE_DOWNLINK_STATE.>"],'
            ' subscribe: ["_INBOX.>"]}}',
            store_user(STORE_A),
            store_user(STORE_B),
        ]
    )
    return f"accounts {{\n  HUB {{\n    jetstream: enabled\n    users: [\n{users}\n]\n  }}\n}}\n"


@pytest.fixture
def server(tmp_path: Path) -> Iterator[NatsNode]:
    node = NatsNode(tmp_path / "nats", "perm", extra=accounts_config())
    node.start()
    try:
        yield node
    finally:
        node.stop()


def user_url(node: NatsNode, user: str) -> str:
    return f"nats://{user}:{PASSWORDS[user]}@127.0.0.1:{node.port}"


async def wait_ready(url: str) -> None:
    async def answers() -> bool:
        try:
            nc = await nats.connect(url, connect_timeout=1, allow_reconnect=False)
        except (nats.errors.Error, OSError, TimeoutError):
            return False
        try:
            await nc.jetstream(timeout=1).account_info()
        except (nats.errors.Error, TimeoutError):
            return False
        finally:
            await nc.close()
        return True

    await eventually(answers, within_s=30, every=0.2)


@pytest.fixture
async def store(backend: Backend, server: NatsNode) -> AsyncIterator[StoreSide]:
    url = user_url(server, "announcer")
    await wait_ready(url)
    side = await StoreSide(backend, url).open()
    try:
        yield side
    finally:
        await side.close()


async def _held_without(side: Any, customer_id: str) -> bool:
    return customer_id not in await side.buffer.held_customers()


async def test_a_store_reads_only_its_own_notices_and_cannot_forge_another_stores(
    store: StoreSide, server: NatsNode, client: Client, tokens: Tokens, tmp_path: Path
) -> None:
    headers_a, headers_b = await tokens.agent(STORE_A), await tokens.agent(STORE_B)
    admin = await tokens.admin()
    http = str(client.make_url("")).rstrip("/")
    configs = {
        store_id: agent_config(
            tmp_path / store_id,
            store_id,
            server.url,
            http,
            headers["Authorization"].removeprefix("Bearer "),
            nats_user=store_id,
            nats_password=PASSWORDS[store_id],
        )
        for store_id, headers in ((STORE_A, headers_a), (STORE_B, headers_b))
    }
    errors: list[str] = []

    async def collect(exc: Exception) -> None:
        errors.append(str(exc).lower())

    # Store B's snooping connection: its own user and inbox prefix, as its agent connects.
    snoop = await nats.connect(
        user_url(server, STORE_B),
        inbox_prefix=inbox_prefix(STORE_B),
        error_cb=collect,
        allow_reconnect=False,
    )
    try:
        seen: list[bytes] = []

        async def heard(message: Any) -> None:
            seen.append(message.data)

        await snoop.subscribe(notices.store_filter(STORE_A), cb=heard)
        await snoop.flush()
        assert (await client.delete("/v1/customers/c-a", headers=admin)).status == 200
        await store.round()  # notices for both stores, store A's naming c-a blinded

        async with agent_side(configs[STORE_A]) as side_a, agent_side(configs[STORE_B]) as side_b:
            await side_a.buffer.commit([pickup(STORE_A, "c-a"), pickup(STORE_A, "c-x")])
            await side_b.buffer.commit([pickup(STORE_B, "c-a"), pickup(STORE_B, "c-y")])
            async with side_a.running() as reader_a, side_b.running() as reader_b:
                # The permissions documented are enough: each agent applies its own notice.
                await eventually(lambda: _held_without(side_a, "c-a"))
                await eventually(lambda: _held_without(side_b, "c-a"))
                assert reader_a.refused == reader_b.refused == {}

            js = snoop.jetstream(timeout=2)
            denied: list[str] = []
            attempts = {
                "consumer named for B on A's subjects": ConsumerConfig(
                    name=notices.consumer_name(STORE_B),
                    filter_subject=notices.store_filter(STORE_A),
                ),
                "consumer named for A": ConsumerConfig(
                    name=notices.consumer_name(STORE_A),
                    filter_subject=notices.store_filter(STORE_A),
                ),
                "unnamed consumer": ConsumerConfig(filter_subject=notices.store_filter(STORE_A)),
                "unfiltered consumer": ConsumerConfig(name=notices.consumer_name(STORE_B)),
            }
            for what, config in attempts.items():
                config.deliver_policy = DeliverPolicy.ALL
                config.ack_policy = AckPolicy.EXPLICIT
                with pytest.raises((nats.errors.Error, TimeoutError)):
                    await js.add_consumer(notices.STREAM, config)
                denied.append(what)
            with pytest.raises((nats.errors.Error, TimeoutError)):
                await js.get_msg(notices.STREAM, 1)  # the stream's messages by number
            with pytest.raises((nats.errors.Error, TimeoutError)):
                await js.get_last_msg(notices.STREAM, notices.subject(STORE_A, notices.ERASURE))
            before = (await store_stream_state(store)).messages
            forged = notices.erasure_notice(
                notices.subject(STORE_A, notices.ERASURE),
                "c-x",
                [b"b" * 32],
                cursor=99,
                previous=0,
                requested_at="x",
            )
            await snoop.publish(notices.subject(STORE_A, notices.ERASURE), forged)
            await snoop.flush()
            await asyncio.sleep(0.5)
            assert (await store_stream_state(store)).messages == before  # never stored
            assert seen == []  # the plain subscription heard nothing of store A
            assert len(denied) == len(attempts)
            violations = [e for e in errors if "permissions violation" in e]
            # The server refused each one (not a mere timeout): subscribe, 4 creates, 2 gets,
            # the forged publish.
            assert len(violations) >= 1 + len(attempts) + 2 + 1, errors
            # And store B's own consumer works on the same connection (the control).
            own = ConsumerConfig(
                name=notices.consumer_name(STORE_B),
                filter_subject=notices.store_filter(STORE_B),
                deliver_policy=DeliverPolicy.ALL,
                ack_policy=AckPolicy.EXPLICIT,
            )
            await js.delete_consumer(notices.STREAM, own.name or "")
            await js.add_consumer(notices.STREAM, own)
            pull = await js.pull_subscribe_bind(consumer=own.name, stream=notices.STREAM)
            mine = await pull.fetch(10, timeout=2)
            assert [m.subject for m in mine] == [notices.subject(STORE_B, notices.ERASURE)]
    finally:
        await snoop.close()


async def store_stream_state(store: StoreSide) -> Any:
    assert store.nc is not None
    return (await store.nc.jetstream(timeout=5).stream_info(notices.STREAM)).state
