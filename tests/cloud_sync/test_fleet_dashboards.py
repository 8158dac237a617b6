"""Every metric the shipped alerts and dashboards name exists on a real agent's or store's
/metrics (a renamed family would leave a panel blank and an alert silent for good)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families
from sync_helpers import StoreProcess, store_cli, sync_section

from tests.conftest import agent_config_dict
from tests.support import deploy_queries
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

Broker = MosquittoBroker | AmqttBroker


def _names(exposition: bytes) -> set[str]:
    return {
        sample.name
        for family in text_string_to_metric_families(exposition.decode("utf-8"))
        for sample in family.samples
    }


def _status(port: int) -> dict[str, Any]:
    status: dict[str, Any] = json.loads(http_get(f"http://127.0.0.1:{port}/status")[1])
    return status


def _wait(predicate: Any, within_s: float, what: str) -> None:
    deadline = time.monotonic() + within_s
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        time.sleep(0.1)


def test_every_metric_in_the_alerts_and_dashboards_is_exported(
    sqlite_url: str, tmp_path: Path, store_id: str, mqtt_broker: Broker
) -> None:
    token = store_cli(sqlite_url, "token", "create", "--store", store_id)
    store = StoreProcess(sqlite_url, tmp_path / "store.log")
    store.start()
    http_port = free_port()
    document = agent_config_dict(
        tmp_path,
        store_id,
        mqtt_broker,
        http={"port": http_port},
        model={"epsilon": 0.0},
        sync=sync_section(store.url, token, heartbeat_interval_s=1.0),
    )
    agent = AgentProcess(write_config(tmp_path / "agent.toml", document))
    publisher = Publisher(mqtt_broker.host, mqtt_broker.port)
    try:
        agent.start()
        wait_http_ready(f"http://127.0.0.1:{http_port}/readyz", 60)
        consent = {
            "event_id": "consent-1",
            "type": "consent.update",
            "customer_id": "c-1",
            "data": {"personalization": True, "profile_sharing": True, "partner_sharing": False},
        }
        publisher.publish(event_topic(store_id), json.dumps(consent))
        publisher.publish(event_topic(store_id), pickup("trigger-1", sku="SKU-000010"))
        publisher.wait_all()
        _wait(lambda: _status(http_port)["suggestions"]["shown"] >= 1, 30, "a suggestion")
        _wait(lambda: _status(http_port)["sync"]["lag_s"] == 0.0, 30, "the upload drained")
        _wait(
            lambda: _status(http_port)["heartbeat"]["store_clock_skew_s"] is not None,
            30,
            "a heartbeat",
        )
        exported = _names(http_get(f"http://127.0.0.1:{http_port}/metrics")[1])
        exported |= _names(http_get(f"{store.url}/metrics")[1])
        assert agent.terminate() == 0
    finally:
        publisher.close()
        agent.ensure_dead()
        store.stop()

    named = deploy_queries.metric_names(deploy_queries.alert_expressions())
    for path in deploy_queries.DASHBOARDS:
        named |= deploy_queries.metric_names(deploy_queries.dashboard_expressions(path))
    assert len(named) > 30
    assert sorted(named - exported) == []
