"""The MQTT source against a real broker: commit, then acknowledge; bad input; restarts."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from tests.conftest import COLLECT_ONLY, agent_config_dict
from tests.support.agent import (
    Publisher,
    agent_running,
    buffered_event_ids,
    event_topic,
    http_get,
    pickup,
    quarantine_reasons,
    telemetry_topic,
    wait_until,
)
from tests.support.broker import AmqttBroker, MosquittoBroker
from tests.support.services import missing_service


async def test_events_are_committed_and_acknowledged_once(
    tmp_path: Path, store_id: str, mqtt_broker: MosquittoBroker | AmqttBroker
) -> None:
    document = agent_config_dict(tmp_path, store_id, mqtt_broker, model=COLLECT_ONLY)
    db = tmp_path / "data" / "buffer.db"
    publisher = Publisher(mqtt_broker.host, mqtt_broker.port)
    try:
        async with agent_running(document) as agent:
            for n in range(300):
                publisher.publish(event_topic(store_id), pickup(f"ev-{n}"))
            publisher.publish(telemetry_topic(store_id), b'{"values": {"temp_c": 4.2}}')
            await asyncio.to_thread(publisher.wait_all)
            await wait_until(lambda: agent.buffer.counters.committed == 301, 20)
            assert sum(s.stats.received for s in agent.sources) == 301
            assert sum(s.stats.accepted for s in agent.sources) == 301
            events, telemetry = agent.sources[0].stats, agent.sources[1].stats
            assert (events.received, telemetry.received) == (300, 1)  # one connection each
        # A restart on the same persistent session gets nothing again: every message was acked.
        async with agent_running(document) as agent:
            await asyncio.sleep(1.5)
            assert sum(s.stats.received for s in agent.sources) == 0
            assert agent.buffer.counters.duplicates == 0
    finally:
        publisher.close()
    stored = buffered_event_ids(db)
    assert len(stored) == 301
    assert {i for i in stored if i.startswith("ev-")} == {f"ev-{n}" for n in range(300)}


BAD_CORPUS: list[tuple[str, bytes, str]] = [
    ("events", b"\x00\xff\xfe\x80 binary noise \x81\x82", "not_utf8"),
    ("events", b'{"type": "product.pickup", "data": {"sku": "SKU-1"', "not_json"),
    ("events", b"{" + b'"a": "' + b"x" * (2 * 1024 * 1024) + b'"}', "too_large"),
    ("events", b'{"type": "product.pickup", "data": {"sku": 42}}', "wrong_type"),
    ("events", b'{"type": "product.teleport", "data": {}}', "unknown_type"),
    ("events", b'{"type": "product.pickup"}', "missing_field"),
    ("events", b"[" * 500 + b"]" * 500, "too_deep"),
    (
        "events",
        b'{"type": "kiosk.view", "ts": "2199-01-01T00:00:00Z", "data": {}}',
        "absurd_timestamp",
    ),
    ("telemetry", b'{"values": "hot"}', "wrong_type"),
]


async def test_bad_payloads_are_quarantined_and_the_agent_stays_healthy(
    tmp_path: Path, store_id: str, mqtt_broker: MosquittoBroker | AmqttBroker
) -> None:
    document = agent_config_dict(tmp_path, store_id, mqtt_broker, model=COLLECT_ONLY)
    publisher = Publisher(mqtt_broker.host, mqtt_broker.port)
    try:
        async with agent_running(document) as agent:
            for channel, payload, _ in BAD_CORPUS:
                topic = event_topic(store_id) if channel == "events" else telemetry_topic(store_id)
                publisher.publish(topic, payload)
            publisher.publish(event_topic(store_id), pickup("good-after-bad"))
            await asyncio.to_thread(publisher.wait_all)
            await wait_until(
                lambda: (
                    agent.buffer.counters.committed == 1
                    and sum(agent.buffer.counters.quarantined.values()) == len(BAD_CORPUS)
                ),
                20,
            )
            base = f"http://127.0.0.1:{agent.status.port}"
            assert (await asyncio.to_thread(http_get, base + "/healthz"))[0] == 200
            assert (await asyncio.to_thread(http_get, base + "/readyz"))[0] == 200
            status = json.loads((await asyncio.to_thread(http_get, base + "/status"))[1])
            assert status["quarantine"]["total"] == len(BAD_CORPUS)
            assert status["sources"]["mqtt"]["quarantined"] == len(BAD_CORPUS) - 1
            assert status["sources"]["mqtt-telemetry"]["quarantined"] == 1
    finally:
        publisher.close()
    db = tmp_path / "data" / "buffer.db"
    # Events and telemetry arrive on two connections: order holds within each, not across.
    assert sorted(quarantine_reasons(db)) == sorted(reason for _, _, reason in BAD_CORPUS)
    assert buffered_event_ids(db) == ["good-after-bad"]


async def test_broker_restart_mid_stream_loses_nothing(
    tmp_path: Path, store_id: str, private_broker: MosquittoBroker | AmqttBroker
) -> None:
    if not private_broker.persistent:
        missing_service("broker restart needs mosquitto (amqtt keeps no messages across a restart)")
    document = agent_config_dict(tmp_path, store_id, private_broker, model=COLLECT_ONLY)
    total = 3000
    async with agent_running(document) as agent:
        publisher = Publisher(private_broker.host, private_broker.port, client_id=f"pub-{store_id}")
        try:
            for n in range(total // 2):
                publisher.publish(event_topic(store_id), pickup(f"ev-{n}"))
            await asyncio.to_thread(publisher.wait_all)
            await asyncio.to_thread(private_broker.restart)
            await wait_until(lambda: all(s.stats.connected for s in agent.sources), 20)
            await wait_until(publisher.client.is_connected, 20)
            for n in range(total // 2, total):
                publisher.publish(event_topic(store_id), pickup(f"ev-{n}"))
            await asyncio.to_thread(publisher.wait_all, 60)
        finally:
            publisher.close()
        await wait_until(lambda: agent.buffer.counters.committed >= total, 30)
    ids = buffered_event_ids(tmp_path / "data" / "buffer.db")
    assert sorted(ids) == sorted(f"ev-{n}" for n in range(total))


async def test_readiness_reports_a_lost_broker_and_recovers(
    tmp_path: Path, store_id: str, private_broker: MosquittoBroker | AmqttBroker
) -> None:
    document = agent_config_dict(tmp_path, store_id, private_broker, model=COLLECT_ONLY)
    async with agent_running(document) as agent:
        url = f"http://127.0.0.1:{agent.status.port}/readyz"
        assert (await asyncio.to_thread(http_get, url))[0] == 200
        await asyncio.to_thread(private_broker.stop)
        await wait_until(lambda: not agent.sources[0].stats.connected, 20)
        status, body = await asyncio.to_thread(http_get, url)
        assert status == 503
        assert "source mqtt is not connected" in json.loads(body)["reasons"]
        await asyncio.to_thread(private_broker.restart)
        await wait_until(lambda: all(s.stats.connected for s in agent.sources), 20)
        assert (await asyncio.to_thread(http_get, url))[0] == 200


@pytest.mark.parametrize("qos", [0, 1])
async def test_status_and_metrics_carry_the_contract_fields(
    tmp_path: Path, store_id: str, mqtt_broker: MosquittoBroker | AmqttBroker, qos: int
) -> None:
    document = agent_config_dict(
        tmp_path, store_id, mqtt_broker, model=COLLECT_ONLY, mqtt={"qos": qos}
    )
    publisher = Publisher(mqtt_broker.host, mqtt_broker.port)
    try:
        async with agent_running(document) as agent:
            for n in range(20):
                publisher.publish(event_topic(store_id), pickup(f"ev-{n}"), qos=qos)
            publisher.publish(event_topic(store_id), b"nonsense", qos=qos)
            await asyncio.to_thread(publisher.wait_all)
            await wait_until(lambda: agent.buffer.counters.committed == 20, 20)
            await wait_until(lambda: sum(agent.buffer.counters.quarantined.values()) == 1, 20)
            base = f"http://127.0.0.1:{agent.status.port}"
            status = json.loads((await asyncio.to_thread(http_get, base + "/status"))[1])
            metrics = (await asyncio.to_thread(http_get, base + "/metrics"))[1].decode()
            page = (await asyncio.to_thread(http_get, base + "/"))[1].decode()
    finally:
        publisher.close()
    assert status["version"]
    assert status["uptime_s"] > 0
    assert status["sources"]["mqtt"] == {
        "received": 21,
        "accepted": 20,
        "quarantined": 1,
        "connected": True,
    }
    buffer = status["buffer"]
    assert (buffer["pending"], buffer["total"]) == (20, 20)
    assert buffer["bytes"] > 0
    assert buffer["oldest_pending_age_s"] >= 0
    assert status["quarantine"] == {"total": 1, "by_reason": {"not_json": 1}}
    assert status["drops"] == {"total": 0, "by_reason": {}}
    assert set(status["sync"]) >= {"lag_s", "sent", "last_success"}
    assert set(status["model"]) >= {"version", "source"}
    assert set(status["suggestions"]) >= {"shown", "accepted"}
    from prometheus_client.parser import text_string_to_metric_families

    families = {f.name: f for f in text_string_to_metric_families(metrics)}
    received = families["edge_source_received"].samples[0]
    assert received.labels == {"source": "mqtt"}
    assert received.value == 21
    assert families["edge_buffer_pending_events"].samples[0].value == 20
    quarantined = {s.labels["reason"]: s.value for s in families["edge_quarantined"].samples}
    assert quarantined["not_json"] == 1
    assert sum(quarantined.values()) == 1  # every other known reason is exported at 0
    assert "<title>Edge agent</title>" in page


async def test_backpressure_stops_acknowledging_and_says_so(
    tmp_path: Path, store_id: str, mqtt_broker: MosquittoBroker | AmqttBroker
) -> None:
    document = agent_config_dict(
        tmp_path, store_id, mqtt_broker, model=COLLECT_ONLY, buffer={"max_bytes": 1024 * 1024}
    )
    publisher = Publisher(mqtt_broker.host, mqtt_broker.port)
    big = "x" * 900
    try:
        async with agent_running(document) as agent:
            for n in range(2500):  # ~2.5 MB of customer events into a 1 MiB budget
                publisher.publish(event_topic(store_id), pickup(f"ev-{n}", sku=f"{big}{n}"))
            await wait_until(lambda: agent.buffer.counters.backpressure, 30)
            url = f"http://127.0.0.1:{agent.status.port}/readyz"
            status, body = await asyncio.to_thread(http_get, url)
            assert status == 503
            assert "backpressure" in json.loads(body)["reasons"][0]
            stalled_at = agent.buffer.counters.committed
            await asyncio.sleep(1.0)
            assert agent.buffer.counters.committed == stalled_at  # nothing more taken in
            assert agent.buffer.counters.drops == {}  # no customer event was dropped
            # The uploader marks everything synced: the policy may now evict, input resumes.
            for _ in range(20):
                seqs = await agent.buffer.call(
                    lambda c: [
                        r[0]
                        for r in c.execute(
                            "SELECT seq FROM events WHERE synced_at IS NULL LIMIT 5000"
                        )
                    ]
                )
                await agent.buffer.mark_synced(seqs)
                if agent.buffer.counters.committed >= 2500:
                    break
                await asyncio.sleep(0.5)
            await asyncio.to_thread(publisher.wait_all, 60)
            await wait_until(lambda: agent.buffer.counters.committed == 2500, 30)
            assert agent.buffer.counters.drops["synced_evicted"] > 0
            assert (await asyncio.to_thread(http_get, url))[0] == 200
    finally:
        publisher.close()
