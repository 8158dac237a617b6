"""``[model] runtime``: the config key, and the model slot loading on the runtime it names."""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path

import pytest

from edge_agent.config import config_from_dict
from edge_agent.errors import ConfigError
from edge_agent.personalize.model_slot import ModelSlot
from edge_agent.personalize.model_store import ModelStore
from models.manifest import sha256_of
from models.serving import DEFAULT_MODEL_DIR, Runtime


def test_the_key_defaults_to_auto_and_refuses_other_runtimes() -> None:
    assert config_from_dict({"agent": {"store_id": "s"}}).model.runtime == "auto"
    chosen = config_from_dict({"agent": {"store_id": "s"}, "model": {"runtime": "numpy"}})
    assert chosen.model.runtime == "numpy"
    with pytest.raises(ConfigError, match=r"model\.runtime"):
        config_from_dict({"agent": {"store_id": "s"}, "model": {"runtime": "tflite"}})


@pytest.mark.parametrize(
    ("runtime", "expected"),
    [("auto", "numpy"), ("numpy", "numpy"), ("onnxruntime", "onnxruntime")],
)
def test_the_slot_loads_on_the_runtime_and_status_says_which(
    tmp_path: Path, runtime: Runtime, expected: str
) -> None:
    slot = ModelSlot(ModelStore(tmp_path, DEFAULT_MODEL_DIR), runtime=runtime)
    try:
        asyncio.run(slot.start())
        assert slot.current is not None
        assert slot.current.model.runtime == expected
        assert slot.status()["runtime"] == expected
    finally:
        slot.close()


def test_a_hot_swap_on_the_numpy_runtime_refuses_a_model_it_cannot_read(tmp_path: Path) -> None:
    """A candidate whose file is damaged (with a matching sha256) is refused; the old model
    stays in place and the refusal says why."""
    slot = ModelSlot(ModelStore(tmp_path / "data", DEFAULT_MODEL_DIR), runtime="numpy")
    candidate = tmp_path / "candidate"
    shutil.copytree(DEFAULT_MODEL_DIR, candidate, ignore=shutil.ignore_patterns("__*"))
    model_file = candidate / "model.onnx"
    model_file.write_bytes(model_file.read_bytes()[:5000])
    manifest = json.loads((candidate / "manifest.json").read_text())
    manifest["sha256"] = sha256_of(model_file)
    (candidate / "manifest.json").write_text(json.dumps(manifest))

    async def scenario() -> None:
        await slot.start()
        before = slot.version
        answer = await slot.offer_model(candidate)
        assert not answer.accepted
        assert slot.version == before
        assert "claims" in (slot.last_error or "")

    try:
        asyncio.run(scenario())
    finally:
        slot.close()
