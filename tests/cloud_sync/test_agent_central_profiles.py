"""The customer's central profile at the edge, end to end: a real ``customer-store serve``
(SQLite), two agents (store A and store B, in-process, real broker), a web-shop channel.

A customer who consented and shopped at store A, and bought in the web shop, is identified
at store B (no local consent record, no local history): the profile arrives in the
background and B's next suggestions are the model's, with ``history.central > 0``.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from sync_helpers import StoreProcess, eventually, store_cli, sync_section

from edge_agent.app import RunningAgent
from edge_agent.personalize.profiles import CentralProfiles
from edge_agent.status.metrics import render
from tests.conftest import agent_config_dict
from tests.edge_agent.test_personalize_e2e import Suggestions, event
from tests.support.agent import Publisher, agent_running, event_topic
from tests.support.broker import AmqttBroker, MosquittoBroker, free_port
from tests.support.promtool import check_metrics

Broker = MosquittoBroker | AmqttBroker
FAST_MODEL = {"watch_interval_s": 0.1, "popularity_refresh_s": 0.1, "top_k": 3, "epsilon": 0.0}
GRANT = {"personalization": True, "profile_sharing": True, "partner_sharing": False}
A_SKUS = [f"SKU-{n:06d}" for n in (11, 12, 13, 14)]
WEB_SKUS = [f"SKU-{n:06d}" for n in (21, 22)]


@pytest.fixture
def store(tmp_path: Path) -> Iterator[StoreProcess]:
    process = StoreProcess(f"sqlite://{tmp_path / 'central.db'}", tmp_path / "store.log")
    process.start()
    yield process
    process.stop()


def agent_document(
    tmp_path: Path, store_id: str, broker: Broker, url: str, token: str, **profiles: Any
) -> dict[str, Any]:
    return agent_config_dict(
        tmp_path / store_id,
        store_id,
        broker,
        sync=sync_section(url, token),
        model=FAST_MODEL,
        profiles={"ttl_s": 60.0, "timeout_s": 3.0, "backoff_max_s": 0.5, **profiles},
    )


def profiles_of(agent: RunningAgent) -> CentralProfiles:
    return next(part for part in agent.components if isinstance(part, CentralProfiles))


async def publish(broker: Broker, topic: str, payloads: list[bytes]) -> None:
    publisher = Publisher(broker.host, broker.port)
    try:
        for payload in payloads:
            publisher.publish(topic, payload)
        await asyncio.to_thread(publisher.wait_all, 30)
    finally:
        publisher.close()


def web_envelope(kind: str, customer_id: str, sku: str, minutes_ago: int) -> dict[str, Any]:
    moment = datetime.now(UTC) - timedelta(minutes=minutes_ago)
    return {
        "event_id": str(uuid.uuid4()),
        "type": kind,
        "ts": moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z",
        "store_id": "web-shop",
        "device_id": "browser",
        "customer_id": customer_id,
        "source": "https:browser",
        "schema": 1,
        "data": {"sku": sku},
    }


async def post_channel(url: str, token: str, events: list[dict[str, Any]]) -> None:
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
    async with (
        aiohttp.ClientSession() as session,
        session.post(f"{url}/v1/events", data=json.dumps(events), headers=headers) as response,
    ):
        assert response.status == 200, await response.text()
        assert (await response.json())["accepted"] == len(events)


async def shop_at_a(
    tmp_path: Path, broker: Broker, store: StoreProcess, store_a: str, customer: str
) -> None:
    """Consent and pickups at store A, synced to the central store."""
    token_a = store_cli(store.db_url, "token", "create", "--store", store_a)
    document = agent_document(tmp_path, store_a, broker, store.url, token_a)
    payloads = [event(f"{customer}-consent", "consent.update", customer, **GRANT)]
    payloads += [
        event(f"{customer}-a{n}", "product.pickup", customer, sku=sku)
        for n, sku in enumerate(A_SKUS)
    ]
    async with agent_running(document) as agent_a:
        await publish(broker, event_topic(store_a), payloads)
        await eventually(
            lambda: (
                agent_a.buffer.counters.total >= len(payloads)
                and agent_a.buffer.counters.pending == 0
            ),
            30,
        )


async def test_a_customer_from_store_a_and_the_web_shop_is_known_at_store_b(
    store: StoreProcess, tmp_path: Path, mqtt_broker: Broker
) -> None:
    suffix = uuid.uuid4().hex[:8]
    store_a, store_b, customer = f"store-a-{suffix}", f"store-b-{suffix}", f"c-{suffix}"
    await shop_at_a(tmp_path, mqtt_broker, store, store_a, customer)
    web_token = store_cli(store.db_url, "channel", "create", "--name", "web-shop")
    await post_channel(
        store.url,
        web_token,
        [web_envelope("basket.add", customer, sku, 30 - n) for n, sku in enumerate(WEB_SKUS)],
    )
    token_b = store_cli(store.db_url, "token", "create", "--store", store_b)
    document = agent_document(tmp_path, store_b, mqtt_broker, store.url, token_b)
    suggestions = Suggestions(mqtt_broker, store_b)
    try:
        async with agent_running(document) as agent_b:
            profiles = profiles_of(agent_b)
            topic = event_topic(store_b)
            await publish(
                mqtt_broker, topic, [event(f"{customer}-id", "customer.identified", customer)]
            )
            await eventually(lambda: profiles.fetches["found"] >= 1, 20)
            trigger = f"{customer}-b1"
            await publish(
                mqtt_broker,
                topic,
                [event(trigger, "product.pickup", customer, sku="SKU-000031")],
            )
            answer = await suggestions.wait_for(trigger)

            async def recorded() -> bool:
                recent = (await agent_b.board.snapshot())["suggestions"]["recent"]
                return any(r["suggestion_id"] == answer["suggestion_id"] for r in recent)

            await eventually(recorded, 10)
            status = await agent_b.board.snapshot()
    finally:
        suggestions.close()
    # No consent record at B: the store's resolved consent (given at A) personalizes here.
    assert answer["source"] == "model"
    assert answer["history"] == {"local": 1, "central": len(A_SKUS) + len(WEB_SKUS)}
    # A's skus and the web shop's are history: the model does not suggest them again.
    assert not {item["sku"] for item in answer["items"]} & {*A_SKUS, *WEB_SKUS}
    section = status["profiles"]
    assert section["cached"] == 1
    assert section["fetches"]["found"] == 1
    assert section["fetch_latency_histogram"]["count"] >= 1
    [recent] = [
        r for r in status["suggestions"]["recent"] if r["suggestion_id"] == answer["suggestion_id"]
    ]
    assert recent["history"]["central"] == len(A_SKUS) + len(WEB_SKUS)
    exposition = render(status).decode()
    assert 'edge_profile_fetches_total{outcome="found"} 1.0' in exposition
    assert "edge_profile_fetch_latency_seconds_bucket" in exposition
    check_metrics(exposition)


async def test_withdrawal_drops_the_profile_and_a_down_store_leaves_local_state(
    store: StoreProcess, tmp_path: Path, mqtt_broker: Broker
) -> None:
    suffix = uuid.uuid4().hex[:8]
    store_a, store_b, customer = f"store-a-{suffix}", f"store-b-{suffix}", f"c-{suffix}"
    await shop_at_a(tmp_path, mqtt_broker, store, store_a, customer)
    token_b = store_cli(store.db_url, "token", "create", "--store", store_b)
    document = agent_document(tmp_path, store_b, mqtt_broker, store.url, token_b)
    suggestions = Suggestions(mqtt_broker, store_b)
    topic = event_topic(store_b)
    try:
        async with agent_running(document) as agent_b:
            profiles = profiles_of(agent_b)
            await publish(
                mqtt_broker, topic, [event(f"{customer}-id", "customer.identified", customer)]
            )
            await eventually(lambda: profiles.fetches["found"] >= 1, 20)
            assert profiles.lookup(customer) is not None
            withdraw = {**GRANT, "personalization": False}
            await publish(
                mqtt_broker,
                topic,
                [
                    event(f"{customer}-withdraw", "consent.update", customer, **withdraw),
                    event(f"{customer}-b2", "product.pickup", customer, sku="SKU-000031"),
                ],
            )
            answer = await suggestions.wait_for(f"{customer}-b2")
            cached = (await agent_b.board.snapshot())["profiles"]["cached"]
            refetched = profiles.fetches["found"]
    finally:
        suggestions.close()
    assert answer["source"] != "model"
    assert answer["history"] == {"local": 0, "central": 0}
    assert cached == 0
    assert refetched == 1  # nothing asked for again after the withdrawal


async def test_store_down_suggestions_flow_from_local_state(
    tmp_path: Path, mqtt_broker: Broker, store_id: str
) -> None:
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    document = agent_document(tmp_path, store_id, mqtt_broker, url, "cst_agent_unused")
    suggestions = Suggestions(mqtt_broker, store_id)
    triggers = [f"t-{n}" for n in range(6)]
    try:
        async with agent_running(document) as agent:
            grant = event("c-down-consent", "consent.update", "c-down", **GRANT)
            pickups = [
                event(t, "product.pickup", "c-down", sku=f"SKU-{n + 40:06d}")
                for n, t in enumerate(triggers)
            ]
            await publish(mqtt_broker, event_topic(store_id), [grant, *pickups])
            answers = [await suggestions.wait_for(t) for t in triggers]
            await eventually(lambda: profiles_of(agent).fetches["unavailable"] >= 1, 20)
            status = await agent.board.snapshot()
    finally:
        suggestions.close()
    assert all(a["history"]["central"] == 0 for a in answers)
    assert all(a["source"] == "model" for a in answers)
    assert answers[-1]["history"]["local"] == len(triggers)
    assert status["profiles"]["cached"] == 0
