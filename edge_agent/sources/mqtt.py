"""The MQTT source: subscribe with QoS 1 on a persistent session, PUBACK only after commit.

Why paho-mqtt on a network thread: aiomqtt cannot defer acknowledgements (its PR #346 is
open); paho 2.x can (``manual_ack=True`` then ``client.ack(mid, qos)``). One thread owned by
this source runs paho's network loop and our reconnect loop (capped exponential backoff with
jitter, which paho's built-in reconnect lacks); it only appends messages to a deque and wakes
the event loop once per burst. Decoding, committing and acknowledging run on the event loop:
a whole burst is decoded and committed as one emit, then its PUBACKs are sent in arrival
order. paho's ack() and publish() are safe to call from another thread (they queue packets
under paho's own lock).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import ssl
import threading
from dataclasses import dataclass
from typing import Any, Final

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.reasoncodes import ReasonCode

from edge_agent.backoff import Backoff
from edge_agent.config import MqttSection
from edge_agent.decode import DecodeContext, decode_message, parse_topic
from edge_agent.events import Event, Rejected
from edge_agent.sources.base import Emit, SourceStats

log = logging.getLogger(__name__)

MAX_BURST: Final = 2000  # messages per emit: bounds one transaction and one decode pass
MAX_BURST_BYTES: Final = 256 * 1024  # and bytes: a burst must fit even the smallest budget
MAX_QUEUED_QOS0: Final = 20_000  # QoS 0 has no flow control: beyond this, newest are dropped
_NETWORK_POLL_S: Final = 0.2


@dataclass(frozen=True, slots=True)
class _Received:
    topic: str
    payload: bytes
    mid: int
    qos: int
    generation: int  # the connection it came on: a PUBACK is only valid on that one


def status_topic(prefix: str, store_id: str) -> str:
    return f"{prefix}/{store_id}/agent/status"


class MqttSource:
    """Events and telemetry from products on the store network."""

    name = "mqtt"

    def __init__(
        self, settings: MqttSection, client_id: str, decode_context: DecodeContext
    ) -> None:
        self.settings = settings
        self.stats = SourceStats()
        self._context = decode_context
        store_id = decode_context.store_id
        self._topics = [
            f"{settings.topic_prefix}/{store_id}/devices/+/events",
            f"{settings.topic_prefix}/{store_id}/devices/+/telemetry",
        ]
        self._status_topic = status_topic(settings.topic_prefix, store_id)
        self._client = self._make_client(client_id)
        self._inbox: collections.deque[_Received] = collections.deque()
        self._inbox_qos0 = 0
        self._generation = 0
        self._session_lock = threading.Lock()  # generation changes vs. acks in flight
        self._wake_pending = False
        self._wake_lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake = asyncio.Event()
        self._stop = asyncio.Event()
        self._network_stop = threading.Event()
        self._connected_once = threading.Event()

    # ---- the public surface -----------------------------------------------------------

    async def run(self, emit: Emit) -> None:
        self._loop = asyncio.get_running_loop()
        network = threading.Thread(target=self._network, name="mqtt-network", daemon=True)
        network.start()
        try:
            await self._consume(emit)
        finally:
            await asyncio.shield(self._shutdown(network))

    def request_stop(self) -> None:
        self._stop.set()
        self._wake.set()

    def publish(self, topic: str, payload: bytes | str, qos: int = 0, retain: bool = False) -> None:
        """Queue a message for the broker (suggestions, status); safe from the event loop."""
        self._client.publish(topic, payload, qos=qos, retain=retain)

    # ---- the event loop side ----------------------------------------------------------

    async def _consume(self, emit: Emit) -> None:
        while not self._stop.is_set():
            await self._wake.wait()
            self._wake.clear()
            while self._inbox and not self._stop.is_set():
                burst = self._take_burst()
                items = self._decode(burst)
                await emit(items)
                self.stats.count(items)
                self._acknowledge(burst)

    def _take_burst(self) -> list[_Received]:
        with self._wake_lock:
            self._wake_pending = False
            burst: list[_Received] = []
            size = 0
            while self._inbox and len(burst) < MAX_BURST and size < MAX_BURST_BYTES:
                message = self._inbox.popleft()
                burst.append(message)
                size += len(message.payload)
            self._inbox_qos0 -= sum(1 for message in burst if message.qos == 0)
        self.stats.received += len(burst)
        return burst

    def _decode(self, burst: list[_Received]) -> list[Event | Rejected]:
        items: list[Event | Rejected] = []
        prefix, store_id = self.settings.topic_prefix, self._context.store_id
        for message in burst:
            source = f"mqtt:{message.topic}"
            topic = parse_topic(message.topic, prefix, store_id)
            if topic is None:
                items.append(Rejected(source, "bad_topic", message.payload[:256], message.topic))
                continue
            items.extend(decode_message(self._context, topic, source, message.payload))
        return items

    def _acknowledge(self, burst: list[_Received]) -> None:
        with self._session_lock:
            for message in burst:
                # A message from an earlier connection is redelivered by the broker instead.
                if message.qos > 0 and message.generation == self._generation:
                    self._client.ack(message.mid, message.qos)

    async def _shutdown(self, network: threading.Thread) -> None:
        if self.stats.connected:
            info = self._client.publish(self._status_topic, "offline", qos=1, retain=True)
            # The clean disconnect suppresses the last will, so say "offline" ourselves.
            await asyncio.to_thread(_wait_published, info, 2.0)
        self._network_stop.set()
        await asyncio.to_thread(network.join, 5.0)
        self.stats.connected = False

    # ---- the network thread -----------------------------------------------------------

    def _make_client(self, client_id: str) -> paho.Client:
        settings = self.settings
        client = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=client_id,
            clean_session=False,  # persistent session: the broker keeps QoS 1 while we're down
            protocol=paho.MQTTv311,
            reconnect_on_failure=False,  # our loop reconnects, with jitter
            manual_ack=True,
        )
        client.will_set(self._status_topic, "offline", qos=1, retain=True)
        if settings.username:
            client.username_pw_set(settings.username, settings.password or None)
        if settings.tls:
            client.tls_set(
                ca_certs=settings.ca_file or None,
                certfile=settings.cert_file or None,
                keyfile=settings.key_file or None,
                cert_reqs=ssl.CERT_REQUIRED,
            )
        client.max_inflight_messages_set(100)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        return client

    def _network(self) -> None:
        backoff = Backoff(self.settings.reconnect_min_s, self.settings.reconnect_max_s)
        client = self._client
        connected = False
        while not self._network_stop.is_set():
            if not connected:
                try:
                    client.connect(self.settings.host, self.settings.port, self.settings.keepalive)
                    connected = True
                except (OSError, ssl.SSLError) as exc:
                    delay = backoff.next_delay()
                    log.warning(
                        "mqtt.connect.failed host=%s port=%d error=%r retry_in_s=%.2f",
                        self.settings.host,
                        self.settings.port,
                        exc,
                        delay,
                    )
                    self._network_stop.wait(delay)
                    continue
            rc = client.loop(timeout=_NETWORK_POLL_S)
            if rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
                connected = False
                delay = backoff.next_delay()
                log.warning("mqtt.connection.lost rc=%s retry_in_s=%.2f", rc, delay)
                self._network_stop.wait(delay)
            elif self.stats.connected:
                backoff.reset()
        if connected:
            client.disconnect()
            client.loop(timeout=0.1)

    def _on_connect(
        self,
        client: paho.Client,
        userdata: Any,
        flags: paho.ConnectFlags,
        reason: ReasonCode,
        properties: Any,
    ) -> None:
        if reason.is_failure:
            log.error("mqtt.connect.refused reason=%s", reason)
            return
        with self._session_lock:
            self._generation += 1
        # Subscribe on every connect: a broker that lost our session forgets subscriptions.
        client.subscribe([(topic, self.settings.qos) for topic in self._topics])
        client.publish(self._status_topic, "online", qos=1, retain=True)
        log.info(
            "mqtt.connected host=%s port=%d session_present=%s",
            self.settings.host,
            self.settings.port,
            flags.session_present,
        )
        self._call_on_loop(self._set_connected, True)

    def _on_disconnect(
        self,
        client: paho.Client,
        userdata: Any,
        flags: paho.DisconnectFlags,
        reason: ReasonCode,
        properties: Any,
    ) -> None:
        with self._session_lock:
            self._generation += 1
        if self._network_stop.is_set():
            log.info("mqtt.disconnected reason=%s", reason)
        else:
            log.warning("mqtt.disconnected reason=%s", reason)
        self._call_on_loop(self._set_connected, False)

    def _on_message(self, client: paho.Client, userdata: Any, message: paho.MQTTMessage) -> None:
        payload = bytes(message.payload)  # paho may hand a bytearray; keep an immutable copy
        received = _Received(message.topic, payload, message.mid, message.qos, self._generation)
        with self._wake_lock:
            if received.qos == 0:
                if self._inbox_qos0 >= MAX_QUEUED_QOS0:
                    self._call_on_loop(self._count_drop, "qos0_overflow")
                    return
                self._inbox_qos0 += 1
            self._inbox.append(received)
            if self._wake_pending:
                return
            self._wake_pending = True
        self._call_on_loop(self._wake.set)

    def _call_on_loop(self, function: Any, *args: Any) -> None:
        loop = self._loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(function, *args)

    def _set_connected(self, connected: bool) -> None:
        self.stats.connected = connected
        if connected:
            self._connected_once.set()

    def _count_drop(self, reason: str) -> None:
        self.stats.drops[reason] += 1


def _wait_published(info: paho.MQTTMessageInfo, timeout: float) -> None:
    try:
        info.wait_for_publish(timeout)
    except (RuntimeError, ValueError) as exc:
        log.info("mqtt.offline.not_published error=%r", exc)
