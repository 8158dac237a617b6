"""``edge-agent quarantine list|show|replay``: beside a running agent, with real decoding."""

from __future__ import annotations

import base64
import json
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from cloud_sync.envelope_schema import default_registry, parse_registry
from edge_agent.buffer import Buffer
from edge_agent.buffer.quarantine import list_rows, replay
from edge_agent.config import BufferSection, InputSection, config_from_dict
from edge_agent.decode import decode_message, make_context, parse_topic
from edge_agent.events import Event, Rejected, derive_event_id
from edge_agent.governance import event_id_key
from edge_agent.replay import redecode
from tests.conftest import COLLECT_ONLY, agent_config_dict
from tests.support.agent import (
    AgentProcess,
    Publisher,
    buffered_event_ids,
    event_topic,
    pickup,
    quarantine_reasons,
    wait_http_ready,
    write_config,
)
from tests.support.broker import AmqttBroker, MosquittoBroker, free_port


def _cli(config: Path, *argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "edge_agent.cli", *argv, "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def _json_lines(done: subprocess.CompletedProcess[str]) -> list[dict[str, Any]]:
    assert done.returncode == 0, done.stderr
    return [json.loads(line) for line in done.stdout.splitlines() if line.strip()]


def _wait(predicate: Any, within: float) -> None:
    deadline = time.monotonic() + within
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"condition not met within {within}s")
        time.sleep(0.1)


def test_replay_beside_a_running_agent_commits_what_a_fixed_limit_now_passes(
    tmp_path: Path, store_id: str, private_broker: MosquittoBroker | AmqttBroker
) -> None:
    http_port = free_port()
    document = agent_config_dict(
        tmp_path,
        store_id,
        private_broker,
        model=COLLECT_ONLY,
        http={"port": http_port},
        input={"max_payload_bytes": 256},
    )
    config = write_config(tmp_path / "agent.toml", document)
    db = tmp_path / "data" / "buffer.db"
    topic = event_topic(store_id)
    # No event_id: the id is derived from the topic and the payload, live and on replay.
    big = json.dumps(
        {"type": "product.pickup", "customer_id": "c-9", "data": {"sku": "S" * 300}}
    ).encode()
    agent = AgentProcess(config)
    publisher = Publisher(private_broker.host, private_broker.port)
    try:
        agent.start()
        wait_http_ready(f"http://127.0.0.1:{http_port}/readyz")
        publisher.publish(topic, big)
        publisher.publish(topic, b"\xff\xfe not utf-8")
        publisher.wait_all(timeout=30)
        _wait(lambda: len(quarantine_reasons(db)) == 2, 30)

        listed = _json_lines(_cli(config, "quarantine", "list"))
        assert [row["reason"] for row in listed] == ["too_large", "not_utf8"]
        assert listed[0]["source"] == f"mqtt:{topic}"
        assert listed[0]["raw_len"] == len(big)
        only = _json_lines(_cli(config, "quarantine", "list", "--reason", "not_utf8"))
        assert [row["id"] for row in only] == [listed[1]["id"]]
        assert _json_lines(_cli(config, "quarantine", "list", "--limit", "1")) == listed[:1]
        assert _json_lines(_cli(config, "quarantine", "list", "--source", "serial:")) == []

        shown = json.loads(_cli(config, "quarantine", "show", str(listed[1]["id"])).stdout)
        assert base64.b64decode(shown["raw_base64"]) == b"\xff\xfe not utf-8"
        assert shown["raw_text"] is None
        shown = json.loads(_cli(config, "quarantine", "show", str(listed[0]["id"])).stdout)
        assert shown["raw_text"] == big.decode()
        assert _cli(config, "quarantine", "show", "999999").returncode == 1

        # The fix: a larger payload limit in the config the CLI reads.
        document["input"]["max_payload_bytes"] = 4096
        write_config(config, document)
        dry = _json_lines(_cli(config, "quarantine", "replay", "--dry-run"))[0]
        assert dry["committed_rows"] == 1
        assert dry["still_failing"] == {"not_utf8": 1}
        assert len(quarantine_reasons(db)) == 2  # a dry run changes nothing
        assert buffered_event_ids(db) == []

        done = _json_lines(_cli(config, "quarantine", "replay"))[0]
        assert done["committed_ids"] == [listed[0]["id"]]
        assert done["events_inserted"] == 1
        again = _json_lines(_cli(config, "quarantine", "replay"))[0]
        assert again["committed_rows"] == 0  # idempotent
        assert again["events_inserted"] == 0

        # The agent goes on committing beside the replayed rows.
        publisher.publish(topic, pickup("after-replay"))
        publisher.wait_all(timeout=30)
        _wait(lambda: "after-replay" in buffered_event_ids(db), 30)
        assert agent.terminate() == 0
    finally:
        agent.ensure_dead()
        publisher.close()
    expected_id = derive_event_id(event_id_key(config_from_dict(document)), f"mqtt:{topic}", big)
    assert sorted(buffered_event_ids(db)) == sorted([expected_id, "after-replay"])
    assert quarantine_reasons(db) == ["not_utf8"]


def _registry_with(new_type: str) -> Any:
    path = Path(sys.modules["cloud_sync"].__file__ or "").parent / "event_types.json"
    document = json.loads(path.read_text())
    document["types"][new_type] = {"customer": False, "data": {"sku": {"type": "string"}}}
    return parse_registry(document)


async def test_after_a_registry_update_unknown_types_replay_and_failures_get_new_reasons(
    tmp_path: Path,
) -> None:
    path = tmp_path / "buffer.db"
    store = "store-1"
    key = b"k" * 32
    limits = InputSection()
    topic_text = f"edge/{store}/devices/shelf-1/events"
    topic = parse_topic(topic_text, "edge", store)
    assert topic is not None
    restock = json.dumps({"type": "shelf.restock", "data": {"sku": "A"}}).encode()
    broken = json.dumps({"type": "shelf.restock", "data": {"sku": 5}}).encode()
    serial = b"\x01\x02frame"
    before = make_context(store, default_registry(), limits, key)
    after = make_context(store, _registry_with("shelf.restock"), limits, key)
    live = [
        *decode_message(before, topic, f"mqtt:{topic_text}", restock),
        *decode_message(before, topic, f"mqtt:{topic_text}", broken),
    ]
    assert all(not isinstance(item, Event) for item in live)
    rejects = [item for item in live if isinstance(item, Rejected)]
    rejects.append(Rejected("serial:/dev/ttyUSB0", "bad_cobs", serial))
    async with await Buffer.open(path, BufferSection()) as buffer:
        await buffer.commit([], rejects)
    with sqlite3.connect(path, isolation_level=None) as connection:
        assert [row.reason for row in list_rows(connection)] == [
            "unknown_type",
            "unknown_type",
            "bad_cobs",
        ]
        result = replay(connection, lambda row: redecode(after, "edge", row))
        assert result.events == 1
        assert dict(result.still_failing) == {"wrong_type": 1}
        assert dict(result.skipped) == {"not_replayable": 1}
        kept = [(row.source, row.reason) for row in list_rows(connection)]
        events = connection.execute("SELECT event_id, type FROM events").fetchall()
    assert kept == [(f"mqtt:{topic_text}", "wrong_type"), ("serial:/dev/ttyUSB0", "bad_cobs")]
    assert events == [(derive_event_id(key, f"mqtt:{topic_text}", restock), "shelf.restock")]
