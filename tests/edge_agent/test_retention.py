"""Collect-only stores (no sync.url): retention keeps the buffer from wedging."""

from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path

from edge_agent.buffer import Buffer
from edge_agent.config import BufferSection
from tests.conftest import COLLECT_ONLY, agent_config_dict
from tests.edge_agent.test_buffer import event
from tests.support.agent import (
    AgentProcess,
    Publisher,
    buffered_event_ids,
    event_topic,
    http_get,
    pickup,
    wait_http_ready,
    write_config,
)
from tests.support.broker import AmqttBroker, MosquittoBroker, free_port

MIB = 1024 * 1024


async def test_budget_evicts_oldest_customer_events_when_collect_only(tmp_path: Path) -> None:
    settings = BufferSection(max_bytes=2 * MIB)
    async with await Buffer.open(tmp_path / "b.db", settings, collect_only=True) as buffer:
        customer = [event(n, size=200) for n in range(6000)]
        for start in range(0, len(customer), 500):
            await buffer.commit(customer[start : start + 500])  # never held: nothing wedges
        assert buffer.counters.drops["retention_evicted"] > 0
        assert not buffer.counters.backpressure
        kept = await buffer._call(
            lambda c: [r[0] for r in c.execute("SELECT event_id FROM events ORDER BY seq")]
        )
        persisted = await buffer._call(
            lambda c: c.execute(
                "SELECT value FROM counters WHERE name = 'drop.retention_evicted'"
            ).fetchone()[0]
        )
    assert kept[-1] == "ev-00005999"  # the newest stayed, the oldest went
    assert kept[0] > "ev-00000000"
    assert persisted == buffer.counters.drops["retention_evicted"]


async def test_customer_events_past_retention_days_go_at_recount(tmp_path: Path) -> None:
    path = tmp_path / "b.db"
    settings = BufferSection(retention_days=1.0)
    async with await Buffer.open(path, settings, collect_only=True) as buffer:
        await buffer.commit([event(n) for n in range(10)])
        two_days_ago = buffer.clock() - 2 * 86_400
        # Age the first four rows as if they had been received two days ago.
        await buffer._call(
            lambda c: c.execute("UPDATE events SET received_at = ? WHERE seq <= 4", (two_days_ago,))
        )
        await buffer.recount()
        left = await buffer._call(
            lambda c: [r[0] for r in c.execute("SELECT event_id FROM events ORDER BY seq")]
        )
        assert buffer.counters.drops["retention_evicted"] == 4
        assert buffer.counters.total == 6
    assert left == [f"ev-{n:08d}" for n in range(4, 10)]


async def test_with_sync_on_unsynced_customer_events_are_never_expired(tmp_path: Path) -> None:
    settings = BufferSection(retention_days=1.0)
    async with await Buffer.open(tmp_path / "b.db", settings) as buffer:
        await buffer.commit([event(n) for n in range(3)])
        old = buffer.clock() - 30 * 86_400
        await buffer._call(lambda c: c.execute("UPDATE events SET received_at = ?", (old,)))
        await buffer.recount()
        assert buffer.counters.total == 3
        assert buffer.counters.drops["retention_evicted"] == 0


def test_a_collect_only_agent_process_keeps_taking_customer_events_past_its_budget(
    tmp_path: Path, store_id: str, private_broker: MosquittoBroker | AmqttBroker
) -> None:
    http_port = free_port()
    document = agent_config_dict(
        tmp_path,
        store_id,
        private_broker,
        model=COLLECT_ONLY,
        http={"port": http_port},
        buffer={"max_bytes": MIB},
    )
    config = write_config(tmp_path / "agent.toml", document)
    db = tmp_path / "data" / "buffer.db"
    agent = AgentProcess(config)
    total = 8000  # several times what 1 MiB holds
    last = f"ev-{total - 1:06d}"
    publisher = Publisher(private_broker.host, private_broker.port)
    try:
        agent.start()
        wait_http_ready(f"http://127.0.0.1:{http_port}/readyz")
        for n in range(total):
            publisher.publish(event_topic(store_id), pickup(f"ev-{n:06d}", customer_id=f"c-{n}"))
        publisher.wait_all(timeout=120)
        deadline = time.monotonic() + 120
        while last not in buffered_event_ids(db) and time.monotonic() < deadline:
            time.sleep(0.2)
        found = buffered_event_ids(db)
        code, body = http_get(f"http://127.0.0.1:{http_port}/status")
        ready, _ = http_get(f"http://127.0.0.1:{http_port}/readyz")
        assert agent.terminate() == 0
    finally:
        agent.ensure_dead()
        publisher.close()
    assert last in found, "the buffer wedged: the newest customer event never arrived"
    assert len(found) < total  # the budget really was exceeded
    assert code == 200
    assert json.loads(body)["drops"]["by_reason"]["retention_evicted"] > 0
    assert ready == 200


async def test_expiry_waits_for_a_writer_holding_the_lock_instead_of_failing(
    tmp_path: Path,
) -> None:
    path = tmp_path / "b.db"
    async with await Buffer.open(path, BufferSection(retention_days=1.0), collect_only=True) as buf:
        await buf.commit([event(n) for n in range(3)])
        old = buf.clock() - 2 * 86_400
        await buf._call(lambda c: c.execute("UPDATE events SET received_at = ?", (old,)))
        other = sqlite3.connect(path, isolation_level=None, timeout=10)
        try:
            other.execute("BEGIN IMMEDIATE")  # another process writing (the CLI, salvage)
            await buf.recount()  # before the fix: "database is locked" ended the agent
            assert buf.counters.drops["retention_evicted"] == 0
            other.execute("ROLLBACK")
        finally:
            other.close()
        await buf.recount()
        assert buf.counters.drops["retention_evicted"] == 3
