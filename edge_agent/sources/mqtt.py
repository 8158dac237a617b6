"""The MQTT source: subscribe with QoS 1 on a persistent session, PUBACK only after commit.

QoS 1 (the normal case) speaks MQTT 5 with a persistent session (clean_start=False, a
session expiry) so the broker keeps messages while the agent is down, and a Receive Maximum
so the broker may have many messages in flight while their commit is under way (MQTT 3.1.1
leaves that window to the broker's config: 20 on a default mosquitto). QoS 0 has nothing to
keep or to acknowledge, so it speaks MQTT 3.1.1 and saves parsing properties per message.

Why paho-mqtt on a network thread: aiomqtt cannot defer acknowledgements (its PR #346 is
open); paho 2.x can (``manual_ack=True`` then ``client.ack(mid, qos)``). One thread owned by
this source runs paho's network loop and our reconnect loop (capped exponential backoff with
jitter, which paho's built-in reconnect lacks); its on_message only appends to a deque and
wakes the event loop once per burst. Decoding, committing and acknowledging run on the event
loop: a burst is decoded and committed as one emit, then its PUBACKs are sent in arrival
order. paho's ack() and publish() may be called from another thread (paho guards its queues
with its own locks) and may run paho's callbacks there when the write fails, so no lock of
ours is ever held around a paho call: holding one deadlocked against on_disconnect.

Nothing read is ever dropped: when the inbox holds INBOX_LIMIT messages the network thread
stops reading the socket until a burst is taken, so a QoS 0 flood waits in TCP buffers and
the broker's queue (its ``max_queued_messages`` must allow it) instead of in our memory.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
import threading
import time
from typing import Any, Final, cast

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from edge_agent.backoff import Backoff
from edge_agent.config import MqttSection
from edge_agent.deadletter import fingerprint
from edge_agent.sources.mqtt_consumer import INBOX_LIMIT, MAX_BURST, MqttConsumer, Received

__all__ = ["INBOX_LIMIT", "MAX_BURST", "MqttSource"]

log = logging.getLogger(__name__)

_NETWORK_POLL_S: Final = 0.2
_CONNACK_TIMEOUT_S: Final = 5.0


_V3_UNACCEPTABLE_PROTOCOL: Final = 1  # CONNACK return codes that mean "not this version"
_V5_UNSUPPORTED_PROTOCOL: Final = 0x84


def _first_protocol(settings: MqttSection) -> MQTTProtocolVersion:
    if settings.protocol == "3.1.1" or (settings.protocol == "auto" and settings.qos == 0):
        return paho.MQTTv311
    return paho.MQTTv5


class MqttSource(MqttConsumer):
    """The source on paho-mqtt: MQTT 3.1.1 and 5 (mqtt_consumer.MqttConsumer has the rest)."""

    def _init_client(self) -> None:
        self._protocol = _first_protocol(self.settings)
        self._fall_back = False  # set when a broker refuses MQTT 5 and protocol is "auto"
        self._connack_seen = False
        self._client = self._make_client(self._client_id)
        self._network_stop = threading.Event()
        self._network_thread: threading.Thread | None = None

    # ---- the public surface -----------------------------------------------------------

    def _start_network(self) -> None:
        self._network_stop.clear()
        self._network_thread = threading.Thread(
            target=self._network, name="mqtt-network", daemon=True
        )
        self._network_thread.start()

    def publish(self, topic: str, payload: bytes | str, qos: int = 0, retain: bool = False) -> None:
        """Queue a message for the broker (suggestions, status); safe from the event loop."""
        self._client.publish(topic, payload, qos=qos, retain=retain)

    # ---- the event loop side ----------------------------------------------------------

    def _acknowledge(self, burst: list[Received]) -> None:
        client, generation = self._client, self._generation
        for message in burst:
            # A message from an earlier connection is redelivered by the broker instead. (A
            # reconnect waits out a backoff, so the check cannot race a new connection.)
            if message.qos > 0 and message.generation == generation:
                client.ack(cast(int, message.ack), message.qos)

    async def _shutdown(self) -> None:
        if self.stats.connected and self._announce:
            info = self._client.publish(self._status_topic, "offline", qos=1, retain=True)
            # The clean disconnect suppresses the last will, so say "offline" ourselves.
            await asyncio.to_thread(_wait_published, info, 2.0)
        self._network_stop.set()
        if self._network_thread is not None:
            await asyncio.to_thread(self._network_thread.join, 5.0)
        self.stats.connected = False

    # ---- the network thread -----------------------------------------------------------

    def _make_client(self, client_id: str) -> paho.Client:
        settings = self.settings
        client = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=client_id,
            protocol=self._protocol,
            # 3.1.1: a persistent session only where there is something to keep (QoS 1).
            clean_session=None if self._protocol == paho.MQTTv5 else settings.qos == 0,
            reconnect_on_failure=False,  # our loop reconnects, with jitter
            manual_ack=True,
        )
        if self._announce:
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
        client.on_socket_open = _no_delay
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        return client

    def _connect_properties(self) -> Properties:
        properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]  # paho: untyped
        properties.SessionExpiryInterval = self.settings.session_expiry_s
        properties.ReceiveMaximum = self.settings.receive_maximum
        return properties

    def _network(self) -> None:
        """Run paho's network loop and our reconnect loop (backoff with jitter)."""
        backoff = Backoff(self.settings.reconnect_min_s, self.settings.reconnect_max_s)
        client = self._client
        connected = False
        connect_started = 0.0
        while not self._network_stop.is_set():
            if not connected:
                try:
                    self._connect(client)
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
                connected = True
                connect_started = time.monotonic()
                self._connack_seen = False
            paused = self._inbox_full()
            if paused:
                self._room.wait(_NETWORK_POLL_S)
            try:
                if paused:
                    # Stop reading (TCP flow control) until the consumer takes a burst;
                    # keep writing (PUBACKs, suggestions) and pinging meanwhile.
                    client.loop_write()
                    rc = client.loop_misc()
                else:
                    rc = client.loop(timeout=_NETWORK_POLL_S)
            except Exception:
                # An exception out of paho (or one of our callbacks) must not end this
                # thread: the source would look alive and never receive again. Reconnect.
                log.exception("mqtt.network.internal_error")
                client.disconnect()
                rc = MQTTErrorCode.MQTT_ERR_CONN_LOST
            if not self._connack_seen and time.monotonic() - connect_started > _CONNACK_TIMEOUT_S:
                # Some brokers neither accept nor refuse an MQTT 5 CONNECT: they just wait.
                log.warning("mqtt.connack.timeout after_s=%.0f", _CONNACK_TIMEOUT_S)
                self._fall_back = self._protocol == paho.MQTTv5 and self.settings.protocol == "auto"
                client.disconnect()
                rc = MQTTErrorCode.MQTT_ERR_CONN_LOST
            if rc == MQTTErrorCode.MQTT_ERR_SUCCESS:
                if self.stats.connected:
                    backoff.reset()
                continue
            connected = False
            if self._fall_back:
                client = self._use_mqtt_311()
                continue
            delay = backoff.next_delay()
            log.warning("mqtt.connection.lost rc=%s retry_in_s=%.2f", rc, delay)
            self._network_stop.wait(delay)
        if connected:
            client.disconnect()
            client.loop(timeout=0.1)

    def _connect(self, client: paho.Client) -> None:
        settings = self.settings
        if self._protocol == paho.MQTTv5:
            client.connect(
                settings.host,
                settings.port,
                settings.keepalive,
                clean_start=False,  # persistent: the broker queues while we're down
                properties=self._connect_properties(),
            )
        else:
            client.connect(settings.host, settings.port, settings.keepalive)

    def _use_mqtt_311(self) -> paho.Client:
        log.warning(
            "mqtt.protocol.fallback the broker does not speak MQTT 5; using 3.1.1, so the QoS 1 "
            "window is the broker's max_inflight_messages (raise it for throughput)"
        )
        self._fall_back = False
        self._protocol = paho.MQTTv311
        client = self._make_client(self._client_id)
        self._generation += 1
        self._client = client
        return client

    def _on_connect(
        self,
        client: paho.Client,
        userdata: Any,
        flags: paho.ConnectFlags,
        reason: ReasonCode,
        properties: Any,
    ) -> None:
        self._connack_seen = True
        if reason.is_failure:
            unsupported = reason.value in (_V3_UNACCEPTABLE_PROTOCOL, _V5_UNSUPPORTED_PROTOCOL)
            if unsupported and self._protocol == paho.MQTTv5 and self.settings.protocol == "auto":
                self._fall_back = True
                return
            log.error("mqtt.connect.refused reason=%s", reason)
            return
        self._connected(bool(flags.session_present))
        # Subscribe on every connect: a broker that lost our session forgets subscriptions.
        client.subscribe([(topic, self.settings.qos) for topic in self._topics])
        if self._other_topics:
            client.unsubscribe(self._other_topics)
        if self._announce:
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
        self._generation += 1
        if self._network_stop.is_set():
            log.info("mqtt.disconnected reason=%s", reason)
        else:
            log.warning("mqtt.disconnected reason=%s", reason)
        self._call_on_loop(self._set_connected, False)

    def _on_message(self, client: paho.Client, userdata: Any, message: paho.MQTTMessage) -> None:
        payload = bytes(message.payload)  # paho may hand a bytearray; keep an immutable copy
        try:
            topic = message.topic
        except UnicodeDecodeError:
            # Raised here it would end paho's loop and this thread. Unacknowledged, a QoS 1
            # message would come back on each reconnect: count it and acknowledge it.
            self._call_on_loop(self._count_drop, "bad_topic_utf8")
            if message.qos > 0:
                client.ack(message.mid, message.qos)
            return
        fp = fingerprint(topic, payload) if self._journal is not None and message.qos else None
        self._enqueue(Received(topic, payload, message.mid, message.qos, self._generation, fp))


def _no_delay(client: paho.Client, userdata: Any, sock: Any) -> None:
    # A suggestion is one small packet: without TCP_NODELAY it waits ~40 ms for the
    # broker's delayed ACK (Nagle), forty times the model's own time.
    if isinstance(sock, socket.socket) and sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _wait_published(info: paho.MQTTMessageInfo, timeout: float) -> None:
    try:
        info.wait_for_publish(timeout)
    except (RuntimeError, ValueError) as exc:
        log.info("mqtt.offline.not_published error=%r", exc)
