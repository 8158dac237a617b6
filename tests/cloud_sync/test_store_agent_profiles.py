"""GET /v1/profiles/{id}: what an agent personalises with, consent-gated, on both backends."""

from __future__ import annotations

import json
from typing import Any

import psycopg
from aiohttp.test_utils import TestClient
from conftest import Tokens
from cstore_helpers import envelope

from cloud_sync.store.db_postgres import PROFILE_FACTS
from cloud_sync.store.profiles import INTERACTION_TYPES
from cloud_sync.store.records import PSEUDONYM_REGEX
from cloud_sync.store.sql_shared import MAX_IDENTITIES

Client = TestClient[Any, Any]
PSEUDONYM = "ps-" + "ab" * 16


async def upload(client: Client, headers: dict[str, str], events: list[dict[str, Any]]) -> None:
    response = await client.post(
        "/v1/events",
        data=json.dumps(events),
        headers={**headers, "Content-Type": "application/json"},
    )
    assert response.status == 200
    assert (await response.json())["rejected"] == []


def flags(customer_id: str, offset_s: float, store_id: str = "store-001", **kw: bool) -> Any:
    values = {"personalization": True, "profile_sharing": True, "partner_sharing": False}
    values.update(kw)
    return envelope(
        "consent.update",
        customer_id=customer_id,
        store_id=store_id,
        offset_s=offset_s,
        data=values,
    )


def pickup(customer_id: str, offset_s: float, sku: str, store_id: str = "store-001") -> Any:
    return envelope(
        "product.pickup",
        customer_id=customer_id,
        store_id=store_id,
        offset_s=offset_s,
        data={"sku": sku},
    )


async def test_a_consented_profile_spans_stores_and_linked_ids_newest_first(
    client: Client, tokens: Tokens
) -> None:
    north, south = await tokens.agent("store-001"), await tokens.agent("store-002")
    await upload(
        client,
        north,
        [
            flags("c-1", 1),
            pickup("c-1", 10, "SKU-A"),
            pickup("c-1", 20, "SKU-B"),
            envelope("suggestion.shown", customer_id="c-1", offset_s=21),
            envelope(
                "customer.identified",
                customer_id="c-1",
                offset_s=30,
                data={"method": "app", "alias": "app-1"},
            ),
            pickup("someone-else", 25, "SKU-Z"),
        ],
    )
    await upload(
        client,
        south,
        [
            flags("app-1", 40, "store-002"),
            pickup("app-1", 50, "SKU-A", "store-002"),
            envelope(
                "checkout.purchase",
                customer_id="app-1",
                store_id="store-002",
                offset_s=60,
                data={"items": ["SKU-A"]},
            ),
        ],
    )
    response = await client.get("/v1/profiles/c-1", headers=south)
    assert response.status == 200
    profile = await response.json()
    assert set(profile) == {"customer_id", "consent", "interactions", "aggregates", "generated_at"}
    assert profile["customer_id"] == "c-1"
    assert profile["consent"] == {
        "personalization": True,
        "profile_sharing": True,
        "partner_sharing": False,
    }
    got = [(i["ts"][17:23], i["type"], i["sku"], i["store_id"]) for i in profile["interactions"]]
    # Newest first; consent records and suggestions are not interactions; the linked id's
    # events from the other store are in.
    assert got == [
        ("00.000", "checkout.purchase", None, "store-002"),
        ("50.000", "product.pickup", "SKU-A", "store-002"),
        ("30.000", "customer.identified", None, "store-001"),
        ("20.000", "product.pickup", "SKU-B", "store-001"),
        ("10.000", "product.pickup", "SKU-A", "store-001"),
    ]
    assert all(isinstance(i["event_id"], str) for i in profile["interactions"])
    assert profile["aggregates"] == {"by_sku": {"SKU-A": 2, "SKU-B": 1}}
    # Either id finds the same profile.
    other = await (await client.get("/v1/profiles/app-1", headers=north)).json()
    assert other["interactions"] == profile["interactions"]

    limited = await (await client.get("/v1/profiles/c-1?limit=2", headers=north)).json()
    assert limited["interactions"] == profile["interactions"][:2]
    assert limited["aggregates"] == profile["aggregates"]  # counts are not capped by limit
    for bad in ("0", "1001", "x"):
        refused = await client.get(f"/v1/profiles/c-1?limit={bad}", headers=north)
        assert refused.status == 400


async def test_without_both_consents_a_profile_is_a_404_like_an_unknown_one(
    client: Client, tokens: Tokens
) -> None:
    agent = await tokens.agent()
    await upload(
        client,
        agent,
        [
            pickup("c-none", 1, "SKU-A"),  # no consent record at all
            flags("c-personal", 1, profile_sharing=False),
            pickup("c-personal", 2, "SKU-A"),
            flags("c-sharing", 1, personalization=False),
            pickup("c-sharing", 2, "SKU-A"),
            flags("c-withdrawn", 1),
            pickup("c-withdrawn", 2, "SKU-A"),
            # Dated before the grant, received after it: a withdrawal wins at once.
            flags("c-withdrawn", 0.5, personalization=False, profile_sharing=False),
            flags(PSEUDONYM, 1),
            pickup(PSEUDONYM, 2, "SKU-A"),
        ],
    )
    unknown = await client.get("/v1/profiles/c-unknown", headers=agent)
    assert unknown.status == 404
    body = await unknown.read()
    for cid in ("c-none", "c-personal", "c-sharing", "c-withdrawn", PSEUDONYM):
        response = await client.get(f"/v1/profiles/{cid}", headers=agent)
        assert response.status == 404, cid
        assert await response.read() == body, cid


async def test_a_pseudonym_linked_to_a_clear_id_never_joins_its_profile(
    client: Client, tokens: Tokens
) -> None:
    agent = await tokens.agent()
    await upload(
        client,
        agent,
        [
            flags("c-2", 1),
            pickup("c-2", 2, "SKU-A"),
            envelope(
                "customer.identified",
                customer_id="c-2",
                offset_s=4,
                data={"method": "card", "alias": PSEUDONYM},
            ),
        ],
    )
    await upload(client, agent, [pickup(PSEUDONYM, 5, "SKU-SECRET")])
    admin_view = await (await client.get("/v1/customers/c-2", headers=await tokens.admin())).json()
    assert PSEUDONYM in admin_view["identities"]  # the link holds; the agents' view skips it
    profile = await (await client.get("/v1/profiles/c-2", headers=agent)).json()
    assert "SKU-SECRET" not in {i["sku"] for i in profile["interactions"]}
    assert "SKU-SECRET" not in profile["aggregates"]["by_sku"]


async def test_only_agents_channels_and_admins_fetch_profiles(
    client: Client, tokens: Tokens
) -> None:
    agent = await tokens.agent()
    await upload(client, agent, [flags("c-3", 1), pickup("c-3", 2, "SKU-A")])
    partner = await tokens.partner("profiles:read", "events:read")
    assert (await client.get("/v1/profiles/c-3", headers=partner)).status == 403
    assert (await client.get("/v1/profiles/c-3")).status == 401
    assert (await client.get("/v1/profiles/c-3", headers=await tokens.admin())).status == 200


def test_postgres_answers_a_profile_from_the_customer_index(pg_url: str) -> None:
    """Every part of the profile query reads events through events_customer, never the
    whole table, and consent through identity_changes_customer."""
    from cloud_sync.store.cli import main

    assert main(["migrate", "--db", pg_url]) == 0
    with psycopg.connect(pg_url, autocommit=True) as conn:
        # A small table would be scanned whole anyway; forbid it to see what the plan can use.
        conn.execute("SET enable_seqscan = off")
        params = {
            "customer_id": "c-1",
            "max_ids": MAX_IDENTITIES,
            "pseudonym": PSEUDONYM_REGEX,
            "types": list(INTERACTION_TYPES),
            "limit": 200,
        }
        plan = conn.execute("EXPLAIN " + PROFILE_FACTS, params).fetchall()
        # events is partitioned (migration 6): events_customer is one index per partition.
        children = conn.execute(
            "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid"
            " WHERE i.inhparent = to_regclass('events_customer')"
        ).fetchall()
    text = "\n".join(str(row[0]) for row in plan)
    assert children, "events_customer has no partition indexes"
    for (child,) in children:  # history, interactions, counts: each reads every partition
        assert text.count(f" using {child} ") + text.count(f" on {child} ") == 3, text
    assert "identity_changes_customer" in text, text
    assert "Seq Scan on events" not in text, text
