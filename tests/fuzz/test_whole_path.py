"""A property over the whole path, with a real broker and a real agent process:

anything a device sends is either committed and exported unchanged, or quarantined with a
reason; the process survives every example; a restart comes up (issue 9, "Fuzzing").
"""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cloud_sync.envelope_schema import default_registry
from tests.conftest import COLLECT_ONLY, agent_config_dict
from tests.support.agent import (
    AgentProcess,
    Publisher,
    event_topic,
    http_get,
    telemetry_topic,
    wait_http_ready,
    write_config,
)
from tests.support.broker import AmqttBroker, MosquittoBroker, free_port

EDGE_NUMBERS = st.sampled_from(
    [2**63 - 1, -(2**63), 2**63, -(2**63) - 1, 10**400, 1e308, 5e-324, -0.0, float("nan")]
) | st.sampled_from([float("inf"), float("-inf")])
ODD_STRINGS = st.sampled_from(["\ud800", "a\udfffb", "\x00", "\ufeff", "\U0001f600", "é" * 300])
SCALARS = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats()
    | st.text(max_size=20)
    | EDGE_NUMBERS
    | ODD_STRINGS
)
KEYS = st.text(max_size=6) | ODD_STRINGS
VALUES = st.recursive(
    SCALARS,
    lambda children: st.lists(children, max_size=3) | st.dictionaries(KEYS, children, max_size=3),
    max_leaves=8,
)
TIMES = (
    st.none()
    | st.integers()
    | st.floats()
    | st.text(max_size=30)
    | st.sampled_from(
        [
            "9999-12-31T23:59:59-01:00",
            "0001-01-01T00:00:00+01:00",
            "2026-11-22T08:00:00Z",
            "2199-01-01T00:00:00Z",
            2**63 - 1,
            1e300,
        ]
    )
)
EVENT_TYPES = st.sampled_from(["product.pickup", "kiosk.view", "consent.update", "nope"])
DATA = st.dictionaries(st.sampled_from(["sku", "qty", "weight_g", "x"]) | KEYS, VALUES, max_size=4)


@st.composite
def device_messages(draw: st.DrawFn) -> tuple[str, dict[str, Any] | bytes]:
    """("events" | "telemetry", a document or raw bytes)."""
    kind = draw(st.sampled_from(["event", "event", "telemetry", "bytes"]))
    if kind == "bytes":
        return "events", draw(st.binary(max_size=64))
    document: dict[str, Any] = {}
    if draw(st.booleans()):
        document["ts"] = draw(TIMES)
    if kind == "telemetry":
        document["values"] = draw(st.dictionaries(KEYS, SCALARS, max_size=4))
        return "telemetry", document
    document["type"] = draw(EVENT_TYPES)
    document["data"] = draw(DATA)
    if draw(st.booleans()):
        document["customer_id"] = draw(st.text(max_size=10) | ODD_STRINGS | st.integers())
    return "events", document


def _status(base: str) -> dict[str, Any]:
    return dict(json.loads(http_get(base + "/status")[1]))


def _wait_handled(base: str, expected: int, timeout: float = 20.0) -> dict[str, Any]:
    """Until every message sent so far was committed or quarantined (or time runs out)."""
    deadline = time.monotonic() + timeout
    while True:
        sources = _status(base)["sources"]
        received = sum(s["received"] for s in sources.values())
        settled = sum(s["accepted"] + s["quarantined"] for s in sources.values())
        if (received == expected == settled) or time.monotonic() > deadline:
            return dict(sources)
        time.sleep(0.02)


def _export(config: Path) -> dict[str, dict[str, Any]]:
    done = subprocess.run(
        [sys.executable, "-m", "edge_agent.cli", "buffer", "export", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    # JSON Lines are split at "\n" only: a string may hold U+2028 or U+0085 raw, which
    # str.splitlines() would also take for line ends.
    envelopes = [json.loads(line) for line in done.stdout.split("\n") if line]
    return {envelope["event_id"]: envelope for envelope in envelopes}


@pytest.mark.usefixtures("mqtt_client")  # both clients: paho and awscrt
def test_anything_a_device_sends_is_committed_unchanged_or_quarantined_with_a_reason(
    tmp_path: Path, store_id: str, mqtt_broker: MosquittoBroker | AmqttBroker
) -> None:
    http_port = free_port()
    document = agent_config_dict(
        tmp_path, store_id, mqtt_broker, model=COLLECT_ONLY, http={"port": http_port}
    )
    config = write_config(tmp_path / "agent.toml", document)
    db = tmp_path / "data" / "buffer.db"
    base = f"http://127.0.0.1:{http_port}"
    agent = AgentProcess(config)
    publisher = Publisher(mqtt_broker.host, mqtt_broker.port)
    sent: list[tuple[str, bytes]] = []
    expected_data: dict[str, Any] = {}  # event_id -> data as the device sent it

    @settings(
        max_examples=60,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(device_messages())
    def one_message(message: tuple[str, dict[str, Any] | bytes]) -> None:
        channel, body = message
        event_id = f"hyp-{len(sent):05d}"
        if isinstance(body, bytes):
            payload = body
        else:
            if channel == "events":
                body = {**body, "event_id": event_id}
                expected_data[event_id] = json.loads(json.dumps(body["data"]))
            payload = json.dumps(body).encode()  # NaN, Infinity, \ud800 escapes and all
        topic = event_topic(store_id) if channel == "events" else telemetry_topic(store_id)
        sent.append((channel, payload))
        publisher.publish(topic, payload)
        publisher.wait_all(20)
        sources = _wait_handled(base, len(sent))
        assert agent.process is not None
        assert agent.process.poll() is None, "the agent died"
        received = sum(s["received"] for s in sources.values())
        settled = sum(s["accepted"] + s["quarantined"] for s in sources.values())
        assert received == settled == len(sent), sources

    try:
        agent.start()
        wait_http_ready(base + "/readyz")
        one_message()
        status = _status(base)
        assert agent.terminate() == 0
        agent.start()  # a restart comes up, with everything acknowledged
        wait_http_ready(base + "/readyz")
        assert agent.terminate() == 0
    finally:
        publisher.close()
        agent.ensure_dead()
    exported = _export(config)
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as connection:
        reasons = [row[0] for row in connection.execute("SELECT reason FROM quarantine")]
    assert all(reasons)
    quarantined = status["quarantine"]["total"]
    accepted = sum(s["accepted"] for s in status["sources"].values())
    assert accepted + quarantined == len(sent)
    assert len(reasons) == quarantined
    registry = default_registry()
    for event_id, data in expected_data.items():
        if event_id in exported:
            # Committed: every declared field exported unchanged; only fields the registry
            # does not declare for the type were dropped (issue 10: nothing unreviewed leaves).
            envelope = exported[event_id]
            declared = {spec.name for spec in registry.types[envelope["type"]].fields}
            kept = envelope["data"]
            assert {k: v for k, v in data.items() if k in kept} == kept
            assert all(k not in declared for k in data if k not in kept)
    assert len(exported) == accepted
    print(f"whole path: {accepted} committed, quarantined by reason {sorted(set(reasons))}")
