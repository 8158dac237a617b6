"""The uploader against a real store process: outages end with every event stored once.

The agent runs in-process (its buffer is a real SQLite file, its broker a real mosquitto);
the store is a real ``customer-store serve`` on SQLite or PostgreSQL, reached through a TCP
proxy the test cuts to simulate a network outage, and killed with -9 while batches are in
flight.
"""

from __future__ import annotations

import asyncio
import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from sync_helpers import (
    StoreProcess,
    TcpProxy,
    eventually,
    store_cli,
    store_event_ids,
    store_events,
    stored_count,
    sync_section,
)

from cloud_sync.uploader import Uploader
from edge_agent.status.metrics import render
from tests.conftest import COLLECT_ONLY, agent_config_dict
from tests.support.agent import Publisher, agent_running, buffered_event_ids, event_topic, pickup
from tests.support.broker import AmqttBroker, MosquittoBroker

Broker = MosquittoBroker | AmqttBroker


def uploader_of(agent: object) -> Uploader:
    parts = [part for part in agent.components if isinstance(part, Uploader)]  # type: ignore[attr-defined]
    assert len(parts) == 1
    return parts[0]


def publish_in_thread(
    broker: Broker, topic: str, ids: list[str], pause_every: int = 20
) -> threading.Thread:
    def run() -> None:
        publisher = Publisher(broker.host, broker.port)
        try:
            for n, event_id in enumerate(ids):
                publisher.publish(topic, pickup(event_id, customer_id=f"c-{n % 7}"))
                if n % pause_every == pause_every - 1:
                    publisher.wait_all(30)  # a steady stream rather than one burst
        finally:
            publisher.wait_all(30)
            publisher.close()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


async def test_store_kill_9_and_network_cut_end_with_every_event_stored_once(
    db_url: str, tmp_path: Path, store_id: str, mqtt_broker: Broker
) -> None:
    token = store_cli(db_url, "token", "create", "--store", store_id)
    store = StoreProcess(db_url, tmp_path / "store.log")
    store.start()
    proxy = TcpProxy(store.port)
    await proxy.start()
    document = agent_config_dict(
        tmp_path, store_id, mqtt_broker, sync=sync_section(proxy.url, token, batch_size=25)
    )
    ids = [f"ev-{n:05d}" for n in range(450)]
    try:
        async with agent_running(document) as agent:
            uploader = uploader_of(agent)
            topic = event_topic(store_id)
            # Phase 1: the store is killed with -9 while the agent uploads a stream.
            writer = publish_in_thread(mqtt_broker, topic, ids[:150])
            await eventually(lambda: uploader.stats.batches >= 2, 20)
            await asyncio.to_thread(store.kill)
            await asyncio.to_thread(writer.join, 30)
            errors_before = uploader.stats.errors
            await eventually(lambda: uploader.stats.errors > errors_before, 10)
            await asyncio.to_thread(store.start)  # same port, behind the same proxy
            await eventually(lambda: agent.buffer.counters.pending == 0, 20)
            # Phase 2: the network is cut; events keep coming and are collected meanwhile.
            await proxy.cut()
            writer = publish_in_thread(mqtt_broker, topic, ids[150:300])
            await asyncio.to_thread(writer.join, 30)
            errors_before = uploader.stats.errors
            await eventually(lambda: uploader.stats.errors > errors_before + 1, 10)
            assert agent.buffer.counters.pending >= 150  # and the suggestions made meanwhile
            await proxy.start()
            # Phase 3: after recovery, a last stream.
            writer = publish_in_thread(mqtt_broker, topic, ids[300:])
            await asyncio.to_thread(writer.join, 30)
            await eventually(lambda: agent.buffer.counters.pending == 0, 30)
            status = await agent.board.snapshot()
    finally:
        await proxy.cut()
        store.stop()
    buffered = buffered_event_ids(tmp_path / "data" / "buffer.db")
    stored = store_event_ids(db_url)
    assert await asyncio.to_thread(store_events, db_url) == len(stored) == len(buffered)
    assert sorted(stored) == sorted(buffered)
    assert set(ids) <= set(stored)
    sync = status["sync"]
    assert sync["enabled"] is True
    assert sync["backlog"] == 0
    assert sync["sent"] >= len(buffered)  # resent batches count as duplicates, never stored twice
    assert sync["errors"] >= 3
    assert sync["last_success"] is not None
    assert sync["lag_s"] is not None
    metrics = render(status).decode()
    assert "edge_sync_backlog_events 0.0" in metrics
    assert f"edge_sync_errors_total {float(sync['errors'])}" in metrics


async def test_a_store_that_hangs_times_out_and_the_agent_still_stops_promptly(
    sqlite_url: str, tmp_path: Path, store_id: str, mqtt_broker: Broker
) -> None:
    token = store_cli(sqlite_url, "token", "create", "--store", store_id)
    store = StoreProcess(sqlite_url, tmp_path / "store.log")
    store.start()
    proxy = TcpProxy(store.port, stalled=True)
    await proxy.start()
    document = agent_config_dict(
        tmp_path, store_id, mqtt_broker, sync=sync_section(proxy.url, token, timeout_s=0.5)
    )
    try:
        async with agent_running(document) as agent:
            uploader = uploader_of(agent)
            writer = publish_in_thread(mqtt_broker, event_topic(store_id), ["h-1", "h-2"])
            await asyncio.to_thread(writer.join, 30)
            await eventually(lambda: "TimeoutError" in (uploader.stats.last_error or ""), 10)
            assert uploader.stats.sent == 0
            proxy.stalled = False  # the store answers again: the same rows go through
            await eventually(lambda: agent.buffer.counters.pending == 0, 15)
            proxy.stalled = True  # and hangs again while the agent stops
            writer = publish_in_thread(mqtt_broker, event_topic(store_id), ["h-3"])
            await asyncio.to_thread(writer.join, 30)
            await asyncio.sleep(0.5)  # a request is stuck in the stalled proxy now
            stopping = time.monotonic()
        stopped_in = time.monotonic() - stopping
    finally:
        await proxy.cut()
        store.stop()
    assert stopped_in < 5.0  # cancellation reaches the in-flight request
    assert {"h-1", "h-2"} <= set(store_event_ids(sqlite_url))


async def test_a_lost_acknowledgement_resends_and_the_store_counts_duplicates(
    sqlite_url: str, tmp_path: Path, store_id: str, mqtt_broker: Broker
) -> None:
    token = store_cli(sqlite_url, "token", "create", "--store", store_id)
    store = StoreProcess(sqlite_url, tmp_path / "store.log")
    store.start()
    # Collect only: suggestions recorded after the first run's last upload would be new.
    document = agent_config_dict(
        tmp_path, store_id, mqtt_broker, sync=sync_section(store.url, token), model=COLLECT_ONLY
    )
    try:
        async with agent_running(document) as agent:
            writer = publish_in_thread(
                mqtt_broker, event_topic(store_id), [f"d-{n}" for n in range(60)]
            )
            await asyncio.to_thread(writer.join, 30)
            # Every event committed (the broker has acknowledged the publisher, not yet us)
            # and uploaded.
            await eventually(
                lambda: agent.buffer.counters.total >= 60 and agent.buffer.counters.pending == 0,
                20,
            )
        # As if every acknowledgement had been lost on the way back (a crash before the mark).
        with sqlite3.connect(tmp_path / "data" / "buffer.db") as db:
            db.execute("UPDATE events SET synced_at = NULL")
        async with agent_running(document) as agent:
            await eventually(lambda: agent.buffer.counters.pending == 0, 20)
            held = agent.buffer.counters.total
            uploader = uploader_of(agent)
            assert uploader.stats.duplicates == held >= 60
            assert uploader.stats.sent == held
    finally:
        store.stop()
    assert await stored_count(sqlite_url) == held


async def test_fresh_customer_events_overtake_a_rate_capped_backlog(
    sqlite_url: str, tmp_path: Path, store_id: str, mqtt_broker: Broker
) -> None:
    token = store_cli(sqlite_url, "token", "create", "--store", store_id)
    store = StoreProcess(sqlite_url, tmp_path / "store.log")
    store.start()
    proxy = TcpProxy(store.port)
    await proxy.start()
    await proxy.cut()  # offline from the start: a backlog builds up
    settings = sync_section(proxy.url, token, max_events_per_s=100.0, live_lane_size=10)
    document = agent_config_dict(tmp_path, store_id, mqtt_broker, sync=settings)
    backlog = [f"old-{n:04d}" for n in range(200)]
    try:
        async with agent_running(document) as agent:
            writer = publish_in_thread(mqtt_broker, event_topic(store_id), backlog, pause_every=100)
            await asyncio.to_thread(writer.join, 30)
            await eventually(lambda: agent.buffer.counters.pending >= 200, 10)
            await _settled(lambda: agent.buffer.counters.pending)  # suggestions for the backlog
            await proxy.start()
            drain_started = time.monotonic()
            publisher = Publisher(mqtt_broker.host, mqtt_broker.port)
            publisher.publish(event_topic(store_id), pickup("fresh-1", customer_id="c-fresh"))
            await asyncio.to_thread(publisher.wait_all, 10)
            publisher.close()
            uploader = uploader_of(agent)
            fresh_seen_at = await _wait_stored(tmp_path, sqlite_url, "fresh-1")
            assert fresh_seen_at < 200, "the fresh event waited for the whole backlog"
            await eventually(lambda: agent.buffer.counters.pending == 0, 30)
            drained_in = time.monotonic() - drain_started
            held = agent.buffer.counters.total
            assert uploader.stats.sent == held
            assert drained_in >= (held - 40) / 100.0  # the cap held (a round is <= 40 events)
    finally:
        await proxy.cut()
        store.stop()
    assert await stored_count(sqlite_url) == held


async def _settled(figure: Callable[[], int], quiet_s: float = 0.6) -> None:
    """Wait until ``figure`` stops changing for ``quiet_s`` (bounded: 15 s)."""
    last, since = figure(), time.monotonic()
    deadline = time.monotonic() + 15
    while time.monotonic() - since < quiet_s:
        assert time.monotonic() < deadline, "the figure never settled"
        await asyncio.sleep(0.05)
        if figure() != last:
            last, since = figure(), time.monotonic()


async def _wait_stored(tmp_path: Path, sqlite_url: str, event_id: str) -> int:
    """Wait until ``event_id`` is in the store; return how many events it held then."""
    path = sqlite_url.removeprefix("sqlite://")
    found: list[int] = []

    def probe() -> bool:
        with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as db:
            hit = db.execute("SELECT 1 FROM events WHERE event_id = ?", (event_id,)).fetchone()
            if hit:
                found.append(db.execute("SELECT count(*) FROM events").fetchone()[0])
        return bool(found)

    await eventually(probe, 10, every=0.05)
    return found[0]


@pytest.mark.parametrize(
    "setting", ["max_events_per_s", "live_lane_size", "concurrency", "backoff_initial_s"]
)
def test_sync_settings_are_validated_by_name(tmp_path: Path, setting: str) -> None:
    from edge_agent.config import config_from_dict
    from edge_agent.errors import ConfigError

    with pytest.raises(ConfigError, match=f"sync.{setting}"):
        config_from_dict(
            {"agent": {"store_id": "s", "data_dir": str(tmp_path)}, "sync": {setting: -1}}
        )
