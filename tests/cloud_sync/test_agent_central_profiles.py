"""The customer's central profile at the edge, end to end: a real ``customer-store serve``
(SQLite), two agents (store A and store B, in-process, real broker), a web-shop channel.

A customer who consented and shopped at store A, and bought in the web shop, is identified
at store B (no local consent record, no local history): the profile arrives in the
background and B's next suggestions are the model's, with ``history.central > 0``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from sync_helpers import StoreProcess, eventually, store_cli, store_rows, sync_section

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
    with contextlib.closing(Suggestions(mqtt_broker, store_b)) as suggestions:
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
    lint = check_metrics(exposition.encode())
    assert lint.returncode == 0, lint.stdout + lint.stderr
    assert lint.stdout + lint.stderr == ""


async def test_withdrawal_drops_the_profile_and_a_down_store_leaves_local_state(
    store: StoreProcess, tmp_path: Path, mqtt_broker: Broker
) -> None:
    suffix = uuid.uuid4().hex[:8]
    store_a, store_b, customer = f"store-a-{suffix}", f"store-b-{suffix}", f"c-{suffix}"
    await shop_at_a(tmp_path, mqtt_broker, store, store_a, customer)
    token_b = store_cli(store.db_url, "token", "create", "--store", store_b)
    document = agent_document(tmp_path, store_b, mqtt_broker, store.url, token_b)
    topic = event_topic(store_b)
    with contextlib.closing(Suggestions(mqtt_broker, store_b)) as suggestions:
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
    assert answer["source"] != "model"
    assert answer["history"] == {"local": 0, "central": 0}
    assert cached == 0
    assert refetched == 1  # nothing asked for again after the withdrawal


async def test_an_erasure_in_the_central_store_drops_the_profile_at_the_edge(
    store: StoreProcess, tmp_path: Path, mqtt_broker: Broker
) -> None:
    suffix = uuid.uuid4().hex[:8]
    store_a, store_b, customer = f"store-a-{suffix}", f"store-b-{suffix}", f"c-{suffix}"
    await shop_at_a(tmp_path, mqtt_broker, store, store_a, customer)
    token_b = store_cli(store.db_url, "token", "create", "--store", store_b)
    admin = store_cli(store.db_url, "admin", "create")
    document = agent_document(tmp_path, store_b, mqtt_broker, store.url, token_b)
    async with agent_running(document) as agent_b:
        profiles = profiles_of(agent_b)
        identified = event(f"{customer}-id", "customer.identified", customer)
        await publish(mqtt_broker, event_topic(store_b), [identified])
        await eventually(lambda: profiles.fetches["found"] >= 1, 20)
        async with (
            aiohttp.ClientSession() as session,
            session.delete(
                f"{store.url}/v1/customers/{customer}",
                headers={"Authorization": f"Bearer {admin}"},
            ) as response,
        ):
            assert response.status == 200, await response.text()
        await eventually(lambda: profiles.status()["profiles"]["cached"] == 0, 20)
        assert profiles.lookup(customer) is None


async def test_store_down_suggestions_flow_from_local_state(
    tmp_path: Path, mqtt_broker: Broker, store_id: str
) -> None:
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    document = agent_document(tmp_path, store_id, mqtt_broker, url, "cst_agent_unused")
    triggers = [f"t-{n}" for n in range(6)]
    with contextlib.closing(Suggestions(mqtt_broker, store_id)) as suggestions:
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
    assert all(a["history"]["central"] == 0 for a in answers)
    assert all(a["source"] == "model" for a in answers)
    assert answers[-1]["history"]["local"] == len(triggers)
    assert status["profiles"]["cached"] == 0


class FakeStore:
    """A store the project does not control: hostile profile bodies, or one that stalls.
    Every other route answers 503 (the uploader retries; nothing else is tested here)."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.asked: list[str] = []
        self.runner: web.AppRunner | None = None
        self.port = 0

    def profile(self, customer_id: str, interactions: list[dict[str, Any]]) -> dict[str, Any]:
        return {"customer_id": customer_id, "consent": GRANT, "interactions": interactions}

    async def handle(self, request: web.Request) -> web.StreamResponse:
        customer_id = request.match_info["customer_id"]
        self.asked.append(customer_id)
        kind = customer_id.split("-")[1]
        if kind == "huge":
            return web.Response(body=b"[" + b"0," * 600_000 + b"0]")
        if kind == "types":
            body = self.profile(customer_id, [{"event_id": 1, "sku": ["x"]}])
            return web.json_response(body)
        if kind == "other":
            return web.json_response(self.profile("c-someone-else", []))
        if kind == "deep":
            return web.Response(body=b"[" * 200_000 + b"]" * 200_000)
        if kind == "stall":
            await self.release.wait()
        interactions = [
            {
                "ts": (datetime.now(UTC) - timedelta(hours=n + 1)).isoformat(),
                "type": "product.pickup",
                "sku": f"SKU-{n + 60:06d}",
                "store_id": "store-elsewhere",
                "event_id": f"e-{n}",
            }
            for n in range(3)
        ]
        return web.json_response(self.profile(customer_id, interactions))

    async def unavailable(self, request: web.Request) -> web.Response:
        return web.Response(status=503, text="not this test's concern")

    async def __aenter__(self) -> FakeStore:
        app = web.Application()
        app.router.add_get("/v1/profiles/{customer_id}", self.handle)
        app.router.add_route("*", "/{tail:.*}", self.unavailable)
        self.runner = web.AppRunner(app, shutdown_timeout=0.5)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.release.set()
        if self.runner is not None:
            await self.runner.cleanup()


def consented_pickups(customer: str, triggers: list[str]) -> list[bytes]:
    grant = event(f"{customer}-consent", "consent.update", customer, **GRANT)
    return [grant] + [
        event(t, "product.pickup", customer, sku=f"SKU-{n + 40:06d}")
        for n, t in enumerate(triggers)
    ]


async def test_hostile_profile_bodies_are_refused_counted_and_suggestions_go_on(
    tmp_path: Path, mqtt_broker: Broker, store_id: str
) -> None:
    kinds = ("huge", "types", "other", "deep")
    with contextlib.closing(Suggestions(mqtt_broker, store_id)) as suggestions:
        async with FakeStore() as fake:
            url = f"http://127.0.0.1:{fake.port}"
            document = agent_document(
                tmp_path, store_id, mqtt_broker, url, "cst_agent_x", max_body_bytes=1_048_576
            )
            async with agent_running(document) as agent:
                profiles = profiles_of(agent)
                payloads = [
                    p for kind in kinds for p in consented_pickups(f"c-{kind}", [f"{kind}-1"])
                ]
                await publish(mqtt_broker, event_topic(store_id), payloads)
                answers = [await suggestions.wait_for(f"{kind}-1") for kind in kinds]
                done = ("rejected", "too_large")
                await eventually(lambda: sum(profiles.fetches[o] for o in done) >= len(kinds), 20)
                # Each is asked once: a refused body is remembered like "no profile".
                await publish(
                    mqtt_broker,
                    event_topic(store_id),
                    [event(f"{k}-2", "product.pickup", f"c-{k}", sku="SKU-000099") for k in kinds],
                )
                again = [await suggestions.wait_for(f"{kind}-2") for kind in kinds]
                status = await agent.board.snapshot()
    section = status["profiles"]
    assert section["fetches"]["too_large"] == 1
    assert section["fetches"]["rejected"] == 3
    assert section["rejected"] == {
        "not_json": 0,
        "too_deep": 1,
        "bad_type": 1,
        "wrong_customer": 1,
        "too_many": 0,
    }
    assert sorted(fake.asked) == sorted(f"c-{kind}" for kind in kinds)
    assert all(a["history"]["central"] == 0 and a["source"] == "model" for a in answers + again)
    exposition = render(status).decode()
    assert 'edge_profiles_rejected_total{reason="too_deep"} 1.0' in exposition


async def test_a_stalled_store_never_holds_up_a_suggestion(
    tmp_path: Path, mqtt_broker: Broker, store_id: str
) -> None:
    """Every suggestion of the customer arrives while the profile fetch hangs (an ordering
    check: the fetch is still in flight after all of them); once released, the profile
    shapes the next one."""
    triggers = [f"stall-{n}" for n in range(8)]
    with contextlib.closing(Suggestions(mqtt_broker, store_id)) as suggestions:
        async with FakeStore() as fake:
            url = f"http://127.0.0.1:{fake.port}"
            document = agent_document(
                tmp_path, store_id, mqtt_broker, url, "cst_agent_x", timeout_s=120.0
            )
            async with agent_running(document) as agent:
                profiles = profiles_of(agent)
                topic = event_topic(store_id)
                await publish(mqtt_broker, topic, consented_pickups("c-stall", triggers))
                answers = [await suggestions.wait_for(t) for t in triggers]
                in_flight = (await agent.board.snapshot())["profiles"]["in_flight"]
                outcomes_before = sum(profiles.fetches.values())
                fake.release.set()
                await eventually(lambda: profiles.fetches["found"] == 1, 20)
                await publish(
                    mqtt_broker,
                    topic,
                    [event("after", "product.pickup", "c-stall", sku="SKU-000098")],
                )
                after = await suggestions.wait_for("after")
    assert fake.asked == ["c-stall"]  # single flight: eight triggers, one request
    assert in_flight == 1
    assert outcomes_before == 0
    assert [a["history"] for a in answers] == [
        {"local": n + 1, "central": 0} for n in range(len(triggers))
    ]
    assert after["history"] == {"local": len(triggers) + 1, "central": 3}


async def get_profile(url: str, token: str, customer: str) -> tuple[int, dict[str, Any]]:
    async with (
        aiohttp.ClientSession() as session,
        session.get(
            f"{url}/v1/profiles/{customer}", headers={"Authorization": f"Bearer {token}"}
        ) as response,
    ):
        body = await response.json() if response.status == 200 else {}
        return response.status, body


def stored_as(store: StoreProcess, event_id: str) -> list[str | None]:
    """The customer ids the central store holds for the event ``event_id``."""
    return [cid for eid, cid, _ in store_rows(store.db_url) if eid == event_id]


async def test_consent_from_store_a_sends_store_b_events_with_the_clear_id_until_withdrawn(
    store: StoreProcess, tmp_path: Path, mqtt_broker: Broker
) -> None:
    """Issue 12: B has no local record; the profile's store-resolved consent (given at A)
    lets B's events committed after it leave with the clear id, so B's pickup joins the
    customer's profile. A withdrawal at A (the store then answers 404) revokes it at B."""
    suffix = uuid.uuid4().hex[:8]
    store_a, store_b, customer = f"store-a-{suffix}", f"store-b-{suffix}", f"c-{suffix}"
    await shop_at_a(tmp_path, mqtt_broker, store, store_a, customer)
    token_b = store_cli(store.db_url, "token", "create", "--store", store_b)
    document = agent_document(tmp_path, store_b, mqtt_broker, store.url, token_b, ttl_s=0.2)
    topic = event_topic(store_b)
    async with agent_running(document) as agent_b:
        profiles = profiles_of(agent_b)
        await publish(
            mqtt_broker, topic, [event(f"{customer}-id", "customer.identified", customer)]
        )
        await eventually(lambda: profiles.central_consent["granted"] == 1, 20)
        await publish(
            mqtt_broker,
            topic,
            [event(f"{customer}-b1", "product.pickup", customer, sku="SKU-000031")],
        )
        await eventually(lambda: bool(stored_as(store, f"{customer}-b1")), 30)
        status, profile = await get_profile(store.url, token_b, customer)
        granted = (await agent_b.board.snapshot())["profiles"]["central_consent"]
        # A withdrawal at A: the store's resolved consent says no, its profile is a 404.
        token_a = store_cli(store.db_url, "token", "create", "--store", store_a)
        document_a = agent_document(tmp_path, store_a, mqtt_broker, store.url, token_a)
        # (personalization: a withdrawal of profile sharing leaves A under the pseudonym and
        # reaches the store as a rewrite of A's copies, on A's downlink cycle)
        withdraw = {**GRANT, "personalization": False}
        async with agent_running(document_a):
            await publish(
                mqtt_broker,
                event_topic(store_a),
                [event(f"{customer}-withdraw", "consent.update", customer, **withdraw)],
            )
            await eventually(
                lambda: any(row[0] == f"{customer}-withdraw" for row in store_rows(store.db_url)),
                30,
            )
        # B's next trigger refreshes the stale profile (ttl 0.2 s): the 404 revokes the grant.
        await asyncio.sleep(0.3)
        await publish(
            mqtt_broker,
            topic,
            [event(f"{customer}-b2", "product.pickup", customer, sku="SKU-000032")],
        )
        await eventually(lambda: profiles.central_consent["revoked"] == 1, 20)
        await publish(
            mqtt_broker,
            topic,
            [event(f"{customer}-b3", "product.pickup", customer, sku="SKU-000033")],
        )
        await eventually(lambda: bool(stored_as(store, f"{customer}-b3")), 30)
    assert granted == {"held": 1, "granted": 1, "revoked": 0}
    assert status == 200
    from_b = [i for i in profile["interactions"] if i["store_id"] == store_b]
    assert [i.get("sku") for i in from_b if i["type"] == "product.pickup"] == ["SKU-000031"]
    assert stored_as(store, f"{customer}-b1") == [customer]
    # The identification was committed before the grant: it stays pseudonymised.
    [identified] = stored_as(store, f"{customer}-id")
    assert identified is not None
    assert identified.startswith("ps-")
    # After the revocation, B's next pickup leaves under the pseudonym only.
    [after] = stored_as(store, f"{customer}-b3")
    assert after is not None
    assert after.startswith("ps-")
