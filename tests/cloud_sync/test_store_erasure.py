"""Erasure on both backends: data gone, the agents' feed, late uploads not resurrecting it."""

from __future__ import annotations

import io
import json
from typing import Any

import pytest
from aiohttp.test_utils import TestClient
from conftest import Tokens
from cstore_helpers import envelope

from cloud_sync.erasure_blinding import blind, blinding_key
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
    key = blinding_key(agent["Authorization"].removeprefix("Bearer "))
    assert sorted(e["blinded"] for e in feed["erasures"]) == sorted(
        blind(key, cid) for cid in ("app-9", "card-9")
    )
    assert "app-9" not in json.dumps(feed)
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


def token_of(headers: dict[str, str]) -> str:
    return headers["Authorization"].removeprefix("Bearer ")


async def test_each_agent_reads_the_feed_blinded_with_its_own_key_and_admins_in_clear(
    client: Client, tokens: Tokens
) -> None:
    first, second, admin = (
        await tokens.agent(),
        await tokens.agent("store-002"),
        await tokens.admin(),
    )
    assert (await client.delete("/v1/customers/c-gone", headers=admin)).status == 200
    one = (await (await client.get("/v1/erasures", headers=first)).json())["erasures"]
    two = (await (await client.get("/v1/erasures", headers=second)).json())["erasures"]
    clear = (await (await client.get("/v1/erasures", headers=admin)).json())["erasures"]
    assert one[0]["blinded"] == blind(blinding_key(token_of(first)), "c-gone")
    assert two[0]["blinded"] == blind(blinding_key(token_of(second)), "c-gone")
    assert one[0]["blinded"] != two[0]["blinded"]  # one agent's feed is noise to another
    assert "customer_id" not in one[0]
    assert clear[0]["customer_id"] == "c-gone"


PS_A = "ps-" + "a" * 32
PS_B = "ps-" + "b" * 32


async def test_pseudonyms_an_agent_reports_are_erased_at_its_store_only(
    client: Client, tokens: Tokens, backend: Backend
) -> None:
    agent, admin = await tokens.agent(), await tokens.admin()
    other = await tokens.agent("store-002")
    await upload(client, agent, [envelope(customer_id=PS_A, offset_s=n) for n in (1, 2)])
    await upload(client, other, [envelope(customer_id=PS_A, offset_s=3, store_id="store-002")])
    # The clear id was never uploaded; the request names it all the same.
    assert (await client.delete("/v1/customers/c-hidden", headers=admin)).status == 200
    feed = await (await client.get("/v1/erasures", headers=agent)).json()
    cursor = feed["next_after"]
    body = {"cursor": cursor, "pseudonyms": [PS_A]}
    answer = await client.post("/v1/erasures/pseudonyms", json=body, headers=agent)
    assert answer.status == 200
    assert await answer.json() == {"pseudonyms": 1, "events_deleted": 2}
    assert (await backend.stats()).events == 1  # store-002's event of that name stays
    late = await upload(client, agent, [envelope(customer_id=PS_A, offset_s=0)])
    assert late["erased"] == 1  # a backlog upload cannot bring the copy back
    # The report is not fed back to the agents (the reporter would match a returning
    # customer again and again); an admin sees it.
    newer = await (await client.get(f"/v1/erasures?after={cursor}", headers=agent)).json()
    assert newer == {"erasures": [], "next_after": cursor}
    audit = await (await client.get(f"/v1/erasures?after={cursor}", headers=admin)).json()
    assert [e["customer_id"] for e in audit["erasures"]] == [PS_A]


@pytest.mark.parametrize(
    ("body", "status"),
    [
        ({"cursor": "999", "pseudonyms": [PS_A]}, 400),
        ({"cursor": "x", "pseudonyms": [PS_A]}, 400),
        ({"cursor": "1", "pseudonyms": ["c-clear"]}, 400),
        ({"cursor": "1", "pseudonyms": []}, 400),
        ({"cursor": "1"}, 400),
    ],
)
async def test_pseudonym_reports_are_checked(
    client: Client, tokens: Tokens, body: dict[str, Any], status: int
) -> None:
    agent, admin = await tokens.agent(), await tokens.admin()
    partner = await tokens.partner("profiles:read")
    assert (await client.delete("/v1/customers/c-1", headers=admin)).status == 200
    answer = await client.post("/v1/erasures/pseudonyms", json=body, headers=agent)
    assert answer.status == status
    good = {"cursor": "1", "pseudonyms": [PS_A]}
    assert (await client.post("/v1/erasures/pseudonyms", json=good, headers=partner)).status == 403


async def test_a_withdrawal_rewrites_the_stores_clear_copies_to_the_pseudonym(
    client: Client, tokens: Tokens, backend: Backend
) -> None:
    agent, admin = await tokens.agent(), await tokens.admin()
    other = await tokens.agent("store-002")
    await upload(
        client,
        agent,
        [
            envelope(customer_id="c-w", offset_s=1),
            envelope(
                "customer.identified", customer_id="c-w", offset_s=2, data={"alias": "card-w"}
            ),
        ],
    )
    await upload(client, other, [envelope(customer_id="c-w", offset_s=3, store_id="store-002")])
    pairs = [
        {"customer_id": "c-w", "pseudonym": PS_A},
        {"customer_id": "card-w", "pseudonym": PS_B},
    ]
    answer = await client.post("/v1/pseudonymisations", json={"customers": pairs}, headers=agent)
    assert answer.status == 200
    assert (await answer.json())["events_rewritten"] == 2
    clear = await (await client.get("/v1/customers/c-w/events", headers=admin)).json()
    assert [e["store_id"] for e in clear["events"]] == ["store-002"]  # the other store's own
    hidden = await (await client.get(f"/v1/customers/{PS_A}/events", headers=admin)).json()
    assert {e["customer_id"] for e in hidden["events"]} == {PS_A}
    identified = [e for e in hidden["events"] if e["type"] == "customer.identified"]
    assert identified[0]["data"]["alias"] == PS_B
    assert await backend.identities(PS_A) == sorted([PS_A, PS_B])
    assert "card-w" not in await backend.identities("c-w")
    bad = {"customers": [{"customer_id": PS_B, "pseudonym": PS_A}]}
    assert (await client.post("/v1/pseudonymisations", json=bad, headers=agent)).status == 400


async def test_an_oversized_report_is_refused_while_reading(client: Client, tokens: Tokens) -> None:
    agent = await tokens.agent()
    body = json.dumps({"cursor": "1", "pseudonyms": [PS_A] * 40_000}).encode()  # about 1.5 MiB
    answer = await client.post(
        "/v1/erasures/pseudonyms",
        data=io.BytesIO(body),  # streamed: no Content-Length to refuse it by
        headers={**agent, "Content-Type": "application/json"},
    )
    assert answer.status == 413
    assert (await answer.json())["error"] == "body_too_large"
