"""Model publication through the CLI, then the agents' download path, on both backends."""

from __future__ import annotations

import asyncio
import hashlib
import json
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient
from conftest import Tokens

from cloud_sync.store.cli import main
from cloud_sync.store.errors import ModelPublishError
from cloud_sync.store.model_publish import read_model_dir

Client = TestClient[Any, Any]


def model_dir(
    root: Path,
    version: str,
    payload: bytes,
    sha256: str | None = None,
    *,
    beats: str | None = None,
) -> Path:
    """A model directory; with ``beats`` an evaluation.json saying it beats that version."""
    directory = root / version
    directory.mkdir()
    (directory / "model.onnx").write_bytes(payload)
    manifest = {
        "version": version,
        "sha256": sha256 or hashlib.sha256(payload).hexdigest(),
        "features": ["recent_skus"],
    }
    (directory / "manifest.json").write_text(json.dumps(manifest))
    if beats is not None:
        evaluation = {
            "candidate": {"version": version, "hit_rate@10": 0.3, "ndcg@10": 0.2, "snips": None},
            "current": {"version": beats, "hit_rate@10": 0.2, "ndcg@10": 0.1, "snips": None},
            "beats_current": True,
        }
        (directory / "evaluation.json").write_text(json.dumps(evaluation))
    return directory


async def publish(db_url: str, directory: Path) -> int:
    # The CLI runs its own event loop, so it runs on a thread here.
    return await asyncio.to_thread(
        main, ["model", "publish", "--db", db_url, "--dir", str(directory)]
    )


async def test_publish_then_latest_and_artifact(
    client: Client, tokens: Tokens, db_url: str, tmp_path: Path
) -> None:
    agent = await tokens.agent()
    assert (await client.get("/v1/models/latest", headers=agent)).status == 404
    first = bytes(range(256)) * 40
    second = b"\x08\x01second-model" * 100
    assert await publish(db_url, model_dir(tmp_path, "2026.11.1", first)) == 0
    assert await publish(db_url, model_dir(tmp_path, "2026.11.2", second, beats="2026.11.1")) == 0

    latest = await client.get("/v1/models/latest", headers=agent)
    assert latest.status == 200
    manifest = await latest.json()
    assert manifest["version"] == "2026.11.2"
    assert manifest["features"] == ["recent_skus"]

    artifact = await client.get(f"/v1/models/{manifest['version']}/model.onnx", headers=agent)
    assert artifact.status == 200
    body = await artifact.read()
    assert hashlib.sha256(body).hexdigest() == manifest["sha256"]
    assert artifact.headers["X-Model-Sha256"] == manifest["sha256"]
    assert body == second

    older = await client.get("/v1/models/2026.11.1/model.onnx", headers=agent)
    assert await older.read() == first
    etag = latest.headers["ETag"]
    unchanged = await client.get("/v1/models/latest", headers={**agent, "If-None-Match": etag})
    assert unchanged.status == 304
    assert (await client.get("/v1/models/9.9/model.onnx", headers=agent)).status == 404
    assert (await client.get("/v1/models/latest")).status == 401


async def test_republish_is_a_no_op_and_a_changed_artifact_is_refused(
    client: Client, tokens: Tokens, db_url: str, tmp_path: Path
) -> None:
    payload = b"model-bytes" * 10
    directory = model_dir(tmp_path, "1.0.0", payload)
    assert await publish(db_url, directory) == 0
    assert await publish(db_url, directory) == 0
    (directory / "model.onnx").write_bytes(b"other")
    manifest = json.loads((directory / "manifest.json").read_text())
    manifest["sha256"] = hashlib.sha256(b"other").hexdigest()
    (directory / "manifest.json").write_text(json.dumps(manifest))
    assert await publish(db_url, directory) == 1
    artifact = await client.get("/v1/models/1.0.0/model.onnx", headers=await tokens.agent())
    assert await artifact.read() == payload


def test_a_directory_whose_artifact_does_not_match_is_refused(tmp_path: Path) -> None:
    bad = model_dir(tmp_path, "1.0.0", b"abc", sha256="0" * 64)
    with pytest.raises(ModelPublishError, match="does not match"):
        read_model_dir(bad)
    with pytest.raises(ModelPublishError, match="cannot read"):
        read_model_dir(tmp_path / "missing")
    odd = model_dir(tmp_path, "x", b"abc")
    (odd / "manifest.json").write_text(json.dumps({"version": "../x", "sha256": "0" * 64}))
    with pytest.raises(ModelPublishError, match="version"):
        read_model_dir(odd)
