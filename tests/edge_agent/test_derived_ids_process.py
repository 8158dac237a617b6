"""Derived event ids across a real redelivery: the agent commits messages whose PUBACKs never
reach the broker, is killed with -9 and started again; the broker redelivers them, and the
restarted agent derives the same keyed ids from its kept key, so nothing is stored twice."""

from __future__ import annotations

import asyncio
import contextlib
import json
import sqlite3
from dataclasses import dataclass, field
from pathlib import Path

from edge_agent.config import config_from_dict
from edge_agent.events import derive_event_id
from edge_agent.governance import event_id_key
from tests.conftest import COLLECT_ONLY, agent_config_dict
from tests.support.agent import (
    AgentProcess,
    Publisher,
    event_topic,
    http_get,
    wait_http_ready,
    wait_until,
    write_config,
)
from tests.support.broker import AmqttBroker, MosquittoBroker, free_port
from tests.support.services import missing_service

TOTAL = 1500


@dataclass
class AckSwallowingProxy:
    """A loopback MQTT relay; while ``swallow`` is set, nothing the agent sends reaches the
    broker (its PUBACKs are lost), while the broker's messages still reach the agent."""

    broker_port: int
    port: int = 0
    swallow: bool = False
    _server: asyncio.Server | None = None
    _writers: set[asyncio.StreamWriter] = field(default_factory=set)

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._relay, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for writer in list(self._writers):
            writer.transport.abort()

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.broker_port)
        self._writers |= {writer, up_writer}
        try:
            await asyncio.gather(
                self._pipe(reader, up_writer, upstream=True),
                self._pipe(up_reader, writer, upstream=False),
            )
        finally:
            for one in (writer, up_writer):
                self._writers.discard(one)
                one.transport.abort()

    async def _pipe(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, upstream: bool
    ) -> None:
        with contextlib.suppress(OSError, ConnectionError):
            while chunk := await reader.read(65536):
                if upstream and self.swallow:
                    continue
                writer.write(chunk)
                await writer.drain()


def payload(n: int) -> bytes:
    """A message without an event_id (the agent derives one), naming a customer."""
    event = {"type": "product.pickup", "customer_id": f"c-{n:06d}", "data": {"sku": f"SKU-{n}"}}
    return json.dumps(event).encode()


def buffered_ids(db: Path) -> list[str]:
    with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10)) as conn:
        try:
            return [row[0] for row in conn.execute("SELECT event_id FROM events")]
        except sqlite3.OperationalError:
            return []  # not created yet


async def test_a_redelivery_after_kill_9_keeps_its_keyed_id(
    tmp_path: Path, store_id: str, private_broker: MosquittoBroker | AmqttBroker
) -> None:
    if not private_broker.persistent:
        missing_service("redelivery after kill -9 needs mosquitto's persistent sessions")
    proxy = AckSwallowingProxy(private_broker.port)
    await proxy.start()
    http_port = free_port()
    document = agent_config_dict(
        tmp_path, store_id, private_broker, model=COLLECT_ONLY, http={"port": http_port}
    )
    document["mqtt"]["port"] = proxy.port
    config = write_config(tmp_path / "agent.toml", document)
    db = tmp_path / "data" / "buffer.db"
    agent = AgentProcess(config)
    topic = event_topic(store_id)
    status_url = f"http://127.0.0.1:{http_port}/status"
    try:
        agent.start()
        await asyncio.to_thread(wait_http_ready, f"http://127.0.0.1:{http_port}/readyz")
        proxy.swallow = True  # from here on the agent commits, but the broker hears no PUBACK
        publisher = Publisher(private_broker.host, private_broker.port)
        try:
            for n in range(TOTAL):
                publisher.publish(topic, payload(n))
            await asyncio.to_thread(publisher.wait_all, 60)
        finally:
            publisher.close()
        await wait_until(lambda: len(buffered_ids(db)) >= 100, 30)
        await asyncio.sleep(0.5)  # let the commits in flight land
        await asyncio.to_thread(agent.kill)
        committed_unacknowledged = len(buffered_ids(db))
        proxy.swallow = False
        agent.start()
        await asyncio.to_thread(wait_http_ready, f"http://127.0.0.1:{http_port}/readyz")
        await wait_until(lambda: len(buffered_ids(db)) >= TOTAL, 60, interval=0.2)
        _, body = await asyncio.to_thread(http_get, status_url)
        redelivered_held = json.loads(body)["buffer"]["duplicates"]
        assert await asyncio.to_thread(agent.terminate) == 0
    finally:
        agent.ensure_dead()
        await proxy.close()
    # Every committed message came back (its PUBACK was lost) and was known by its id.
    assert redelivered_held >= committed_unacknowledged >= 100
    ids = buffered_ids(db)
    key = event_id_key(config_from_dict(document))  # the key the agent keeps in data_dir
    expected = {derive_event_id(key, f"mqtt:{topic}", payload(n)) for n in range(TOTAL)}
    assert len(ids) == TOTAL
    assert set(ids) == expected
