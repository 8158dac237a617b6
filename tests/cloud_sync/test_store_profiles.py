"""The single customer view, aliases, paging, partner scopes and aggregates on both backends."""

from __future__ import annotations

import json
from typing import Any

from aiohttp.test_utils import TestClient
from conftest import Tokens
from cstore_helpers import consent, envelope

Client = TestClient[Any, Any]


async def upload(client: Client, headers: dict[str, str], events: list[dict[str, Any]]) -> None:
    response = await client.post(
        "/v1/events",
        data=json.dumps(events),
        headers={**headers, "Content-Type": "application/json"},
    )
    answer = await response.json()
    assert response.status == 200
    assert answer["rejected"] == []


async def test_profile_gathers_stores_channels_counts_items_and_consent(
    client: Client, tokens: Tokens
) -> None:
    north, south = await tokens.agent("store-001"), await tokens.agent("store-002")
    cid = "c-100"
    await upload(
        client,
        north,
        [
            envelope("product.pickup", customer_id=cid, offset_s=10, data={"sku": "SKU-A"}),
            envelope("basket.add", customer_id=cid, offset_s=20, data={"sku": "SKU-B"}),
            envelope("suggestion.shown", customer_id=cid, offset_s=30),
            envelope("suggestion.accepted", customer_id=cid, offset_s=31),
            consent(cid, partner=True, offset_s=40),
            # Older, arrives later: a withdrawal counts at once, whatever its date.
            consent(cid, partner=False, offset_s=5),
            envelope("product.pickup", customer_id="someone-else", offset_s=12),
            envelope("telemetry", customer_id=None, offset_s=13),
        ],
    )
    await upload(
        client,
        south,
        [
            envelope(
                "product.scan",
                customer_id=cid,
                store_id="store-002",
                channel="serial",
                device_id="scanner-1",
                offset_s=50,
                data={"sku": "SKU-C"},
            ),
        ],
    )
    response = await client.get(f"/v1/customers/{cid}", headers=await tokens.admin())
    assert response.status == 200
    profile = await response.json()
    assert profile["identities"] == [cid]
    assert profile["first_seen"] == "2026-11-22T08:00:05.000Z"
    assert profile["last_seen"] == "2026-11-22T08:00:50.000Z"
    assert profile["stores"] == ["store-001", "store-002"]
    assert profile["channels"] == ["mqtt", "serial"]
    assert {
        "channel": "serial",
        "store_id": "store-002",
        "device_id": "scanner-1",
        "events": 1,
    } in (profile["devices"])
    assert profile["counts"] == {
        "basket.add": 1,
        "consent.update": 2,
        "product.pickup": 1,
        "product.scan": 1,
        "suggestion.accepted": 1,
        "suggestion.shown": 1,
    }
    assert profile["events"] == 7
    assert [i["sku"] for i in profile["recent_items"]] == ["SKU-C", "SKU-000004", "SKU-B", "SKU-A"]
    assert profile["suggestions"] == {
        "shown": 1,
        "accepted": 1,
        "dismissed": 0,
        "acceptance_rate": 1.0,
    }
    assert profile["consent"]["partner_sharing"] is False
    assert profile["consent"]["personalization"] is True
    assert profile["consent"]["updated_at"] == "2026-11-22T08:00:40.000Z"


async def test_aliases_resolve_to_one_profile(client: Client, tokens: Tokens) -> None:
    agent, admin = await tokens.agent(), await tokens.admin()
    # New ids attach to a history this store has seen; their events follow the link.
    await upload(
        client,
        agent,
        [
            envelope("product.pickup", customer_id="card-1", offset_s=1, data={"sku": "SKU-1"}),
            envelope(
                "customer.identified",
                customer_id="card-1",
                offset_s=3,
                data={"method": "app", "alias": "app-1"},
            ),
            envelope(
                "customer.identified",
                customer_id="app-1",
                offset_s=4,
                data={"method": "web", "alias": "web-1"},
            ),
        ],
    )
    await upload(
        client,
        agent,
        [
            envelope("kiosk.view", customer_id="app-1", offset_s=2),
            envelope("basket.add", customer_id="web-1", offset_s=5),
        ],
    )
    profiles = []
    for cid in ("card-1", "app-1", "web-1"):
        response = await client.get(f"/v1/customers/{cid}", headers=admin)
        assert response.status == 200
        profiles.append(await response.json())
    assert {p["customer_id"] for p in profiles} == {"card-1", "app-1", "web-1"}
    for profile in profiles:
        assert profile["identities"] == ["app-1", "card-1", "web-1"]
        assert profile["events"] == 5
    unrelated = await client.get("/v1/customers/nobody", headers=admin)
    assert unrelated.status == 404


async def test_events_page_through_history_in_time_order(client: Client, tokens: Tokens) -> None:
    agent, admin = await tokens.agent(), await tokens.admin()
    events = [envelope(customer_id="c-7", offset_s=60 - i) for i in range(25)]  # newest first
    await upload(client, agent, events)
    seen: list[str] = []
    cursor: str | None = None
    for _ in range(10):  # bounded: 25 events at 10 a page is 3 pages
        query = f"?limit=10&after={cursor}" if cursor else "?limit=10"
        page = await (await client.get(f"/v1/customers/c-7/events{query}", headers=admin)).json()
        seen += [e["ts"] for e in page["events"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert len(seen) == 25
    assert seen == sorted(seen)
    assert {e["ts"] for e in events} == set(seen)
    bad = await client.get("/v1/customers/c-7/events?after=garbage", headers=admin)
    assert bad.status == 400
    assert (await client.get("/v1/customers/c-7/events?limit=0", headers=admin)).status == 400


async def test_partner_reads_only_consented_profiles(client: Client, tokens: Tokens) -> None:
    agent = await tokens.agent()
    partner = await tokens.partner("profiles:read")
    await upload(
        client,
        agent,
        [
            envelope(customer_id="yes-1", offset_s=1),
            consent("yes-1", partner=True, offset_s=2),
            envelope(customer_id="no-1", offset_s=1),
            consent("no-1", partner=True, offset_s=2),
            consent("no-1", partner=False, offset_s=3),  # withdrawn
            envelope(customer_id="never-1", offset_s=1),
        ],
    )
    allowed = await client.get("/v1/customers/yes-1", headers=partner)
    assert allowed.status == 200
    assert (await allowed.json())["consent"]["partner_sharing"] is True
    assert (await client.get("/v1/customers/yes-1/events", headers=partner)).status == 200
    absent = await client.get("/v1/customers/absent-1", headers=partner)
    for cid in ("no-1", "never-1"):
        refused = await client.get(f"/v1/customers/{cid}", headers=partner)
        assert refused.status == 404
        assert await refused.json() == await absent.json()
        assert (await client.get(f"/v1/customers/{cid}/events", headers=partner)).status == 404


async def test_who_may_read_profiles(client: Client, tokens: Tokens) -> None:
    agent = await tokens.agent()
    await upload(
        client, agent, [envelope(customer_id="c-1"), consent("c-1", partner=True, offset_s=1)]
    )
    assert (await client.get("/v1/customers/c-1", headers=agent)).status == 403
    aggregates_only = await tokens.partner("aggregates:read")
    assert (await client.get("/v1/customers/c-1", headers=aggregates_only)).status == 403
    assert (await client.get("/v1/customers/c-1")).status == 401
    wrong = {"Authorization": "Bearer cst_admin_wrong"}
    assert (await client.get("/v1/customers/c-1", headers=wrong)).status == 401


async def test_pseudonymised_customers_count_like_others(client: Client, tokens: Tokens) -> None:
    agent, admin = await tokens.agent(), await tokens.admin()
    pseudonym = "p-" + "ab" * 16  # what an agent uploads for a customer without profile_sharing
    await upload(client, agent, [envelope(customer_id=pseudonym, offset_s=i) for i in range(3)])
    profile = await (await client.get(f"/v1/customers/{pseudonym}", headers=admin)).json()
    assert profile["events"] == 3


async def test_aggregates_have_counts_and_no_personal_data(client: Client, tokens: Tokens) -> None:
    agent = await tokens.agent()
    await upload(
        client,
        agent,
        [
            envelope("product.pickup", customer_id="c-1", offset_s=1),
            envelope("product.pickup", customer_id="c-2", offset_s=2),
            envelope("telemetry", customer_id=None, offset_s=3),
            envelope("product.pickup", customer_id="c-3", offset_s=86_400),  # the next day
        ],
    )
    partner = await tokens.partner("aggregates:read")
    response = await client.get("/v1/aggregates?from=2026-11-22&to=2026-11-22", headers=partner)
    assert response.status == 200
    body = await response.json()
    assert body["aggregates"] == [
        {"day": "2026-11-22", "store_id": "store-001", "type": "product.pickup", "events": 2},
        {"day": "2026-11-22", "store_id": "store-001", "type": "telemetry", "events": 1},
    ]
    assert "c-1" not in json.dumps(body)
    everything = await (await client.get("/v1/aggregates", headers=partner)).json()
    assert sum(r["events"] for r in everything["aggregates"]) == 4
    profiles_only = await tokens.partner("profiles:read")
    assert (await client.get("/v1/aggregates", headers=profiles_only)).status == 403
    assert (await client.get("/v1/aggregates?from=nope", headers=partner)).status == 400


async def test_odd_ids_in_paths_are_4xx(client: Client, tokens: Tokens) -> None:
    admin, agent = await tokens.admin(), await tokens.agent()
    for path in ("/v1/customers/a%00b", "/v1/customers/" + "x" * 129):
        assert (await client.get(path, headers=admin)).status == 400
        assert (await client.delete(path, headers=admin)).status == 400
    assert (await client.get("/v1/customers/%ED%A0%80", headers=admin)).status == 404
    assert (await client.get("/v1/models/a%00b/model.onnx", headers=agent)).status in (400, 404)
    assert (await client.get("/v1/aggregates?store_id=a%00b", headers=admin)).status == 400
