"""``edge-agent run`` with its status port taken: one clear line and exit code 2."""

from __future__ import annotations

import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import COLLECT_ONLY, agent_config_dict
from tests.support.agent import write_config
from tests.support.broker import AmqttBroker, MosquittoBroker


@pytest.fixture
def held_port() -> Iterator[int]:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield int(sock.getsockname()[1])


def test_a_taken_http_port_is_one_line_naming_the_key_and_exit_2(
    tmp_path: Path, store_id: str, mqtt_broker: MosquittoBroker | AmqttBroker, held_port: int
) -> None:
    document = agent_config_dict(
        tmp_path, store_id, mqtt_broker, model=COLLECT_ONLY, http={"port": held_port}
    )
    config = write_config(tmp_path / "agent.toml", document)
    done = subprocess.run(
        [sys.executable, "-m", "edge_agent.cli", "run", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("edge-agent: config: http.port: ")
    assert f"127.0.0.1:{held_port} is already in use" in last
