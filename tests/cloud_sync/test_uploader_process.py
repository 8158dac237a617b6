"""A real ``edge-agent run`` process killed with -9 while it syncs, then restarted.

Whatever the agent had posted but not yet marked synced when it died is posted again after
the restart; the store must still hold every published event exactly once.
"""

from __future__ import annotations

import json
import random
import threading
import time
from pathlib import Path

from sync_helpers import StoreProcess, store_cli, store_event_ids, store_events, sync_section

from tests.conftest import agent_config_dict
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
from tests.support.services import missing_service

TOTAL = 600
KILLS = 3


def sync_status(port: int) -> dict[str, int]:
    status, body = http_get(f"http://127.0.0.1:{port}/status")
    assert status == 200
    sync: dict[str, int] = json.loads(body)["sync"]
    return sync


def test_agent_kill_9_mid_sync_then_restart_stores_every_event_once(
    db_url: str, tmp_path: Path, store_id: str, mqtt_broker: MosquittoBroker | AmqttBroker
) -> None:
    if not mqtt_broker.persistent:
        missing_service("kill -9 test needs mosquitto's persistent sessions")
    token = store_cli(db_url, "token", "create", "--store", store_id)
    store = StoreProcess(db_url, tmp_path / "store.log")
    store.start()
    http_port = free_port()
    document = agent_config_dict(
        tmp_path,
        store_id,
        mqtt_broker,
        http={"port": http_port},
        sync=sync_section(store.url, token, batch_size=20, interval_s=0.2),
    )
    agent = AgentProcess(write_config(tmp_path / "agent.toml", document))
    publisher = Publisher(mqtt_broker.host, mqtt_broker.port)
    published = threading.Event()
    kills_done = threading.Event()
    count = [0]  # how many the stream published: at least TOTAL, on until the last kill
    rng = random.Random(KILLS)

    def publish_all() -> None:
        # A stream that outlasts the kills (bounded), so each kill lands while batches are
        # posted: a fast agent could otherwise sync everything before the last restart.
        deadline = time.monotonic() + 60
        n = 0
        while (n < TOTAL or not kills_done.is_set()) and time.monotonic() < deadline:
            publisher.publish(event_topic(store_id), pickup(f"k-{n:05d}", customer_id=f"c-{n % 9}"))
            n += 1
            if n % 25 == 0:
                publisher.wait_all(60)
                time.sleep(0.02)
        publisher.wait_all(60)
        count[0] = n
        published.set()

    try:
        agent.start()
        wait_http_ready(f"http://127.0.0.1:{http_port}/readyz")
        writer = threading.Thread(target=publish_all, daemon=True)
        writer.start()
        synced_before_kill = []
        for _ in range(KILLS):
            deadline = time.monotonic() + 15
            while int(sync_status(http_port)["sent"]) < 20 and time.monotonic() < deadline:
                time.sleep(0.05)
            synced_before_kill.append(int(sync_status(http_port)["sent"]))
            time.sleep(rng.uniform(0.0, 0.3))
            agent.kill()
            time.sleep(rng.uniform(0.0, 0.3))
            agent.start()
            wait_http_ready(f"http://127.0.0.1:{http_port}/readyz")
        kills_done.set()
        writer.join(90)
        assert published.is_set()
        deadline = time.monotonic() + 40
        while time.monotonic() < deadline:
            sync = sync_status(http_port)
            if sync["backlog"] == 0 and store_events(db_url) >= count[0]:
                break
            time.sleep(0.3)
        assert agent.terminate() == 0
    finally:
        agent.ensure_dead()
        publisher.close()
        store.stop()
    assert all(sent >= 20 for sent in synced_before_kill)  # each kill hit a syncing agent
    assert sync["backlog"] == 0
    # The store holds what the agent's buffer holds (published events, and the suggestions
    # the agent made), each exactly once: stats counts distinct events.
    buffered = buffered_event_ids(tmp_path / "data" / "buffer.db")
    stored = store_event_ids(db_url)
    assert store_events(db_url) == len(stored) == len(set(stored))
    assert sorted(stored) == sorted(buffered)
    assert count[0] >= TOTAL
    assert {f"k-{n:05d}" for n in range(count[0])} <= set(stored)
