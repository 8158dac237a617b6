"""No clear id leaves the store without consent, whatever a device puts in an event.

The agent runs in-process against a real broker and a real ``customer-store serve`` process
(SQLite and PostgreSQL); what the store holds is read from its database.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from sync_helpers import StoreProcess, eventually, store_cli, store_rows, sync_section

from edge_agent.app import RunningAgent
from edge_agent.config import config_from_dict
from edge_agent.events import derive_event_id
from edge_agent.governance import event_id_key, pseudonymise
from edge_agent.status.metrics import render
from tests.conftest import COLLECT_ONLY, agent_config_dict
from tests.support.agent import Publisher, agent_running, event_topic
from tests.support.broker import AmqttBroker, MosquittoBroker

Broker = MosquittoBroker | AmqttBroker
KEY = "consent-test-pseudonym-key-0123456789"
CUSTOMERS = 60


@pytest.fixture
def store(db_url: str, tmp_path: Path) -> Iterator[StoreProcess]:
    process = StoreProcess(db_url, tmp_path / "store.log")
    process.start()
    yield process
    process.stop()


def document_for(tmp_path: Path, store_id: str, broker: Broker, store: StoreProcess) -> Any:
    token = store_cli(store.db_url, "token", "create", "--store", store_id)
    return agent_config_dict(
        tmp_path,
        store_id,
        broker,
        sync=sync_section(store.url, token, batch_size=100),
        governance={"pseudonym_key": KEY},
        model=COLLECT_ONLY,
    )


def hostile_payloads(n: int) -> list[bytes]:
    """A customer without consent, named in every place a device can put an id."""
    cid, alias = f"c-{n:06d}", f"card-{n:06d}"
    events: list[dict[str, Any]] = [
        # "customer_id": null inside data and inside a list used to pass a text search.
        {"type": "product.pickup", "customer_id": cid,
         "data": {"sku": "SKU-1", "note": {"customer_id": None}, "email": f"{cid}@example.com"}},
        {"type": "checkout.purchase", "customer_id": cid,
         "data": {"items": [{"sku": "SKU-2", "customer_id": None}, cid], "total": 2.0}},
        # The id repeated in declared fields; no event_id: the agent derives one.
        {"type": "kiosk.view", "customer_id": cid, "data": {"page": f"hello {cid}", "sku": cid}},
        {"type": "customer.identified", "customer_id": cid,
         "data": {"method": "card", "alias": alias, "customer_id": None}},
        {"type": "telemetry-like", "customer_id": cid, "data": {}},  # unknown: quarantined
    ]  # fmt: skip
    return [json.dumps(event).encode() for event in events]


async def publish(broker: Broker, topic: str, payloads: list[bytes]) -> None:
    publisher = Publisher(broker.host, broker.port)
    try:
        for payload in payloads:
            publisher.publish(topic, payload)
        await asyncio.to_thread(publisher.wait_all, 30)
    finally:
        publisher.close()


async def all_synced(agent: RunningAgent, at_least: int) -> None:
    await eventually(
        lambda: agent.buffer.counters.total >= at_least and agent.buffer.counters.pending == 0, 30
    )


async def test_no_customer_without_consent_reaches_the_store_in_clear(
    store: StoreProcess, tmp_path: Path, store_id: str, mqtt_broker: Broker
) -> None:
    document = document_for(tmp_path, store_id, mqtt_broker, store)
    topic = event_topic(store_id)
    payloads = [p for n in range(CUSTOMERS) for p in hostile_payloads(n)]
    async with agent_running(document) as agent:
        await publish(mqtt_broker, topic, payloads)
        await all_synced(agent, 4 * CUSTOMERS)
        status = await agent.board.snapshot()
    rows = store_rows(store.db_url)
    assert len(rows) == 4 * CUSTOMERS
    text = json.dumps(rows)
    clear = [c for n in range(CUSTOMERS) for c in (f"c-{n:06d}", f"card-{n:06d}") if c in text]
    assert clear == [], f"{len(clear)} clear ids reached the store"
    assert "@example.com" not in text
    pseudonyms = {pseudonymise(f"c-{n:06d}", KEY.encode()) for n in range(CUSTOMERS)}
    assert {customer for _, customer, _ in rows} == pseudonyms
    datas = [json.loads(data) for _, _, data in rows]
    assert not any("customer_id" in json.dumps(data) or "email" in data for data in datas)
    # Undeclared fields were dropped at decode, counted and shown on /status.
    assert status["schema"]["undeclared_fields_dropped"] >= 4 * CUSTOMERS
    dropped = status["schema"]["undeclared_fields_dropped"]
    assert f"edge_undeclared_fields_dropped_total {float(dropped)}" in render(status).decode()
    assert status["quarantine"]["by_reason"]["unknown_type"] == CUSTOMERS


def unkeyed_id(source: str, raw: bytes, index: int = 0) -> str:
    """The derivation before ids were keyed: sha256 of the source and the raw payload."""
    digest = hashlib.sha256(source.encode() + b"\0" + raw).hexdigest()
    return str(uuid.uuid5(uuid.UUID("6f1c2b1e-4a6e-4f0e-9d55-0b7c1e2a9f10"), f"{digest}:{index}"))


def view_payload(cid: str) -> bytes:
    return json.dumps(
        {"type": "kiosk.view", "customer_id": cid, "data": {"page": "offers"}}
    ).encode()


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
async def test_derived_ids_reveal_nothing_and_survive_a_restart(
    store: StoreProcess, tmp_path: Path, store_id: str, mqtt_broker: Broker
) -> None:
    document = document_for(tmp_path, store_id, mqtt_broker, store)
    topic = event_topic(store_id)
    source = f"mqtt:{topic}"
    secret = "c-004218"  # a customer without consent: the store sees only a pseudonym
    async with agent_running(document) as agent:
        await publish(mqtt_broker, topic, [view_payload(secret)])
        await all_synced(agent, 1)
    [(uploaded_id, customer, _)] = store_rows(store.db_url)
    assert customer == pseudonymise(secret, KEY.encode())
    # Someone who knows the payload format tries every candidate id: without the key, no
    # derivation reproduces the uploaded id; with the agent's key the same search finds it.
    candidates = [f"c-{n:06d}" for n in range(5000)]
    assert all(unkeyed_id(source, view_payload(c)) != uploaded_id for c in candidates)
    key = event_id_key(config_from_dict(document))
    found = [c for c in candidates if derive_event_id(key, source, view_payload(c)) == uploaded_id]
    assert found == [secret]
    # The device sends the same message again after an agent restart (its acknowledgement
    # was lost): the restarted agent derives the same id from its kept key, stores it once.
    async with agent_running(document) as agent:
        await publish(mqtt_broker, topic, [view_payload(secret)])
        await eventually(lambda: agent.buffer.counters.duplicates >= 1, 15)
        assert agent.buffer.counters.total == 1
    assert [row[0] for row in store_rows(store.db_url)] == [uploaded_id]


async def test_the_store_keeps_only_declared_fields_and_rejects_wrong_shapes(
    store: StoreProcess,
) -> None:
    token = store_cli(store.db_url, "token", "create", "--store", "store-001")
    base = {
        "ts": "2026-11-22T08:00:00.000Z",
        "store_id": "store-001",
        "device_id": "pos-1",
        "customer_id": "ps-0123",
        "source": "mqtt:x",
        "schema": 1,
    }
    body = [
        {**base, "event_id": "s-1", "type": "checkout.purchase",
         "data": {"items": [{"sku": "SKU-1", "owner": "c-000001"}], "email": "a@example.com"}},
        {**base, "event_id": "s-2", "type": "checkout.purchase", "data": {"items": [{"n": 1}]}},
        {**base, "event_id": "s-3", "type": "telemetry", "customer_id": None,
         "data": {"values": {"temp_c": 4.0, "c-000001": 1}}},
    ]  # fmt: skip
    headers = {"Authorization": f"Bearer {token}"}
    async with (
        aiohttp.ClientSession() as session,
        session.post(f"{store.url}/v1/events", json=body, headers=headers) as response,
    ):
        answer = await response.json()
    assert response.status == 200
    assert answer["accepted"] == 2
    assert answer["rejected"] == [{"index": 1, "event_id": "s-2", "reason": "wrong_type"}]
    stored = {event_id: json.loads(data) for event_id, _, data in store_rows(store.db_url)}
    assert stored == {"s-1": {"items": [{"sku": "SKU-1"}]}, "s-3": {"values": {"temp_c": 4.0}}}
