"""Erasure on both backends: data gone, the agents' feed, late uploads not resurrecting it."""

from __future__ import annotations

import json
from typing import Any

from aiohttp.test_utils import TestClient
from conftest import Tokens
from cstore_helpers import envelope

from cloud_sync.store.backend import Backend

Client = TestClient[Any, Any]


async def upload(client: Client, headers: dict[str, str], events: list[dict[str, Any]]) -> Any:
    response = await client.post(
        "/v1/events",
        data=json.dumps(events),
        headers={**headers, "Content-Type": "application/json"},
    )
    assert response.status == 200
    return await response.json()


async def test_erasure_removes_the_profile_and_feeds_the_agents(
    client: Client, tokens: Tokens, backend: Backend
) -> None:
    agent, admin = await tokens.agent(), await tokens.admin()
    kept = envelope(customer_id="c-keep", offset_s=1)
    link = {"method": "app", "alias": "app-9"}
    gone = [
        envelope(customer_id="card-9", offset_s=1),
        envelope("customer.identified", customer_id="card-9", offset_s=2, data=link),
        envelope("kiosk.view", customer_id="app-9", offset_s=3),
    ]
    await upload(client, agent, [kept, *gone[:2]])
    await upload(client, agent, gone[2:])  # after the link: app-9 was a new id when linked
    assert (await client.get("/v1/erasures", headers=agent)).status == 200
    before = await (await client.get("/v1/erasures", headers=agent)).json()
    assert before == {"erasures": [], "next_after": "0"}

    response = await client.delete("/v1/customers/app-9", headers=admin)
    assert response.status == 200
    answer = await response.json()
    assert answer["identities"] == ["app-9", "card-9"]
    assert answer["events_deleted"] == 3

    for cid in ("app-9", "card-9"):
        assert (await client.get(f"/v1/customers/{cid}", headers=admin)).status == 404
    assert (await client.get("/v1/customers/c-keep", headers=admin)).status == 200
    stats = await backend.stats()
    assert (stats.events, stats.customers, stats.erasures) == (1, 1, 2)

    feed = await (await client.get("/v1/erasures?after=0", headers=agent)).json()
    assert sorted(e["customer_id"] for e in feed["erasures"]) == ["app-9", "card-9"]
    after = feed["next_after"]
    assert (await (await client.get(f"/v1/erasures?after={after}", headers=agent)).json())[
        "erasures"
    ] == []
    one = await (await client.get("/v1/erasures?after=0&limit=1", headers=agent)).json()
    assert len(one["erasures"]) == 1
    assert one["next_after"] == one["erasures"][0]["cursor"]


async def test_events_buffered_before_the_erasure_do_not_come_back(
    client: Client, tokens: Tokens, backend: Backend
) -> None:
    agent, admin = await tokens.agent(), await tokens.admin()
    first = envelope(customer_id="c-5", offset_s=1)
    await upload(client, agent, [first])
    assert (await client.delete("/v1/customers/c-5", headers=admin)).status == 200
    # The agent had not applied the erasure yet and uploads (again) what it buffered.
    late = envelope(customer_id="c-5", offset_s=2)
    answer = await upload(client, agent, [first, late])
    assert (answer["accepted"], answer["erased"]) == (0, 2)
    assert (await backend.stats()).events == 0
    assert (await client.get("/v1/customers/c-5", headers=admin)).status == 404


async def test_only_admins_erase_and_feeds_need_a_token(client: Client, tokens: Tokens) -> None:
    agent, partner = await tokens.agent(), await tokens.partner("profiles:read")
    await upload(client, agent, [envelope(customer_id="c-1")])
    assert (await client.delete("/v1/customers/c-1", headers=agent)).status == 403
    assert (await client.delete("/v1/customers/c-1", headers=partner)).status == 403
    assert (await client.delete("/v1/customers/c-1")).status == 401
    assert (await client.get("/v1/erasures")).status == 401
    assert (await client.get("/v1/erasures", headers=partner)).status == 403
    assert (await client.get("/v1/erasures?after=x", headers=agent)).status == 400
