"""Simulated MQTT products driven by the shopper simulator, and shoppers who react.

The shopper simulator (models/) writes a month of store visits; the demo replays the visits
of its store in real time, as the products would publish them (shelves, kiosks, the door
counter, a self-scanner, the checkout, a fridge probe), and makes customers take a shown
suggestion now and then, so acceptances really happen. About 1% of messages are malformed
on purpose (truncated JSON, as a firmware bug would send), so the quarantine shows
something too: they are counted apart (``malformed``) and are not errors of the demo.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import time
from collections.abc import Iterator
from typing import Any, Final

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from edge_agent.errors import DemoError
from models.simulator import ShopperSimulator, SimulationConfig

log = logging.getLogger(__name__)

FLUSH_TIMEOUT_S: Final = 5.0  # at the end, for the broker's PUBACKs of what was sent
_PRUNE_AT: Final = 1000

_SKIP_TYPES = frozenset({"suggestion.shown", "suggestion.accepted", "suggestion.dismissed"})


def shopper_messages(store_id: str, seed: int) -> Iterator[tuple[str, dict[str, Any]]]:
    """(device_id, message) for the simulated store, in time order, forever."""
    round_ = 0
    while True:
        config = SimulationConfig(seed=seed + round_, customers=300, days=7, stores=3)
        for envelope in ShopperSimulator(config).events():
            if envelope["store_id"] != store_id or envelope["type"] in _SKIP_TYPES:
                continue
            message = {"type": envelope["type"], "data": envelope["data"]}
            if envelope["customer_id"]:
                message["customer_id"] = envelope["customer_id"]
            yield envelope["device_id"], message
        round_ += 1


class Products:
    """Publishes the store's traffic at ``rate`` messages/s until stopped."""

    def __init__(self, host: str, port: int, store_id: str, rate: float, seed: int) -> None:
        self.store_id = store_id
        self.rate = rate
        self.rng = random.Random(seed)
        self.seed = seed
        self.published = 0  # every MQTT message the products sent, malformed ones included
        self.malformed = 0  # of those, the truncated JSON sent on purpose
        self.accepted_by_shoppers = 0  # reactions to a suggestion (sent apart from `published`)
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"demo-products-{seed}")
        self._unconfirmed: list[paho.MQTTMessageInfo] = []  # QoS 1 sends without a PUBACK yet
        self._stopping = False
        self.client.on_message = self._on_suggestion
        self.host, self.port = host, port

    async def run(self, stop: asyncio.Event) -> None:
        try:
            await asyncio.to_thread(self.client.connect, self.host, self.port, 30)
        except OSError as exc:
            raise DemoError(f"the broker {self.host}:{self.port} is not reachable: {exc}") from exc
        self.client.subscribe(f"edge/{self.store_id}/suggestions/+", qos=0)
        self.client.loop_start()
        messages = shopper_messages(self.store_id, self.seed)
        try:
            while not stop.is_set():
                device, message = next(messages)
                self._publish(device, message)
                if self.rng.random() < 0.01:
                    self._publish_garbage()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), self.rng.expovariate(self.rate))
        finally:
            # No more reactions, and what was sent reaches the broker before we leave: the
            # summary compares what the products sent with what the agent took in.
            self._stopping = True
            await asyncio.to_thread(self._flush, FLUSH_TIMEOUT_S)
            self.client.disconnect()
            self.client.loop_stop()

    def _flush(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        for info in list(self._unconfirmed):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                log.warning("demo.products.flush_incomplete timeout_s=%.0f", timeout)
                return
            with contextlib.suppress(RuntimeError, ValueError):
                info.wait_for_publish(remaining)

    def _sent(self, info: paho.MQTTMessageInfo) -> None:
        # Called from the loop and paho's thread; list.append is atomic, pruning is a copy.
        self._unconfirmed.append(info)
        if len(self._unconfirmed) > _PRUNE_AT:
            self._unconfirmed = [i for i in self._unconfirmed if not i.is_published()]

    def _publish(self, device: str, message: dict[str, Any]) -> None:
        channel = "telemetry" if message["type"] == "telemetry" else "events"
        payload = message["data"] if channel == "telemetry" else message
        topic = f"edge/{self.store_id}/devices/{device}/{channel}"
        self._sent(self.client.publish(topic, json.dumps(payload), qos=1))
        self.published += 1
        if device == "door-01" and self.rng.random() < 0.5:
            counter = {"values": {"entries": self.rng.randint(1, 3)}}
            self._sent(
                self.client.publish(
                    f"edge/{self.store_id}/devices/door-01/telemetry", json.dumps(counter), qos=1
                )
            )
            self.published += 1

    def _publish_garbage(self) -> None:
        topic = f"edge/{self.store_id}/devices/shelf-13/events"
        self._sent(
            self.client.publish(topic, b'{"type": "product.pickup", "data": {"sku": 12', qos=1)
        )
        self.published += 1
        self.malformed += 1

    def _on_suggestion(self, client: paho.Client, userdata: Any, message: paho.MQTTMessage) -> None:
        # Runs on paho's thread: it only publishes, which paho allows from any thread.
        try:
            suggestion = json.loads(message.payload)
            customer, items = suggestion["customer_id"], suggestion["items"]
            device = message.topic.rsplit("/", 1)[-1]
        except (ValueError, KeyError, TypeError):
            log.warning("demo.suggestion.unreadable topic=%s", message.topic)
            return
        if self._stopping or not items or self.rng.random() > 0.3:
            return
        sku = items[0]["sku"]
        if self.rng.random() < 0.5:  # taken from the shelf: an implicit acceptance
            event = {"type": "product.pickup", "customer_id": customer, "data": {"sku": sku}}
        else:  # tapped "yes" on the display
            event = {
                "type": "suggestion.accepted",
                "customer_id": customer,
                "data": {"suggestion_id": suggestion["suggestion_id"], "sku": sku},
            }
        topic = f"edge/{self.store_id}/devices/{device}/events"
        self._sent(client.publish(topic, json.dumps(event), qos=1))
        self.accepted_by_shoppers += 1
