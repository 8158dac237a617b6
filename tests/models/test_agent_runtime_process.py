"""A real ``edge-agent run`` process on each runtime: /status says which runs the model, and
on the numpy runtime the process never maps onnxruntime's library (memory, issue 11)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from tests.conftest import agent_config_dict
from tests.support.agent import AgentProcess, http_get, wait_http_ready, write_config
from tests.support.broker import AmqttBroker, MosquittoBroker, free_port


def _maps_onnxruntime(pid: int) -> bool:
    return "onnxruntime" in Path(f"/proc/{pid}/maps").read_text()


@pytest.mark.parametrize(
    ("runtime", "expected"), [("auto", "numpy"), ("onnxruntime", "onnxruntime")]
)
def test_the_agent_reports_its_runtime_and_loads_onnxruntime_only_for_it(
    tmp_path: Path,
    store_id: str,
    mqtt_broker: MosquittoBroker | AmqttBroker,
    runtime: str,
    expected: str,
) -> None:
    http_port = free_port()
    document = agent_config_dict(
        tmp_path, store_id, mqtt_broker, model={"runtime": runtime}, http={"port": http_port}
    )
    agent = AgentProcess(write_config(tmp_path / "agent.toml", document))
    agent.start()
    try:
        wait_http_ready(f"http://127.0.0.1:{http_port}/healthz", timeout=60)
        deadline = time.monotonic() + 60
        model: dict[str, object] = {}
        while time.monotonic() < deadline and not model.get("version"):
            _, body = http_get(f"http://127.0.0.1:{http_port}/status")
            model = json.loads(body).get("model", {})
            time.sleep(0.1)
        assert model.get("runtime") == expected, model
        assert agent.process is not None
        assert _maps_onnxruntime(agent.process.pid) == (expected == "onnxruntime")
    finally:
        agent.terminate()
        agent.ensure_dead()
