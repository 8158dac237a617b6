"""The fleet view: real agents send heartbeats to a real store; stale ones come first."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from conftest import Tokens
from sync_helpers import StoreProcess, store_cli, sync_section

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


def _fleet_cli(db_url: str, *args: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "cloud_sync.store", "fleet", "--db", db_url, *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return done.stdout


def _fleet_json(db_url: str, *args: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in _fleet_cli(db_url, "--json", *args).splitlines()]


def _wait(predicate: Any, within_s: float, what: str) -> None:
    deadline = time.monotonic() + within_s
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        time.sleep(0.1)


def _get_json(url: str, token: str) -> Any:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


def test_agents_heartbeats_make_the_fleet_view_and_a_killed_agent_goes_stale_first(
    db_url: str, tmp_path: Path, store_id: str, mqtt_broker: Broker
) -> None:
    token = store_cli(db_url, "token", "create", "--store", store_id)
    other = f"{store_id}-b"
    other_token = store_cli(db_url, "token", "create", "--store", other)
    admin = store_cli(db_url, "admin", "create")
    store = StoreProcess(db_url, tmp_path / "store.log", extra=("--stale-after-s", "6"))
    store.start()
    http_port = free_port()
    document = agent_config_dict(
        tmp_path,
        store_id,
        mqtt_broker,
        http={"port": http_port},
        model={"enabled": False},
        sync=sync_section(store.url, token, heartbeat_interval_s=1.0),
    )
    agent = AgentProcess(write_config(tmp_path / "agent.toml", document))
    publisher = Publisher(mqtt_broker.host, mqtt_broker.port)
    try:
        agent.start()
        wait_http_ready(f"http://127.0.0.1:{http_port}/readyz", 60)
        for n in range(5):
            publisher.publish(event_topic(store_id), pickup(f"fleet-{n}"))
        publisher.wait_all()
        _wait(
            lambda: (
                json.loads(http_get(f"http://127.0.0.1:{http_port}/status")[1])["sync"]["sent"] == 5
            ),
            60,
            "the events uploaded",
        )
        _wait(
            lambda: any(
                e["store_id"] == store_id and e["lag_s"] == 0.0 and e["backlog"] == 0
                for e in _fleet_json(db_url)
            ),
            60,
            "a heartbeat after the upload",
        )
        (entry,) = _fleet_json(db_url)
        status = json.loads(http_get(f"http://127.0.0.1:{http_port}/status")[1])
        assert entry["version"] == status["version"]
        assert entry["health"] == "ok"
        assert (entry["drops"], entry["quarantined"], entry["stale"]) == (0, 0, False)
        assert entry["model_source"] == "none"
        assert abs(entry["clock_skew_s"]) < 5  # the same clock on both ends
        assert status["heartbeat"]["store_clock_skew_s"] is not None  # the agent learns it too
        assert status["heartbeat"]["sent"] >= 1
        agent_metrics = http_get(f"http://127.0.0.1:{http_port}/metrics")[1].decode()
        assert "edge_store_clock_skew_seconds " in agent_metrics

        # Admin only.
        view = _get_json(f"{store.url}/v1/fleet", admin)
        assert [a["store_id"] for a in view["agents"]] == [store_id]
        with pytest.raises(urllib.error.HTTPError) as refused:
            _get_json(f"{store.url}/v1/fleet", token)
        assert refused.value.code == 403
        refused.value.close()

        agent.kill()  # kill -9: no goodbye, the heartbeats just stop
        _wait(
            lambda: _fleet_json(db_url, "--stale-after-s", "6")[0]["stale"],
            30,
            "the killed agent goes stale",
        )

        # Another agent, live: it reports (as it would every interval) before each look.
        def other_beats() -> None:
            request = urllib.request.Request(
                f"{store.url}/v1/heartbeat",
                data=json.dumps({"version": "9.9.9", "health": "ok", "backlog": 3}).encode(),
                headers={
                    "Authorization": f"Bearer {other_token}",
                    "Content-Type": "application/json",
                },
            )
            urllib.request.urlopen(request, timeout=10).close()

        other_beats()
        entries = _fleet_json(db_url, "--stale-after-s", "6")
        assert [(e["store_id"], e["stale"]) for e in entries] == [
            (store_id, True),
            (other, False),
        ]
        other_beats()
        lines = _fleet_cli(db_url, "--stale-after-s", "6").splitlines()
        assert lines[0].split()[:2] == ["STORE", "STATE"]
        assert lines[1].split()[:2] == [store_id, "STALE"]
        assert lines[2].split()[:2] == [other, "live"]

        other_beats()
        code, body = http_get(f"{store.url}/metrics")
        assert code == 200
    finally:
        publisher.close()
        agent.ensure_dead()
        store.stop()
    lint = check_metrics(body)
    assert lint.returncode == 0, lint.stdout + lint.stderr
    text = body.decode()
    assert "customer_store_fleet_agents 2.0" in text
    assert "customer_store_fleet_stale_agents 1.0" in text
    assert 'customer_store_ingested_events_total{result="accepted"} 5.0' in text
    assert 'customer_store_ingested_events_total{result="rejected"} 0.0' in text
    assert 'route="/v1/heartbeat"' in text


async def test_a_heartbeat_is_checked_field_by_field_and_counted(
    client: TestClient[web.Request, web.Application], tokens: Tokens
) -> None:
    agent = await tokens.agent("store-hb")
    for raw, field in (
        (b'{"backlog": "3"}', "backlog"),
        (b'{"lag_s": Infinity}', "lag_s"),  # Python's json reads it; the check refuses it
        (b'{"health": "fine"}', "health"),
        (b'{"sent_at": "yesterday"}', "sent_at"),
        (b'{"version": 1}', "version"),
    ):
        response = await client.post(
            "/v1/heartbeat", data=raw, headers={**agent, "Content-Type": "application/json"}
        )
        assert response.status == 400, raw
        answer = await response.json()
        assert answer["error"] == "bad_heartbeat"
        assert field in answer["detail"]
    # The store is the token's, whatever the body claims.
    sent = {"store_id": "someone-else", "backlog": 1, "sent_at": "2020-01-01T00:00:00Z"}
    response = await client.post("/v1/heartbeat", json=sent, headers=agent)
    assert response.status == 200
    assert (await response.json())["clock_skew_s"] < -1e8  # a box years behind
    admin = await tokens.admin()
    view = await (await client.get("/v1/fleet", headers=admin)).json()
    assert [a["store_id"] for a in view["agents"]] == ["store-hb"]
    partner = await tokens.partner("profiles:read")
    assert (await client.get("/v1/fleet", headers=partner)).status == 403
    metrics = await (await client.get("/metrics")).text()
    assert 'customer_store_heartbeats_total{result="refused"} 5.0' in metrics
    assert 'customer_store_heartbeats_total{result="recorded"} 1.0' in metrics
