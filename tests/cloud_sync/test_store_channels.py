"""Channel credentials: a web shop posts like a store under its own name, and joins profiles."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from aiohttp.test_utils import TestClient
from conftest import Tokens
from cstore_helpers import envelope

from cloud_sync.store.cli import main

Client = TestClient[Any, Any]


async def cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = await asyncio.to_thread(main, list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}


async def post(client: Client, headers: dict[str, str], events: list[Any]) -> Any:
    response = await client.post("/v1/events", data=json.dumps(events), headers=headers)
    assert response.status == 200
    return await response.json()


async def test_a_channel_posts_under_its_name_and_joins_the_same_profile(
    client: Client, tokens: Tokens, db_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = await cli(capsys, "channel", "create", "--db", db_url, "--name", "web-shop")
    assert code == 0
    web = bearer(out.strip().splitlines()[-1])
    store = await tokens.agent("store-001")
    grant = {"personalization": True, "profile_sharing": True, "partner_sharing": False}
    await post(
        client,
        {**store, "Content-Type": "application/json"},
        [
            envelope("consent.update", customer_id="c-7", offset_s=1, data=grant),
            envelope("product.pickup", customer_id="c-7", offset_s=2, data={"sku": "SKU-S"}),
        ],
    )
    web_events = [
        envelope(
            "consent.update", customer_id="web-7", store_id="web-shop", offset_s=3, data=grant
        ),
        envelope(
            "kiosk.view",
            customer_id="web-7",
            store_id="web-shop",
            channel="https",
            device_id="browser",
            offset_s=4,
            data={"sku": "SKU-W"},
        ),
        # The shop's login names the loyalty card the store knows: one customer.
        envelope(
            "customer.identified",
            customer_id="web-7",
            store_id="web-shop",
            offset_s=5,
            data={"method": "web", "alias": "c-7"},
        ),
    ]
    answer = await post(client, web, web_events)
    assert answer["accepted"] == 3
    # A channel speaks only for itself.
    forged = await post(client, web, [envelope("product.pickup", store_id="store-001")])
    assert forged["rejected"][0]["reason"] == "store_mismatch"

    # The link is held: both ids have a history, one channel's word does not merge them
    # (the same identity rules as stores). The store that saw c-7 corroborates it.
    held = await (await client.get("/v1/profiles/c-7", headers=store)).json()
    assert {i["store_id"] for i in held["interactions"]} == {"store-001"}
    await post(
        client,
        {**store, "Content-Type": "application/json"},
        [
            envelope(
                "customer.identified",
                customer_id="c-7",
                offset_s=6,
                data={"method": "web", "alias": "web-7"},
            )
        ],
    )
    joined = await (await client.get("/v1/profiles/c-7", headers=web)).json()
    assert {(i["store_id"], i["sku"]) for i in joined["interactions"]} >= {
        ("store-001", "SKU-S"),
        ("web-shop", "SKU-W"),
    }


async def test_channel_list_revoke_rotate_and_name_clashes(
    client: Client, tokens: Tokens, db_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = await cli(capsys, "channel", "create", "--db", db_url, "--name", "app")
    assert code == 0
    first = bearer(out.strip().splitlines()[-1])
    code, out, _ = await cli(capsys, "channel", "list", "--db", db_url)
    listed = [json.loads(line) for line in out.strip().splitlines()]
    assert [(c["kind"], c["name"], c["store_id"]) for c in listed] == [("channel", "app", "app")]
    assert "cst_channel_" not in out

    code, out, _ = await cli(
        capsys, "channel", "rotate", "--db", db_url, "--id", str(listed[0]["id"])
    )
    assert code == 0
    second = bearer(out.strip().splitlines()[-1])
    event = [envelope("product.pickup", store_id="app")]
    assert (await client.post("/v1/events", data=json.dumps(event), headers=first)).status == 401
    assert (await post(client, second, event))["accepted"] == 1

    code, out, _ = await cli(capsys, "channel", "list", "--db", db_url)
    new_id = json.loads(out.strip().splitlines()[-1])["id"]
    assert (await cli(capsys, "channel", "revoke", "--db", db_url, "--id", str(new_id)))[0] == 0
    assert (await client.post("/v1/events", data=json.dumps(event), headers=second)).status == 401

    # A channel may not take a store's id, nor a store a channel's name.
    await tokens.agent("store-009")
    code, _, err = await cli(capsys, "channel", "create", "--db", db_url, "--name", "store-009")
    assert code == 1
    assert "store's id" in err
    code, _, err = await cli(capsys, "token", "create", "--db", db_url, "--store", "app")
    assert code == 1
    assert "channel's name" in err
