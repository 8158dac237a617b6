"""/metrics of a real agent process: promtool-clean, reasons from zero, nothing counted twice."""

from __future__ import annotations

import json
import time
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from edge_agent.status import reasons
from tests.conftest import agent_config_dict
from tests.support.agent import (
    AgentProcess,
    Publisher,
    event_topic,
    http_get,
    pickup,
    wait_http_ready,
    write_config,
)
from tests.support.broker import AmqttBroker, MosquittoBroker, free_port
from tests.support.promtool import check_metrics

Broker = MosquittoBroker | AmqttBroker


def _samples(exposition: str) -> dict[str, list[Sample]]:
    found: dict[str, list[Sample]] = {}
    for family in text_string_to_metric_families(exposition):
        for sample in family.samples:
            found.setdefault(sample.name, []).append(sample)
    return found


def _status(port: int) -> dict[str, object]:
    code, body = http_get(f"http://127.0.0.1:{port}/status")
    assert code == 200
    status: dict[str, object] = json.loads(body)
    return status


def _wait(predicate: object, within_s: float, what: str) -> None:
    deadline = time.monotonic() + within_s
    while not predicate():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        time.sleep(0.05)


def test_a_real_agents_metrics_pass_promtool_and_start_every_reason_at_zero(
    tmp_path: Path, store_id: str, mqtt_broker: Broker
) -> None:
    http_port = free_port()
    document = agent_config_dict(
        tmp_path,
        store_id,
        mqtt_broker,
        http={"port": http_port},
        model={"epsilon": 0.0, "popularity_refresh_s": 0.1},
    )
    agent = AgentProcess(write_config(tmp_path / "agent.toml", document))
    publisher = Publisher(mqtt_broker.host, mqtt_broker.port)
    agent.start()
    try:
        wait_http_ready(f"http://127.0.0.1:{http_port}/readyz", 60)
        consent = {
            "event_id": "consent-1",
            "type": "consent.update",
            "customer_id": "c-1",
            "data": {"personalization": True, "profile_sharing": True, "partner_sharing": False},
        }
        publisher.publish(event_topic(store_id), json.dumps(consent))
        for n in range(3):
            publisher.publish(event_topic(store_id), pickup(f"ev-{n}", sku=f"SKU-00001{n}"))
        publisher.publish(event_topic(store_id), b"nonsense")
        publisher.wait_all()
        _wait(
            lambda: _status(http_port)["suggestions"]["shown"] >= 3,  # type: ignore[index]
            30,
            "three suggestions shown",
        )
        _wait(
            lambda: _status(http_port)["quarantine"]["total"] == 1,  # type: ignore[index]
            30,
            "the bad input quarantined",
        )
        time.sleep(1.2)  # the oldest pending event ages: no lag gauge may follow it
        code, body = http_get(f"http://127.0.0.1:{http_port}/metrics")
        assert code == 200
        status = _status(http_port)
        assert agent.terminate() == 0
    finally:
        publisher.close()
        agent.ensure_dead()

    lint = check_metrics(body)
    assert lint.returncode == 0, lint.stdout + lint.stderr
    assert lint.stdout + lint.stderr == ""

    samples = _samples(body.decode())
    (build,) = samples["edge_agent_build_info"]
    assert build.labels["version"] == status["version"]
    assert "process_resident_memory_bytes" in samples
    assert "python_info" in samples
    assert "python_gc_collections_total" in samples

    quarantined = {s.labels["reason"]: s.value for s in samples["edge_quarantined_total"]}
    assert set(reasons.QUARANTINE_REASONS) <= set(quarantined)
    assert quarantined["not_json"] == 1
    assert quarantined["poison"] == 0
    dropped = {s.labels["reason"] for s in samples["edge_dropped_total"]}
    assert {"synced_evicted", "mqtt.qos0_overflow", "mqtt-telemetry.qos0_overflow"} <= dropped
    holds = {s.labels["reason"] for s in samples["edge_buffer_holds_total"]}
    assert {"backpressure", "disk_full"} <= holds
    suggestion_drops = {s.labels["reason"] for s in samples["edge_suggestions_dropped_total"]}
    assert set(reasons.SUGGESTION_DROP_REASONS) <= suggestion_drops

    # Latency is a histogram in seconds; the old millisecond gauge with a quantile is gone.
    assert "edge_suggestion_latency_ms" not in samples
    (count,) = samples["edge_suggestion_latency_seconds_count"]
    assert count.value == status["suggestions"]["shown"]  # type: ignore[index]
    buckets = samples["edge_suggestion_latency_seconds_bucket"]
    assert buckets[-1].labels["le"] == "+Inf"
    assert buckets[-1].value == count.value

    # Suggestions shown are counted by one family; its sum is the /status total.
    shown = samples["edge_suggestions_shown_total"]
    assert sum(s.value for s in shown) == status["suggestions"]["shown"]  # type: ignore[index]
    assert all(set(s.labels) == {"model_version", "source"} for s in shown)
    for gone in ("edge_suggestions_by_source_total", "edge_suggestions_shown_by_version_total"):
        assert gone not in samples

    # Sync off: no lag gauge that only grows; the buffer's own age says what waits.
    assert samples["edge_sync_enabled"][0].value == 0
    assert "edge_sync_lag_seconds" not in samples
    assert samples["edge_buffer_oldest_pending_age_seconds"][0].value > 1.0
    assert status["sync"]["lag_s"] > 1.0  # type: ignore[index]  # /status keeps its figure
