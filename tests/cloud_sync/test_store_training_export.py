"""customer-store training export: consented customers only, one id per profile, and
`edge-models train` reads the file. Both backends."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient
from conftest import Tokens
from cstore_helpers import envelope, ts_text

from cloud_sync.store.cli import main

Client = TestClient[Any, Any]
GRANT = {"personalization": True, "profile_sharing": True, "partner_sharing": False}
NO_PERSONAL = {"personalization": False, "profile_sharing": True, "partner_sharing": True}


async def upload(client: Client, headers: dict[str, str], events: list[dict[str, Any]]) -> None:
    response = await client.post(
        "/v1/events",
        data=json.dumps(events),
        headers={**headers, "Content-Type": "application/json"},
    )
    assert response.status == 200
    assert (await response.json())["rejected"] == []


def history(customer_id: str, skus: list[str], start_s: float) -> list[dict[str, Any]]:
    return [
        envelope("product.pickup", customer_id=customer_id, offset_s=start_s + i, data={"sku": s})
        for i, s in enumerate(skus)
    ]


async def export(
    db_url: str, out: Path, capsys: pytest.CaptureFixture[str], *extra: str
) -> dict[str, int]:
    argv = ["training", "export", "--db", db_url, "--out", str(out), *extra]
    assert await asyncio.to_thread(main, argv) == 0
    summary: dict[str, int] = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    return summary


def lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


async def test_export_keeps_consented_profiles_only_and_trains(
    client: Client,
    tokens: Tokens,
    db_url: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    agent = await tokens.agent()
    catalogue = [f"SKU-{n:03d}" for n in range(12)]
    events: list[dict[str, Any]] = []
    for n in range(10):
        cid = f"c-{n:02d}"
        events.append(envelope("consent.update", customer_id=cid, offset_s=0, data=GRANT))
        events += history(cid, [catalogue[(n + k) % 12] for k in range(6)], 10 + n * 10)
    events += history("c-silent", ["SKU-SECRET-1"], 5)  # no consent record: left out
    events.append(envelope("consent.update", customer_id="c-no", offset_s=0, data=NO_PERSONAL))
    events += history("c-no", ["SKU-SECRET-2"], 5)
    # Granted, then withdrawn (dated earlier, received later: the withdrawal wins).
    events.append(envelope("consent.update", customer_id="c-gone", offset_s=2, data=GRANT))
    events += history("c-gone", ["SKU-SECRET-3"], 5)
    await upload(client, agent, events)
    await upload(
        client,
        agent,
        [
            envelope("consent.update", customer_id="c-gone", offset_s=1, data=NO_PERSONAL),
            # The app account of c-00: its events train under the profile's id.
            envelope(
                "customer.identified",
                customer_id="c-00",
                offset_s=200,
                data={"method": "app", "alias": "z-app-00"},
            ),
        ],
    )
    # Its own consent too: an id with a history and no consent record closes the profile.
    await upload(
        client,
        agent,
        [
            envelope("consent.update", customer_id="z-app-00", offset_s=250, data=GRANT),
            *history("z-app-00", ["SKU-011"], 300),
        ],
    )

    out = tmp_path / "export.jsonl"
    summary = await export(db_url, out, capsys)
    exported = lines(out)
    customers = {e["customer_id"] for e in exported}
    assert customers == {f"c-{n:02d}" for n in range(10)}
    assert not any("SECRET" in json.dumps(e) for e in exported)
    assert summary["customers"] == 10
    assert summary["excluded_customers"] == 3
    app_events = [e for e in exported if e["ts"] == ts_text(300)]
    assert [e["customer_id"] for e in app_events] == ["c-00"]

    model_dir = tmp_path / "model"
    trained = await asyncio.to_thread(
        subprocess.run,
        [
            sys.executable,
            "-m",
            "models.cli",
            "train",
            "--events",
            str(out),
            "--out",
            str(model_dir),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert trained.returncode == 0, trained.stderr
    assert json.loads(trained.stdout.strip().splitlines()[-1])["items"] == len(catalogue)
    assert (model_dir / "model.onnx").is_file()
    assert (model_dir / "manifest.json").is_file()


async def test_since_keeps_newer_events_and_every_consent(
    client: Client,
    tokens: Tokens,
    db_url: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    agent = await tokens.agent()
    await upload(
        client,
        agent,
        [
            envelope("consent.update", customer_id="c-1", offset_s=0, data=GRANT),
            *history("c-1", ["SKU-OLD"], 10),
            *history("c-1", ["SKU-NEW"], 100),
        ],
    )
    out = tmp_path / "since.jsonl"
    await export(db_url, out, capsys, "--since", ts_text(50))
    kinds = sorted((e["type"], e["data"].get("sku")) for e in lines(out))
    assert kinds == [("consent.update", None), ("product.pickup", "SKU-NEW")]
    argv = ["training", "export", "--db", db_url, "--out", str(out), "--since", "yesterday"]
    assert await asyncio.to_thread(main, argv) == 1
    assert "RFC 3339" in capsys.readouterr().err
