"""The trust model for consent and identity, as a compromised store box would try it.

Against the app on real SQLite and PostgreSQL; the audit commands run as real processes.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from typing import Any

from aiohttp.test_utils import TestClient
from conftest import Tokens
from cstore_helpers import consent, envelope

from cloud_sync.store.backend import Backend

Client = TestClient[Any, Any]
JSON = {"Content-Type": "application/json"}


def iso(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def dated(event: dict[str, Any], moment: datetime) -> dict[str, Any]:
    return {**event, "ts": iso(moment), "received_at": iso(moment)}


def link(
    customer_id: str, alias: str, *, store_id: str = "store-001", method: str = "card"
) -> dict[str, Any]:
    return envelope(
        "customer.identified",
        customer_id=customer_id,
        store_id=store_id,
        offset_s=30,
        data={"method": method, "alias": alias},
    )


async def post(client: Client, headers: dict[str, str], items: list[Any]) -> dict[str, Any]:
    response = await client.post("/v1/events", data=json.dumps(items), headers={**JSON, **headers})
    assert response.status == 200
    answer: dict[str, Any] = await response.json()
    return answer


def store_cli(db_url: str, *args: str) -> str:
    command = [sys.executable, "-m", "cloud_sync.store", *args[:2], "--db", db_url, *args[2:]]
    done = subprocess.run(command, capture_output=True, text=True, timeout=60, check=True)
    return done.stdout


async def test_forged_future_consent_never_opens_a_customer(client: Client, tokens: Tokens) -> None:
    home, rogue = await tokens.agent("store-001"), await tokens.agent("store-002")
    partner = await tokens.partner("profiles:read")
    now = datetime.now(UTC)
    await post(
        client,
        home,
        [
            envelope(customer_id="victim", offset_s=1),
            consent("victim", partner=False, offset_s=2),
        ],
    )
    forged_2099 = consent("victim", partner=True, offset_s=0, store_id="store-002")
    forged_2099 = {**forged_2099, "ts": "2099-01-01T00:00:00.000Z"}
    answer = await post(client, rogue, [forged_2099])
    assert answer["rejected"] == [
        {"index": 0, "event_id": forged_2099["event_id"], "reason": "ts_in_future"}
    ]
    assert (await client.get("/v1/customers/victim", headers=partner)).status == 404
    # Dated a little ahead (within the allowed skew), it is stored; the genuine withdrawal
    # that follows is dated before it, and still wins: withdrawals count on receipt.
    ahead = consent("victim", partner=True, offset_s=0, store_id="store-002")
    assert (await post(client, rogue, [dated(ahead, now + timedelta(seconds=200))]))[
        "accepted"
    ] == 1
    assert (await client.get("/v1/customers/victim", headers=partner)).status == 200
    withdrawal = dated(consent("victim", partner=False, offset_s=0), now)
    assert (await post(client, home, [withdrawal]))["accepted"] == 1
    assert (await client.get("/v1/customers/victim", headers=partner)).status == 404
    # An old grant from a backlog, received last, does not undo the newer withdrawal.
    backlog = consent("victim", partner=True, offset_s=0)
    await post(client, home, [dated(backlog, now - timedelta(hours=1))])
    assert (await client.get("/v1/customers/victim", headers=partner)).status == 404


async def test_forged_link_reads_and_erases_nothing_of_the_victim(
    client: Client, tokens: Tokens
) -> None:
    home, rogue = await tokens.agent("store-001"), await tokens.agent("store-002")
    partner, admin = await tokens.partner("profiles:read"), await tokens.admin()
    await post(client, home, [envelope(customer_id="victim", offset_s=i) for i in range(3)])
    await post(
        client,
        rogue,
        [
            envelope(customer_id="attacker", store_id="store-002", offset_s=1),
            consent("attacker", partner=True, offset_s=2, store_id="store-002"),
            link("attacker", "victim", store_id="store-002"),
            # A fresh id the rogue store has never seen, claimed to be the victim too.
            link("fresh", "victim", store_id="store-002"),
        ],
    )
    profile = await client.get("/v1/customers/attacker", headers=partner)
    assert profile.status == 200
    assert (await profile.json())["identities"] == ["attacker"]
    page = await (await client.get("/v1/customers/attacker/events", headers=partner)).json()
    assert {e["customer_id"] for e in page["events"]} == {"attacker"}
    assert (await client.get("/v1/customers/victim", headers=partner)).status == 404
    assert (await client.get("/v1/customers/fresh", headers=admin)).status == 200
    fresh = await (await client.get("/v1/customers/fresh", headers=admin)).json()
    assert fresh["identities"] == ["fresh"]

    erased = await client.delete("/v1/customers/attacker", headers=admin)
    assert (await erased.json())["identities"] == ["attacker"]
    victim = await (await client.get("/v1/customers/victim", headers=admin)).json()
    assert victim["events"] == 3


async def test_links_from_undeclared_kinds_are_refused_and_held_links_need_a_second_store(
    client: Client, tokens: Tokens, backend: Backend
) -> None:
    home, other = await tokens.agent("store-001"), await tokens.agent("store-002")
    admin = await tokens.admin()
    await post(
        client,
        home,
        [
            envelope(customer_id="card-1", offset_s=1),
            envelope(customer_id="app-1", offset_s=2),
            link("card-1", "app-1", method="free_text"),  # not an identifier kind
            link("card-1", "app-1"),  # two histories: not merged on one store's word
            link("card-1", "new-1"),  # a new id attached to a history this store saw
        ],
    )
    ids = (await (await client.get("/v1/customers/card-1", headers=admin)).json())["identities"]
    assert ids == ["card-1", "new-1"]
    # A second store asserting the same link (either direction) corroborates it.
    await post(client, other, [link("app-1", "card-1", store_id="store-002")])
    ids = (await (await client.get("/v1/customers/card-1", headers=admin)).json())["identities"]
    assert ids == ["app-1", "card-1", "new-1"]
    trail = [c for c in await backend.audit("app-1", 10) if c.kind == "link"]
    assert [(c.method, c.status, c.reason) for c in trail] == [
        ("free_text", "refused", "undeclared_method"),
        ("card", "applied", "corroborated"),
        ("card", "applied", "corroborated"),
    ]
    # The edge stays while one applied change still asserts it.
    now = datetime.now(UTC)
    await backend.decide_change(trail[1].change_id, "undo", "admin:t", now)
    assert await backend.identities("app-1") == ["app-1", "card-1", "new-1"]
    await backend.decide_change(trail[2].change_id, "undo", "admin:t", now)
    assert await backend.identities("app-1") == ["app-1"]


async def test_audit_lists_origin_and_undoes_or_applies_changes(
    client: Client, tokens: Tokens, db_url: str
) -> None:
    home = await tokens.agent("store-001")
    partner, admin = await tokens.partner("profiles:read"), await tokens.admin()
    await post(
        client,
        home,
        [
            envelope(customer_id="c-1", offset_s=1),
            envelope(customer_id="c-2", offset_s=1),
            consent("c-1", partner=True, offset_s=2),
            link("c-1", "c-2"),
        ],
    )
    assert (await client.get("/v1/customers/c-1", headers=partner)).status == 200
    listed = await asyncio.to_thread(store_cli, db_url, "audit", "list", "--customer", "c-1")
    changes = [json.loads(line) for line in listed.splitlines()]
    assert [(c["kind"], c["status"], c["reason"]) for c in changes] == [
        ("consent", "applied", ""),
        ("link", "held", "merges_established_profiles"),
    ]
    grant, held = changes
    assert grant["store_id"] == "store-001"
    assert isinstance(grant["credential_id"], int)
    assert grant["flags"]["partner_sharing"] is True

    undone = json.loads(
        await asyncio.to_thread(store_cli, db_url, "audit", "undo", str(grant["id"]))
    )
    assert undone["status"] == "undone"
    assert undone["decided_by"] == "admin:operator"
    assert (await client.get("/v1/customers/c-1", headers=partner)).status == 404

    await asyncio.to_thread(store_cli, db_url, "audit", "apply", str(held["id"]))
    ids = (await (await client.get("/v1/customers/c-2", headers=admin)).json())["identities"]
    assert ids == ["c-1", "c-2"]
    await asyncio.to_thread(store_cli, db_url, "audit", "undo", str(held["id"]))
    ids = (await (await client.get("/v1/customers/c-2", headers=admin)).json())["identities"]
    assert ids == ["c-2"]
    refused = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "cloud_sync.store", "audit", "undo", "--db", db_url, "999999"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert refused.returncode == 1
    assert "no identity change 999999" in refused.stderr
