"""Staged rollout: the evaluation gate, canary by store id, promote/rollback, fleet acceptance
and the automatic rollback of a clearly worse canary. Both backends; the server's periodic
check against a real store process."""

from __future__ import annotations

import asyncio
import hashlib
import json
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestClient
from conftest import Tokens
from sync_helpers import StoreProcess, eventually, store_cli

from cloud_sync.store.cli import main

Client = TestClient[Any, Any]


def model_dir(root: Path, version: str, *, evaluation: dict[str, Any] | None = None) -> Path:
    directory = root / version
    directory.mkdir()
    payload = f"model {version}".encode()
    (directory / "model.onnx").write_bytes(payload)
    manifest = {"version": version, "sha256": hashlib.sha256(payload).hexdigest()}
    (directory / "manifest.json").write_text(json.dumps(manifest))
    if evaluation is not None:
        (directory / "evaluation.json").write_text(json.dumps(evaluation))
    return directory


def evaluation(candidate: str, current: str | None, *, beats: bool = True) -> dict[str, Any]:
    def side(version: str, hit: float) -> dict[str, Any]:
        return {"version": version, "hit_rate@10": hit, "ndcg@10": hit / 2, "snips": None}

    return {
        "candidate": side(candidate, 0.4 if beats else 0.1),
        "current": None if current is None else side(current, 0.2),
        "beats_current": beats,
    }


async def cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = await asyncio.to_thread(main, list(argv))
    out, err = capsys.readouterr()
    return code, out.strip(), err


async def served(client: Client, tokens: Tokens, stores: list[str]) -> dict[str, str]:
    versions: dict[str, str] = {}
    for store_id in stores:
        response = await client.get("/v1/models/latest", headers=await tokens.agent(store_id))
        assert response.status == 200
        versions[store_id] = (await response.json())["version"]
    return versions


async def test_gate_canary_promote_and_rollback(
    client: Client,
    tokens: Tokens,
    db_url: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    stores = [f"store-{n:03d}" for n in range(60)]
    code, out, _ = await cli(
        capsys, "model", "publish", "--db", db_url, "--dir", str(model_dir(tmp_path, "v1"))
    )
    assert code == 0
    assert "promoted" in out

    # The gate: no evaluation, a losing one, or one against another current version.
    bare = model_dir(tmp_path, "v2")
    code, _, err = await cli(
        capsys, "model", "publish", "--db", db_url, "--dir", str(bare), "--canary", "30"
    )
    assert code == 1
    assert "evaluation.json is missing" in err
    assert "--force" in err
    (bare / "evaluation.json").write_text(json.dumps(evaluation("v2", "v1", beats=False)))
    code, _, err = await cli(
        capsys, "model", "publish", "--db", db_url, "--dir", str(bare), "--canary", "30"
    )
    assert code == 1
    assert "does not beat the current version v1" in err
    (bare / "evaluation.json").write_text(json.dumps(evaluation("v2", "v0")))
    code, _, err = await cli(
        capsys, "model", "publish", "--db", db_url, "--dir", str(bare), "--canary", "30"
    )
    assert code == 1
    assert "not evaluated against the current version v1" in err
    assert set((await served(client, tokens, stores)).values()) == {"v1"}

    (bare / "evaluation.json").write_text(json.dumps(evaluation("v2", "v1")))
    code, out, _ = await cli(
        capsys, "model", "publish", "--db", db_url, "--dir", str(bare), "--canary", "30"
    )
    assert code == 0
    assert "canary percent=30 gate=beats_current" in out
    first = await served(client, tokens, stores)
    canary = {s for s, v in first.items() if v == "v2"}
    assert 5 <= len(canary) <= 35  # about 30 % of 60 stores, by hash of the store id
    assert await served(client, tokens, stores) == first  # the same stores every time
    admin = await client.get("/v1/models/latest", headers=await tokens.admin())
    assert (await admin.json())["version"] == "v1"

    # A larger share keeps the stores it had and adds others.
    forced = model_dir(tmp_path, "v3")
    code, out, _ = await cli(
        capsys,
        "model",
        "publish",
        "--db",
        db_url,
        "--dir",
        str(forced),
        "--canary",
        "60",
        "--force",
    )
    assert code == 0
    assert "gate=forced: " in out
    wider = {s for s, v in (await served(client, tokens, stores)).items() if v == "v3"}
    assert canary <= wider
    assert set((await served(client, tokens, stores)).values()) == {"v1", "v3"}

    assert (await cli(capsys, "model", "promote", "--db", db_url, "v3"))[0] == 0
    assert set((await served(client, tokens, stores)).values()) == {"v3"}
    code, out, _ = await cli(capsys, "model", "rollback", "--db", db_url, "v3")
    assert code == 0
    assert json.loads(out)["state"]["current_version"] == "v1"
    assert set((await served(client, tokens, stores)).values()) == {"v1"}
    code, _, err = await cli(capsys, "model", "rollback", "--db", db_url, "v1")
    assert code == 1
    assert "nothing to go back to" in err
    code, _, err = await cli(capsys, "model", "promote", "--db", db_url, "v9")
    assert code == 1
    assert "no published model version" in err

    code, out, _ = await cli(capsys, "model", "status", "--db", db_url)
    log = json.loads(out)["log"]
    assert [(e["action"], e["version"]) for e in reversed(log)] == [
        ("publish", "v1"),
        ("canary", "v2"),
        ("canary", "v3"),
        ("promote", "v3"),
        ("rollback", "v3"),
    ]
    assert all(e["decided_by"] == "admin:operator" for e in log)


def now_text(offset_s: float = 0.0) -> str:
    moment = datetime.now(UTC) + timedelta(seconds=offset_s)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def shown(
    store_id: str,
    version: str,
    skus: list[str],
    propensities: list[float],
    explored: int | None,
    suggestion_id: str | None = None,
) -> dict[str, Any]:
    return {
        "event_id": str(uuid.uuid4()),
        "type": "suggestion.shown",
        "ts": now_text(),
        "store_id": store_id,
        "device_id": "screen-1",
        "customer_id": "c-1",
        "source": "personalizer",
        "schema": 1,
        "data": {
            "suggestion_id": suggestion_id or str(uuid.uuid4()),
            "items": [{"sku": s, "score": 0.5} for s in skus],
            "source": "model",
            "model_version": version,
            "propensities": propensities,
            "explored_slot": explored,
        },
    }


def accepted(store_id: str, suggestion_id: str, sku: str) -> dict[str, Any]:
    return {
        "event_id": str(uuid.uuid4()),
        "type": "suggestion.accepted",
        "ts": now_text(),
        "store_id": store_id,
        "device_id": "screen-1",
        "customer_id": "c-1",
        "source": "personalizer",
        "schema": 1,
        "data": {"suggestion_id": suggestion_id, "sku": sku},
    }


async def upload(client: Client, headers: dict[str, str], events: list[dict[str, Any]]) -> None:
    response = await client.post(
        "/v1/events",
        data=json.dumps(events),
        headers={**headers, "Content-Type": "application/json"},
    )
    assert response.status == 200
    assert (await response.json())["rejected"] == []


async def test_performance_counts_shown_accepted_explored_and_snips(
    client: Client, tokens: Tokens, db_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert (
        await cli(
            capsys, "model", "publish", "--db", db_url, "--dir", str(model_dir(tmp_path, "v1"))
        )
    )[0] == 0
    north, south = await tokens.agent("store-001"), await tokens.agent("store-002")
    explored = shown("store-001", "v1", ["A", "B", "C"], [1.0, 1.0, 0.02], 2, "s-1")
    greedy = shown("store-001", "v1", ["A", "B", "C"], [1.0, 1.0, 0.9], None, "s-2")
    await upload(
        client,
        north,
        [
            explored,
            greedy,
            accepted("store-001", "s-1", "C"),
            accepted("store-001", "s-2", "A"),
            accepted("store-001", "s-2", "A"),  # accepted twice: one accepted suggestion
        ],
    )
    await upload(
        client,
        south,
        [
            shown("store-002", "v1", ["D", "E"], [1.0, 0.9], None, "s-3"),
            shown("store-002", "v-other", ["A"], [1.0], None, "s-4"),
            accepted("store-002", "s-4", "A"),
            accepted("store-002", "s-1", "C"),  # another store's suggestion id: not s-1's
        ],
    )
    response = await client.get("/v1/models/v1/performance", headers=await tokens.admin())
    assert response.status == 200
    body = await response.json()
    weights = (1 + 1 + 1 / 0.02) + (1 + 1 + 1 / 0.9) + (1 + 1 / 0.9)
    assert body == {
        "version": "v1",
        "stores": 2,
        "shown": 3,
        "accepted": 2,
        "acceptance_rate": round(2 / 3, 6),
        "explored_shown": 1,
        "explored_accepted": 1,
        "snips": round((1 / 0.02 + 1) / weights, 6),
    }
    assert (await client.get("/v1/models/v1/performance", headers=north)).status == 403
    missing = await client.get("/v1/models/v9/performance", headers=await tokens.admin())
    assert missing.status == 404


async def feedback(
    client: Client, headers: dict[str, str], store_id: str, version: str, count: int, taken: int
) -> None:
    events: list[dict[str, Any]] = []
    for n in range(count):
        event = shown(store_id, version, ["A", "B"], [1.0, 0.9], None)
        events.append(event)
        if n < taken:
            events.append(accepted(store_id, event["data"]["suggestion_id"], "A"))
    await upload(client, headers, events)


async def test_a_clearly_worse_canary_is_rolled_back_by_model_check(
    client: Client, tokens: Tokens, db_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert (
        await cli(
            capsys, "model", "publish", "--db", db_url, "--dir", str(model_dir(tmp_path, "v1"))
        )
    )[0] == 0
    v2 = model_dir(tmp_path, "v2", evaluation=evaluation("v2", "v1"))
    assert (
        await cli(capsys, "model", "publish", "--db", db_url, "--dir", str(v2), "--canary", "50")
    )[0] == 0
    control, canary = await tokens.agent("store-c"), await tokens.agent("store-k")
    # Too few shown to judge: nothing happens, whatever the rates.
    await feedback(client, control, "store-c", "v1", 100, 50)
    await feedback(client, canary, "store-k", "v2", 100, 10)
    code, out, _ = await cli(capsys, "model", "check", "--db", db_url, "--min-shown", "300")
    assert code == 0
    result = json.loads(out)
    assert result["rolled_back"] is False
    assert result["verdict"]["reason"].startswith("too_few_shown")

    # Similar rates with enough shown: kept.
    await feedback(client, control, "store-c", "v1", 300, 100)
    await feedback(client, canary, "store-k", "v2", 300, 130)
    code, out, _ = await cli(capsys, "model", "check", "--db", db_url, "--min-shown", "300")
    assert json.loads(out)["verdict"]["reason"] == "not_clearly_worse"
    assert json.loads(out)["rolled_back"] is False

    # The canary's acceptance falls clearly below: rolled back and logged.
    await feedback(client, canary, "store-k", "v2", 400, 20)
    code, out, _ = await cli(capsys, "model", "check", "--db", db_url, "--min-shown", "300")
    result = json.loads(out)
    assert result["rolled_back"] is True
    assert result["verdict"]["z"] < -2.326
    assert result["canary"]["shown"] == 800
    assert result["control"]["shown"] == 400
    code, out, _ = await cli(capsys, "model", "status", "--db", db_url)
    status = json.loads(out)
    assert status["state"]["canary_version"] is None
    assert status["state"]["current_version"] == "v1"
    last = status["log"][0]
    assert (last["action"], last["version"]) == ("auto_rollback", "v2")
    assert "below control" in last["reason"]
    latest = await client.get("/v1/models/latest", headers=canary)
    assert (await latest.json())["version"] == "v1"


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
async def test_the_server_checks_the_canary_periodically(db_url: str, tmp_path: Path) -> None:
    store = StoreProcess(
        db_url, tmp_path / "store.log", extra=("--rollout-check-s", "0.2", "--min-shown", "50")
    )
    store.start()
    try:
        store_cli(db_url, "model", "publish", "--dir", str(model_dir(tmp_path, "v1")))
        v2 = model_dir(tmp_path, "v2", evaluation=evaluation("v2", "v1"))
        store_cli(db_url, "model", "publish", "--dir", str(v2), "--canary", "50")
        async with aiohttp.ClientSession(base_url=store.url) as session:
            for store_id, version, taken in (("store-c", "v1", 40), ("store-k", "v2", 2)):
                token = store_cli(db_url, "token", "create", "--store", store_id)
                events: list[dict[str, Any]] = []
                for n in range(60):
                    event = shown(store_id, version, ["A"], [1.0], None)
                    events.append(event)
                    if n < taken:
                        events.append(accepted(store_id, event["data"]["suggestion_id"], "A"))
                async with session.post(
                    "/v1/events",
                    json=events,
                    headers={"Authorization": f"Bearer {token}"},
                ) as response:
                    assert response.status == 200

        def rolled_back() -> bool:
            status = json.loads(store_cli(db_url, "model", "status"))
            return bool(status["state"]["canary_version"] is None)

        await eventually(rolled_back, 20, every=0.3)
        status = json.loads(store_cli(db_url, "model", "status"))
    finally:
        store.stop()
    assert status["log"][0]["action"] == "auto_rollback"
    assert status["log"][0]["decided_by"] == "server:rollout-check"
    assert "store.model.auto_rollback version=v2" in (tmp_path / "store.log").read_text()
