"""Model signatures: keygen and publish through the real CLI, verification on both backends."""

from __future__ import annotations

import asyncio
import base64
import json
import shutil
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient
from conftest import Tokens
from hypothesis import given, settings
from hypothesis import strategies as st

from cloud_sync.model_signature import (
    ModelSignatureError,
    load_private_key,
    public_raw,
    sign_manifest,
    verify_manifest,
    write_new_key,
)
from cloud_sync.store.cli import main
from models import SuggestionModel

Client = TestClient[Any, Any]
DEFAULT_MODEL = Path(__file__).resolve().parents[2] / "models" / "default_model"


def keygen(path: Path, capsys: pytest.CaptureFixture[str]) -> bytes:
    assert main(["model", "keygen", "--out", str(path)]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert path.stat().st_mode & 0o077 == 0  # the private key is the owner's only
    return base64.b64decode(last)


async def test_a_published_manifest_keeps_a_signature_the_public_key_verifies(
    client: Client,
    tokens: Tokens,
    db_url: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    public = keygen(tmp_path / "signing.pem", capsys)
    command = ["model", "publish", "--db", db_url, "--dir", str(DEFAULT_MODEL)]
    command += ["--signing-key", str(tmp_path / "signing.pem")]
    assert await asyncio.to_thread(main, command) == 0
    response = await client.get("/v1/models/latest", headers=await tokens.agent())
    manifest = await response.json()
    # Stored as JSON (jsonb on PostgreSQL) and served again: the signature still holds.
    assert verify_manifest(manifest, [public])
    other = public_raw(load_private_key(tmp_path / "signing.pem"))
    assert other == public
    tampered = dict(manifest, top_k=manifest["top_k"] + 1)
    with pytest.raises(ModelSignatureError) as caught:
        verify_manifest(tampered, [public])
    assert caught.value.reason == "bad_signature"


def test_keygen_never_overwrites_a_key(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    keygen(tmp_path / "k.pem", capsys)
    assert main(["model", "keygen", "--out", str(tmp_path / "k.pem")]) == 1
    assert "never overwrites" in capsys.readouterr().err


def test_unsigned_and_foreign_signatures_are_refused_with_a_reason(tmp_path: Path) -> None:
    ours = base64.b64decode(write_new_key(tmp_path / "ours.pem"))
    write_new_key(tmp_path / "theirs.pem")
    manifest = {"version": "1", "sha256": "0" * 64}
    with pytest.raises(ModelSignatureError) as caught:
        verify_manifest(manifest, [ours])
    assert caught.value.reason == "unsigned"
    foreign = sign_manifest(manifest, load_private_key(tmp_path / "theirs.pem"))
    with pytest.raises(ModelSignatureError) as caught:
        verify_manifest(foreign, [ours])
    assert caught.value.reason == "unknown_key"
    signed = sign_manifest(manifest, load_private_key(tmp_path / "ours.pem"))
    assert verify_manifest(signed, [ours]) == signed["signature"]["key_id"]


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=20,
)


@settings(max_examples=200, deadline=None)
@given(
    st.dictionaries(st.sampled_from(["signature", "version", "sha256"]), json_values) | json_values
)
def test_verification_is_total_on_hostile_manifests(document: Any) -> None:
    with pytest.raises(ModelSignatureError) as caught:  # random bytes never verify
        verify_manifest(document, [bytes(range(32))])
    assert caught.value.reason in {
        "unsigned",
        "malformed_signature",
        "unknown_key",
        "bad_signature",
    }


def test_publishing_a_hostile_manifest_is_a_clear_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    directory = tmp_path / "m"
    directory.mkdir()
    (directory / "model.onnx").write_bytes(b"x")
    (directory / "manifest.json").write_text("[" * 100_000 + "]" * 100_000)
    db = f"sqlite://{tmp_path / 'store.db'}"
    assert main(["model", "publish", "--db", db, "--dir", str(directory)]) == 1
    assert "not JSON" in capsys.readouterr().err


def test_model_sign_signs_a_directory_for_a_hand_drop(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    public = keygen(tmp_path / "k.pem", capsys)
    directory = tmp_path / "drop"
    shutil.copytree(DEFAULT_MODEL, directory, ignore=shutil.ignore_patterns("__*"))
    command = ["model", "sign", "--dir", str(directory), "--signing-key", str(tmp_path / "k.pem")]
    assert main(command) == 0
    manifest = json.loads((directory / "manifest.json").read_text())
    assert verify_manifest(manifest, [public])
    assert SuggestionModel.load(directory).version == manifest["version"]  # still a model
