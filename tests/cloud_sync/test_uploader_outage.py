"""After an outage: the uploader resumes when the store answers, shows a backlog that built
during a round, and measures its lag on a clock that a wall-clock step cannot move.

The agent runs in-process against a real broker and a real ``customer-store serve`` process
that the tests stop and start again (or cut off behind a TCP proxy).
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import time_machine
from sync_helpers import StoreProcess, TcpProxy, eventually, store_cli, stored_count, sync_section

from cloud_sync.uploader import Uploader
from edge_agent.app import RunningAgent
from tests.conftest import COLLECT_ONLY, agent_config_dict
from tests.support.agent import Publisher, agent_running, event_topic, pickup
from tests.support.broker import AmqttBroker, MosquittoBroker

Broker = MosquittoBroker | AmqttBroker


@pytest.fixture
def store(sqlite_url: str, tmp_path: Path) -> Iterator[StoreProcess]:
    process = StoreProcess(sqlite_url, tmp_path / "store.log")
    process.start()
    yield process
    process.stop()


def document_for(
    tmp_path: Path, store_id: str, broker: Broker, store: StoreProcess, url: str, **sync: Any
) -> dict[str, Any]:
    token = store_cli(store.db_url, "token", "create", "--store", store_id)
    return agent_config_dict(
        tmp_path, store_id, broker, sync=sync_section(url, token, **sync), model=COLLECT_ONLY
    )


def uploader_of(agent: RunningAgent) -> Uploader:
    return next(part for part in agent.components if isinstance(part, Uploader))


async def publish(broker: Broker, topic: str, ids: list[str]) -> None:
    publisher = Publisher(broker.host, broker.port)
    try:
        for event_id in ids:
            publisher.publish(topic, pickup(event_id, customer_id="c-1"))
        await asyncio.to_thread(publisher.wait_all, 30)
    finally:
        publisher.close()


def upload_retry_delays(caplog: pytest.LogCaptureFixture) -> list[float]:
    found = (re.search(r"retry_in_s=([\d.]+) detail=POST", r.getMessage()) for r in caplog.records)
    return [float(match.group(1)) for match in found if match]


async def test_the_uploader_resumes_when_the_store_answers_not_when_its_backoff_ends(
    store: StoreProcess,
    tmp_path: Path,
    store_id: str,
    mqtt_broker: Broker,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="cloud_sync.uploader")
    # The first retry already waits 20..40 s: only a probe can end it within the test's bound.
    document = document_for(
        tmp_path, store_id, mqtt_broker, store, store.url, backoff_initial_s=40, backoff_max_s=60
    )
    topic = event_topic(store_id)
    async with agent_running(document) as agent:
        uploader = uploader_of(agent)
        await publish(mqtt_broker, topic, ["w-0"])
        await eventually(lambda: agent.buffer.counters.pending == 0, 15)
        await asyncio.to_thread(store.stop)
        await publish(mqtt_broker, topic, [f"w-{n}" for n in range(1, 6)])
        await eventually(lambda: uploader.stats.errors >= 1, 15)
        [delay] = upload_retry_delays(caplog)
        assert delay >= 20.0  # a long backoff is under way
        await asyncio.to_thread(store.start)  # the same port
        await eventually(lambda: agent.buffer.counters.pending == 0, 10)
    assert any("sync.store.back" in r.getMessage() for r in caplog.records)
    assert await stored_count(store.db_url) == 6


async def test_a_backlog_that_builds_during_a_round_shows_its_progress(
    store: StoreProcess,
    tmp_path: Path,
    store_id: str,
    mqtt_broker: Broker,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="cloud_sync.uploader")
    proxy = TcpProxy(store.port)
    await proxy.start()
    document = document_for(tmp_path, store_id, mqtt_broker, store, proxy.url)
    topic = event_topic(store_id)
    try:
        async with agent_running(document) as agent:
            uploader = uploader_of(agent)
            uploader.progress_from_events = 100
            uploader.progress_log_every_s = 0.0
            await proxy.cut()
            await publish(mqtt_broker, topic, [f"p-{n}" for n in range(5)])
            # A round with 5 events starts and retries its first batch through the outage;
            # meanwhile the backlog grows past the progress threshold.
            await eventually(lambda: uploader.stats.errors >= 1, 15)
            await publish(mqtt_broker, topic, [f"q-{n}" for n in range(200)])
            await proxy.start()
            await eventually(lambda: agent.buffer.counters.pending == 0, 30)
    finally:
        await proxy.cut()
    messages = [r.getMessage() for r in caplog.records]
    assert any(m.startswith("sync.drain.start backlog=") for m in messages)
    assert any(m.startswith("sync.drain.progress sent=") for m in messages)


async def test_sync_lag_is_not_fooled_by_a_wall_clock_step(
    store: StoreProcess, tmp_path: Path, store_id: str, mqtt_broker: Broker
) -> None:
    proxy = TcpProxy(store.port)
    await proxy.start()
    await proxy.cut()  # the store is unreachable: the backlog waits
    document = document_for(tmp_path, store_id, mqtt_broker, store, proxy.url)
    try:
        async with agent_running(document) as agent:
            await publish(mqtt_broker, event_topic(store_id), ["l-1", "l-2"])
            await eventually(lambda: agent.buffer.counters.pending >= 2, 10)
            before = (await agent.board.snapshot())["sync"]["lag_s"]
            lags = []
            for step in (timedelta(days=1), timedelta(days=-1)):
                with time_machine.travel(datetime.now(UTC) + step, tick=True):
                    lags.append((await agent.board.snapshot())["sync"]["lag_s"])
            after = (await agent.board.snapshot())["sync"]["lag_s"]
    finally:
        await proxy.cut()
    assert before is not None
    assert before <= lags[0] <= lags[1] <= after  # it only ever grows while nothing syncs
    assert after < 3600  # a day's step of the wall clock moved none of it
