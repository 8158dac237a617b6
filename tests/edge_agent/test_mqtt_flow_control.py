"""The MQTT source never drops what it read: a QoS 0 flood waits at the socket (issue 11)."""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
from collections.abc import Sequence
from pathlib import Path

import pytest

from cloud_sync.envelope_schema import default_registry
from edge_agent.config import config_from_dict
from edge_agent.decode import EVENTS_CHANNEL, make_context
from edge_agent.events import Event, Rejected
from edge_agent.sources.mqtt_consumer import MAX_BURST
from edge_agent.sources.mqtt_select import make_mqtt_source
from tests.conftest import COLLECT_ONLY, agent_config_dict
from tests.support.agent import event_topic, pickup, wait_until
from tests.support.broker import AmqttBroker, MosquittoBroker

# Beyond what the old source held before it threw the newest away (20,000 QoS 0 messages
# in its inbox, plus four bursts in flight): on the old code this burst lost messages.
FLOOD = 30_000

pytestmark = pytest.mark.usefixtures("mqtt_client")  # both clients: paho and awscrt


async def test_a_qos0_flood_behind_a_stalled_commit_loses_nothing(
    tmp_path: Path, store_id: str, mqtt_broker: MosquittoBroker | AmqttBroker
) -> None:
    if not isinstance(mqtt_broker, MosquittoBroker):
        pytest.skip("needs mosquitto: the flood is published by mosquitto_pub -l")
    document = agent_config_dict(
        tmp_path, store_id, mqtt_broker, model=COLLECT_ONLY, mqtt={"qos": 0}
    )
    config = config_from_dict(document)
    context = make_context(store_id, default_registry(), config.input, b"test-id-key")
    limit = 2 * MAX_BURST
    source = make_mqtt_source(
        config.mqtt, f"{store_id}-events", context, channels=(EVENTS_CHANNEL,), inbox_limit=limit
    )
    committed: list[str] = []
    quarantined: list[Rejected] = []
    commit_open = asyncio.Event()

    # The sink: a commit that stalls (a slow SD card) until the whole flood was published.
    async def emit(items: Sequence[Event | Rejected]) -> None:
        await commit_open.wait()
        for item in items:
            if isinstance(item, Event):
                committed.append(item.event_id)
            else:
                quarantined.append(item)

    payloads = tmp_path / "flood.txt"
    payloads.write_bytes(b"\n".join(pickup(f"flood-{n}") for n in range(FLOOD)) + b"\n")
    task = asyncio.create_task(source.run(emit))
    try:
        await wait_until(lambda: source.stats.connected, 20)
        await asyncio.sleep(0.3)  # the SUBACK: the subscription is in place
        argv = ["mosquitto_pub", "-p", str(mqtt_broker.port), "-q", "0", "-l"]
        with payloads.open("rb") as stdin:
            publisher = await asyncio.to_thread(
                subprocess.run,
                [*argv, "-t", event_topic(store_id)],
                stdin=stdin,
                timeout=60,
                check=True,
            )
        assert publisher.returncode == 0
        await asyncio.sleep(3.0)  # let the broker hand on what it can while nothing commits
        read_while_stalled = source.stats.received
        commit_open.set()
        await wait_until(
            lambda: len(committed) + len(quarantined) >= FLOOD or bool(source.stats.drops), 60
        )
    finally:
        source.request_stop()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(task, 20)
    assert source.stats.drops == {}
    assert quarantined == []
    assert sorted(committed) == sorted(f"flood-{n}" for n in range(FLOOD))
    # While nothing committed, the source held a bounded amount, not the flood.
    assert read_while_stalled < FLOOD
