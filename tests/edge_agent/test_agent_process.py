"""The agent as a real process: kill -9 under load, SIGTERM, systemd notifications, serial."""

from __future__ import annotations

import json
import os
import random
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.conftest import COLLECT_ONLY, agent_config_dict
from tests.support.agent import (
    AgentProcess,
    Publisher,
    buffered_event_ids,
    event_topic,
    pickup,
    wait_http_ready,
    write_config,
)
from tests.support.broker import AmqttBroker, MosquittoBroker, free_port
from tests.support.services import missing_service


def _wait_for_count(db: Path, expected: int, timeout: float) -> list[str]:
    deadline = time.monotonic() + timeout
    found: list[str] = []
    while time.monotonic() < deadline:
        found = buffered_event_ids(db)
        if len(found) >= expected:
            return found
        time.sleep(0.2)
    return found


@pytest.mark.usefixtures("mqtt_client")  # both clients: paho and awscrt
def test_kill_9_at_random_moments_loses_nothing_and_stores_nothing_twice(
    tmp_path: Path, store_id: str, private_broker: MosquittoBroker | AmqttBroker
) -> None:
    if not private_broker.persistent:
        missing_service("kill -9 test needs mosquitto's persistent sessions")
    http_port = free_port()
    document = agent_config_dict(
        tmp_path, store_id, private_broker, model=COLLECT_ONLY, http={"port": http_port}
    )
    config = write_config(tmp_path / "agent.toml", document)
    db = tmp_path / "data" / "buffer.db"
    agent = AgentProcess(config)
    total = 20_000
    expected = [f"ev-{n:06d}" for n in range(total)]
    publisher = Publisher(private_broker.host, private_broker.port)
    rng = random.Random(20_000)
    published = threading.Event()

    def publish_all() -> None:
        for event_id in expected:
            publisher.publish(event_topic(store_id), pickup(event_id))
        publisher.wait_all(timeout=240)
        published.set()

    try:
        agent.start()
        wait_http_ready(f"http://127.0.0.1:{http_port}/readyz")
        writer = threading.Thread(target=publish_all, daemon=True)
        writer.start()
        kills = kills_mid_stream = 0
        for _ in range(4):  # kill -9 at random moments while the publisher runs
            time.sleep(rng.uniform(0.3, 1.5))
            agent.kill()
            kills += 1
            kills_mid_stream += not published.is_set()
            time.sleep(rng.uniform(0.0, 0.5))
            agent.start()
            wait_http_ready(f"http://127.0.0.1:{http_port}/readyz")
        writer.join(240)
        assert published.is_set(), "the broker did not take every publish"
        found = _wait_for_count(db, total, 180)
        assert agent.terminate() == 0
    finally:
        agent.ensure_dead()
        publisher.close()
    assert kills == 4
    assert kills_mid_stream >= 1
    assert len(found) == len(set(found)), "an event was stored twice"
    assert sorted(found) == expected


@pytest.mark.usefixtures("mqtt_client")  # both clients: paho and awscrt
def test_sigterm_commits_and_acknowledges_in_flight_then_exits_0(
    tmp_path: Path, store_id: str, mqtt_broker: MosquittoBroker | AmqttBroker
) -> None:
    if not mqtt_broker.persistent:
        # amqtt 0.12 does not redeliver a resumed session's unacknowledged QoS 1 messages.
        missing_service("redelivery after a restart needs mosquitto's persistent sessions")
    http_port = free_port()
    document = agent_config_dict(
        tmp_path, store_id, mqtt_broker, model=COLLECT_ONLY, http={"port": http_port}
    )
    config = write_config(tmp_path / "agent.toml", document)
    agent = AgentProcess(config)
    publisher = Publisher(mqtt_broker.host, mqtt_broker.port)
    try:
        agent.start()
        wait_http_ready(f"http://127.0.0.1:{http_port}/readyz")
        for n in range(3000):
            publisher.publish(event_topic(store_id), pickup(f"ev-{n}"))
        publisher.wait_all(60)
        started = time.monotonic()
        code = agent.terminate(timeout=15)
        stopped_in = time.monotonic() - started
        committed_first = len(buffered_event_ids(tmp_path / "data" / "buffer.db"))
        # Whatever was not committed was not acknowledged: a restart on the same session
        # receives it again, so the total ends up complete.
        agent.start()
        wait_http_ready(f"http://127.0.0.1:{http_port}/readyz")
        found = _wait_for_count(tmp_path / "data" / "buffer.db", 3000, 30)
        assert agent.terminate() == 0
    finally:
        agent.ensure_dead()
        publisher.close()
    assert code == 0
    assert stopped_in < 12
    assert committed_first > 0
    assert sorted(found) == sorted(f"ev-{n}" for n in range(3000))


def test_systemd_ready_watchdog_and_stopping(
    tmp_path: Path, store_id: str, mqtt_broker: MosquittoBroker | AmqttBroker
) -> None:
    notify_path = tmp_path / "notify.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(str(notify_path))
    listener.settimeout(1.0)
    http_port = free_port()
    document = agent_config_dict(
        tmp_path, store_id, mqtt_broker, model=COLLECT_ONLY, http={"port": http_port}
    )
    config = write_config(tmp_path / "agent.toml", document)
    agent = AgentProcess(config, env={"NOTIFY_SOCKET": str(notify_path), "WATCHDOG_USEC": "400000"})
    messages: list[str] = []
    try:
        agent.start()
        assert agent.process is not None
        os.environ.pop("WATCHDOG_PID", None)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and sum("WATCHDOG=1" in m for m in messages) < 3:
            try:
                messages.append(listener.recv(4096).decode())
            except TimeoutError:
                continue
        ready_seen_with_buffer = (tmp_path / "data" / "buffer.db").exists()
        assert agent.terminate() == 0
        while True:
            try:
                messages.append(listener.recv(4096).decode())
            except (TimeoutError, OSError):
                break
    finally:
        agent.ensure_dead()
        listener.close()
    assert messages[0] == "READY=1"
    assert ready_seen_with_buffer
    assert sum(m.startswith("WATCHDOG=1") for m in messages) >= 3
    assert any("STATUS=pending=" in m for m in messages)
    assert messages[-1] == "STOPPING=1"


def test_serial_device_through_the_agent_survives_kill_9(
    tmp_path: Path, store_id: str, mqtt_broker: MosquittoBroker | AmqttBroker
) -> None:
    link = tmp_path / "shelf-07"
    sim = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "firmware_bridge.sim",
            "--device-id",
            "shelf-07",
            "--events",
            "400",
            "--rate",
            "200",
            "--link",
            str(link),
            "--timeout",
            "90",
            "--seed",
            "3",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    http_port = free_port()
    document = agent_config_dict(
        tmp_path, store_id, mqtt_broker, model=COLLECT_ONLY, http={"port": http_port}
    )
    document["serial"] = {}
    config_path = tmp_path / "agent.toml"
    write_config(config_path, document)
    with config_path.open("a") as config_file:
        config_file.write(f'[[serial.ports]]\nurl = "{link}"\n')
    agent = AgentProcess(config_path)
    db = tmp_path / "data" / "buffer.db"
    try:
        assert sim.stdout is not None
        first_line = sim.stdout.readline().strip()
        assert first_line == str(link)
        agent.start()
        deadline = time.monotonic() + 30
        while len(buffered_event_ids(db)) < 100 and time.monotonic() < deadline:
            time.sleep(0.05)
        agent.kill()  # mid-stream: some events are committed, some only held by the device
        held_at_kill = len(buffered_event_ids(db))
        agent.start()
        out, _ = sim.communicate(timeout=90)
        summary = json.loads(out.strip().splitlines()[-1])
        found = _wait_for_count(db, 400, 20)
        assert agent.terminate() == 0
    finally:
        agent.ensure_dead()
        if sim.poll() is None:
            sim.kill()
            sim.wait(5)
    assert 100 <= held_at_kill < 400
    assert sim.returncode == 0
    assert summary["acked"] == 400
    assert len(found) == 400
    assert len(set(found)) == 400
