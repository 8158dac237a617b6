"""The MQTT sources' event-loop half: a big burst does not hold the event loop (issue 11).

The MQTT client itself (paho, awscrt) is the part the project does not own, so here it is
a stand-in that only fills the inbox; decoding, bursts and emits are the real consumer's.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence

from cloud_sync.envelope_schema import default_registry
from edge_agent.config import InputSection, MqttSection
from edge_agent.decode import TELEMETRY_CHANNEL, make_context
from edge_agent.events import Event, Rejected
from edge_agent.sources.mqtt_consumer import DECODE_SLICE, MAX_BURST, MqttConsumer, Received

STORE = "store-001"
BURST = MAX_BURST  # the most one emit takes


class _InboxOnly(MqttConsumer):
    """No network: the test puts messages in the inbox as a client's thread would."""

    def _init_client(self) -> None:
        self.acknowledged: list[Received] = []

    def publish(self, topic: str, payload: bytes | str, qos: int = 0, retain: bool = False) -> None:
        raise AssertionError("nothing is published here")

    def _start_network(self) -> None:
        pass

    async def _shutdown(self) -> None:
        pass

    def _acknowledge(self, burst: list[Received]) -> None:
        self.acknowledged.extend(burst)


def _telemetry(n: int) -> Received:
    topic = f"edge/{STORE}/devices/fridge-{n % 7}/telemetry"
    payload = json.dumps({"values": {"temp_c": 4.0 + n % 10}}).encode()
    return Received(topic, payload, None, 0, 0, None)


async def test_a_burst_is_decoded_in_slices_that_let_the_loop_run_between() -> None:
    context = make_context(STORE, default_registry(), InputSection(), b"test-id-key")
    consumer = _InboxOnly(
        MqttSection(), "t", context, channels=(TELEMETRY_CHANNEL,), announce=False
    )
    turns = 0  # loop turns another task got while the burst was being decoded
    turns_at_emit: list[int] = []
    emitted: list[Event | Rejected] = []

    async def emit(items: Sequence[Event | Rejected]) -> None:
        turns_at_emit.append(turns)
        emitted.extend(items)

    async def other_work() -> None:  # a customer event's decode and tap, say
        nonlocal turns
        while not turns_at_emit and turns < 10_000:
            turns += 1
            await asyncio.sleep(0)

    async with asyncio.TaskGroup() as group:
        group.create_task(consumer.run(emit))
        await asyncio.sleep(0)  # run() has started: the inbox is live
        for n in range(BURST):
            consumer._enqueue(_telemetry(n))
        group.create_task(other_work())
        for _ in range(1000):
            if len(consumer.acknowledged) == BURST:
                break
            await asyncio.sleep(0.01)
        consumer.request_stop()

    assert len(emitted) == BURST
    assert all(isinstance(item, Event) for item in emitted)
    assert len(consumer.acknowledged) == BURST  # and in arrival order
    assert [m.payload for m in consumer.acknowledged] == [
        _telemetry(n).payload for n in range(BURST)
    ]
    # One burst, decoded in slices of DECODE_SLICE (a full burst is several: the point of
    # slicing); the other task ran between them.
    assert DECODE_SLICE * 4 <= MAX_BURST
    assert len(turns_at_emit) == 1
    assert turns_at_emit[0] >= MAX_BURST // DECODE_SLICE - 1
