"""Health means progress: /status never waits on the writer; a stuck or dead writer and
input that waits with no commit make /healthz and /readyz 503; ages ignore clock steps."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import sqlite3
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from edge_agent.errors import StorageError
from tests.conftest import COLLECT_ONLY, agent_config_dict
from tests.support.agent import (
    Publisher,
    agent_running,
    event_topic,
    http_get,
    pickup,
    wait_until,
)
from tests.support.broker import AmqttBroker, MosquittoBroker

STALL_S = 0.5


@contextlib.asynccontextmanager
async def _released_at_exit(release: threading.Event) -> AsyncIterator[None]:
    try:
        yield
    finally:
        release.set()  # before the agent stops: its writer must not stay blocked


def get_json(url: str) -> tuple[int, dict[str, Any]]:
    # The 5 s timeout is a bound, not a timing goal: before the fix /status never answered.
    status, body = http_get(url, timeout=5.0)
    return status, json.loads(body)


async def test_status_answers_and_health_reports_a_stuck_writer(
    tmp_path: Path, store_id: str, mqtt_broker: MosquittoBroker | AmqttBroker
) -> None:
    document = agent_config_dict(
        tmp_path, store_id, mqtt_broker, model=COLLECT_ONLY, agent={"stall_after_s": STALL_S}
    )
    publisher = Publisher(mqtt_broker.host, mqtt_broker.port)
    release = threading.Event()
    try:
        async with agent_running(document) as agent, _released_at_exit(release):
            base = f"http://127.0.0.1:{agent.status.port}"
            publisher.publish(event_topic(store_id), pickup("ev-before"))
            await wait_until(lambda: agent.buffer.counters.committed == 1, 20)
            assert (await asyncio.to_thread(get_json, base + "/healthz"))[0] == 200
            # A job of the test's own holds the writer (as a 100k burst or a wedge would).
            blocker = asyncio.ensure_future(agent.buffer._call(lambda c: release.wait(60)))
            await wait_until(lambda: agent.buffer.busy_since is not None, 5)
            publisher.publish(event_topic(store_id), pickup("ev-waiting"))
            await wait_until(agent.pipeline.waiting_since, 10)
            status, body = await asyncio.to_thread(get_json, base + "/status")
            assert status == 200
            assert body["buffer"]["total"] == 1
            assert body["buffer"]["pending"] == 1

            def healthz() -> tuple[int, dict[str, Any]]:
                return get_json(base + "/healthz")

            await wait_until(lambda: len(agent.board.health.problems()) == 2, 10)
            status, body = await asyncio.to_thread(healthz)
            assert status == 503
            problems = " | ".join(body["problems"])
            assert "buffer writer stuck on one job" in problems
            assert "source mqtt has input waiting" in problems
            status, body = await asyncio.to_thread(get_json, base + "/readyz")
            assert status == 503
            release.set()
            await asyncio.wait_for(blocker, 10)
            await wait_until(lambda: agent.buffer.counters.committed == 2, 20)
            assert (await asyncio.to_thread(healthz))[0] == 200
    finally:
        release.set()
        publisher.close()


async def test_a_dead_writer_is_unhealthy_and_not_ready(
    tmp_path: Path, store_id: str, mqtt_broker: MosquittoBroker | AmqttBroker
) -> None:
    document = agent_config_dict(tmp_path, store_id, mqtt_broker, model=COLLECT_ONLY)
    async with agent_running(document) as agent:
        base = f"http://127.0.0.1:{agent.status.port}"

        def bug(connection: sqlite3.Connection) -> None:
            raise SystemExit("a bug that ends the thread")

        with pytest.raises(StorageError):
            await agent.buffer._call(bug)
        await wait_until(lambda: not agent.buffer.writer_alive, 10)
        for path in ("/healthz", "/readyz"):
            status, body = await asyncio.to_thread(get_json, base + path)
            assert status == 503
            assert "buffer writer is not running" in json.dumps(body)
        status, body = await asyncio.to_thread(get_json, base + "/status")
        assert status == 200
        assert body["health"]["ok"] is False
        assert body["buffer"]["writer_alive"] is False
        # Requests in flight at shutdown: agent_running bounds the stop at 20 s (it hung
        # 60 s in the status server's shutdown while /status waited on the dead writer).
        in_flight = [
            socket.create_connection(("127.0.0.1", agent.status.port), timeout=5) for _ in range(2)
        ]
        in_flight[0].sendall(b"GET /status HTTP/1.1\r\nHost: x\r\n\r\n")
        in_flight[1].sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")  # half a request
    for connection in in_flight:
        connection.close()


async def test_pending_age_does_not_follow_a_wall_clock_step(
    tmp_path: Path,
    store_id: str,
    mqtt_broker: MosquittoBroker | AmqttBroker,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    document = agent_config_dict(tmp_path, store_id, mqtt_broker, model=COLLECT_ONLY)
    publisher = Publisher(mqtt_broker.host, mqtt_broker.port)
    try:
        async with agent_running(document) as agent:
            publisher.publish(event_topic(store_id), pickup("ev-1"))
            await wait_until(lambda: agent.buffer.counters.committed == 1, 20)
            before = (await agent.board.snapshot())["buffer"]["oldest_pending_age_s"]
            real_time = time.time
            monkeypatch.setattr(time, "time", lambda: real_time() + 3 * 3600)  # NTP steps
            after = (await agent.board.snapshot())["buffer"]["oldest_pending_age_s"]
            monkeypatch.undo()
    finally:
        publisher.close()
    assert 0 <= before <= after < 600  # the age grows with elapsed time, not the step


async def test_watchdog_is_withheld_while_the_writer_is_stuck(
    tmp_path: Path,
    store_id: str,
    mqtt_broker: MosquittoBroker | AmqttBroker,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    notify_path = tmp_path / "notify.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(str(notify_path))
    listener.setblocking(False)
    monkeypatch.setenv("NOTIFY_SOCKET", str(notify_path))
    monkeypatch.setenv("WATCHDOG_USEC", "200000")  # a ping every 0.1 s
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    document = agent_config_dict(
        tmp_path, store_id, mqtt_broker, model=COLLECT_ONLY, agent={"stall_after_s": STALL_S}
    )
    release = threading.Event()

    def pings() -> int:
        count = 0
        while True:
            try:
                count += listener.recv(4096).startswith(b"WATCHDOG=1")
            except BlockingIOError:
                return count

    try:
        async with agent_running(document) as agent, _released_at_exit(release):
            await wait_until(lambda: pings() > 0, 10)
            blocker = asyncio.ensure_future(agent.buffer._call(lambda c: release.wait(60)))
            await wait_until(lambda: "watchdog.withheld" in caplog.text, 10)
            pings()  # drop what was sent before the stall was seen
            withheld = caplog.text.count("watchdog.withheld")
            await wait_until(lambda: caplog.text.count("watchdog.withheld") >= withheld + 3, 10)
            assert pings() == 0  # three watchdog rounds, not one ping
            assert "buffer writer stuck on one job" in caplog.text
            release.set()
            await asyncio.wait_for(blocker, 10)
            await wait_until(lambda: pings() > 0, 10)  # progress again: pings resume
    finally:
        release.set()
        listener.close()
