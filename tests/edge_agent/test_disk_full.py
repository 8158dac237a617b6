"""A full disk is backpressure, not death: a real agent on a real small filesystem."""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path

from tests.conftest import COLLECT_ONLY, agent_config_dict
from tests.support.agent import (
    AgentProcess,
    Publisher,
    buffered_event_ids,
    event_topic,
    http_get,
    pickup,
    wait_http_ready,
    write_config,
)
from tests.support.broker import AmqttBroker, MosquittoBroker, free_port
from tests.support.services import missing_service
from tests.support.small_fs import fill, free, small_filesystem

PAD = "x" * 1000  # big events (the registry caps strings at 1,024): the WAL slack fills quickly


def wait_for(predicate: object, within: float, what: str) -> None:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return
        time.sleep(0.2)
    raise AssertionError(f"not within {within}s: {what}")


def readiness(port: int) -> tuple[int, list[str]]:
    code, body = http_get(f"http://127.0.0.1:{port}/readyz")
    return code, json.loads(body)["reasons"]


def test_full_disk_stops_acknowledging_and_resumes_without_restart(
    tmp_path: Path, store_id: str, private_broker: MosquittoBroker | AmqttBroker
) -> None:
    if not private_broker.persistent:
        missing_service("disk-full test needs mosquitto's persistent sessions")
    with small_filesystem(tmp_path / "small", 16) as small:
        http_port = free_port()
        document = agent_config_dict(
            tmp_path, store_id, private_broker, model=COLLECT_ONLY, http={"port": http_port}
        )
        document["agent"]["data_dir"] = str(small / "data")
        config = write_config(tmp_path / "agent.toml", document)
        db = small / "data" / "buffer.db"
        agent = AgentProcess(config)
        publisher = Publisher(private_broker.host, private_broker.port)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        listener.settimeout(30.0)
        try:
            agent.start()
            wait_http_ready(f"http://127.0.0.1:{http_port}/readyz")
            assert agent.process is not None
            pid = agent.process.pid
            first = [f"ev-a-{n:05d}" for n in range(200)]
            for event_id in first:
                publisher.publish(event_topic(store_id), pickup(event_id, sku=PAD))
            publisher.wait_all(60)
            wait_for(lambda: len(buffered_event_ids(db)) == 200, 60, "the first 200 committed")

            filler = fill(small)
            second = [f"ev-b-{n:05d}" for n in range(1500)]
            for event_id in second:
                publisher.publish(event_topic(store_id), pickup(event_id, sku=PAD))
            publisher.wait_all(120)  # the broker holds what the agent does not acknowledge
            wait_for(
                lambda: any("disk_full" in r for r in readiness(http_port)[1]),
                60,
                "/readyz reports disk_full",
            )
            assert agent.process.poll() is None, "the agent died of a full disk"
            assert http_get(f"http://127.0.0.1:{http_port}/healthz")[0] == 200  # waiting, alive
            code, body = http_get(f"http://127.0.0.1:{http_port}/metrics")
            assert code == 200
            assert b"edge_buffer_disk_full 1.0" in body
            held = len(buffered_event_ids(db))
            assert held < 1700  # some input waits at the broker, unacknowledged

            free(filler)
            wanted = set(first) | set(second)
            wait_for(lambda: wanted <= set(buffered_event_ids(db)), 180, "every event committed")
            wait_for(lambda: readiness(http_port)[0] == 200, 30, "/readyz back to 200")
            assert agent.process.pid == pid
            assert agent.process.poll() is None  # resumed by itself, no restart

            # A restart on a full disk waits for space instead of crash-looping, and tells
            # systemd so (its start timeout would otherwise make the wait a restart loop).
            assert agent.terminate() == 0
            filler = fill(small)
            notify_path = tmp_path / "notify.sock"
            listener.bind(str(notify_path))
            agent = AgentProcess(config, env={"NOTIFY_SOCKET": str(notify_path)})
            agent.start()
            assert agent.process is not None
            message = listener.recv(4096).decode()  # bounded by the socket's timeout
            assert message.startswith("EXTEND_TIMEOUT_USEC=")
            assert "waiting for the buffer" in message
            assert agent.process.poll() is None, "the agent died at start on a full disk"
            free(filler)
            wait_http_ready(f"http://127.0.0.1:{http_port}/readyz", timeout=60)
            assert len(set(buffered_event_ids(db)) & wanted) == len(wanted)
            assert agent.terminate() == 0
        finally:
            publisher.close()
            listener.close()
            agent.ensure_dead()
    log = (tmp_path / "agent.log").read_text()
    assert "buffer.disk_full.start" in log
    assert "buffer.hold.end reason=disk_full" in log
