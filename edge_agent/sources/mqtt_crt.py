"""The MQTT source on awscrt (the AWS Common Runtime's C MQTT 5 client).

benchmarks/mqtt_clients.py chose it: the C client parses packets off the GIL and hands one
Python callback per message, and it lets the callback take the PUBACK
(``acquire_publish_acknowledgement_control()``) and send it later
(``invoke_publish_acknowledgement()``): the PUBACK still follows the commit. Sessions are
persistent (``REJOIN_ALWAYS`` is clean_start=False on every CONNECT, with a session expiry)
and the Receive Maximum bounds the QoS 1 messages in flight before our PUBACKs.

Each source owns a one-thread awscrt event loop. Its publish callback appends to the inbox
(mqtt_consumer.py) and wakes the asyncio loop once per burst. awscrt has no "stop reading
the socket": when the inbox is full (QoS 0 has no window, or the agent is stalled) the
callback waits for room, which stops that thread reading its socket (TCP flow control, as
paho's paused loop does) - but also its pings and PUBACK writes, which is why the thread is
the source's own. A stall longer than 1.5 keepalives ends the connection; QoS 1 messages
then come back on the persistent session, QoS 0 messages queued at the broker are its to
keep or drop (mosquitto: ``max_queued_messages``).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import logging
import os
import socket
import threading
from typing import TYPE_CHECKING, Any, Final

from awscrt import exceptions as crt_exceptions
from awscrt import io as crt_io
from awscrt import mqtt5

from edge_agent.deadletter import fingerprint
from edge_agent.sources.base import Emit
from edge_agent.sources.mqtt_consumer import MqttConsumer, Received

if TYPE_CHECKING:  # paho is imported only on a fall-back to MQTT 3.1.1 (about 0.5 MB PSS)
    from edge_agent.sources.mqtt import MqttSource

log = logging.getLogger(__name__)

_ROOM_POLL_S: Final = 0.2  # how often a waiting publish callback looks for a stop
_STOP_TIMEOUT_S: Final = 5.0
_OFFLINE_TIMEOUT_S: Final = 2.0
_CONNACK_TIMEOUT_MS: Final = 5000

_QOS: Final = {0: mqtt5.QoS.AT_MOST_ONCE, 1: mqtt5.QoS.AT_LEAST_ONCE}


class MqttCrtSource(MqttConsumer):
    """The source on awscrt: MQTT 5 only (mqtt_consumer.MqttConsumer has the rest)."""

    def _init_client(self) -> None:
        self._client: mqtt5.Client | None = None
        self._stopped = threading.Event()
        self._closing = threading.Event()  # set at shutdown: a waiting callback gives up
        # client = "auto" and protocol = "auto" on a broker without MQTT 5: this source
        # hands over to paho on MQTT 3.1.1 (what protocol = "auto" promises).
        self._may_fall_back = self.settings.client == "auto" and self.settings.protocol == "auto"
        self._fall_back = False
        self._stop_requested = False
        self._paho: MqttSource | None = None
        self._last_publish: concurrent.futures.Future[Any] | None = None

    async def run(self, emit: Emit) -> None:
        if self._paho is None:
            await super().run(emit)
            if not self._fall_back or self._stop_requested:
                return
            log.warning(
                "mqtt.protocol.fallback the broker does not speak MQTT 5; using paho on 3.1.1, "
                "so the QoS 1 window is the broker's max_inflight_messages"
            )
            from edge_agent.sources.mqtt import MqttSource

            settings = dataclasses.replace(self.settings, protocol="3.1.1", client="paho")
            paho = MqttSource(
                settings,
                self._client_id,
                self._context,
                channels=self._channels,
                name=self.name,
                announce=self._announce,
                journal=self._journal,
                inbox_limit=self._inbox_limit,
            )
            paho.stats = self.stats  # the same counters on /status and /metrics
            self._paho = paho
        await self._paho.run(emit)

    def request_stop(self) -> None:
        self._stop_requested = True
        super().request_stop()
        if self._paho is not None:
            self._paho.request_stop()

    def publish(self, topic: str, payload: bytes | str, qos: int = 0, retain: bool = False) -> None:
        if self._paho is not None:
            self._paho.publish(topic, payload, qos, retain)
            return
        client = self._client
        if client is None:
            return
        data = payload.encode() if isinstance(payload, str) else payload
        # Kept so a stop first lets what was published go out (publishes leave in order).
        self._last_publish = client.publish(
            mqtt5.PublishPacket(topic=topic, payload=data, qos=_QOS[qos], retain=retain)
        )

    # ---- the event loop side ----------------------------------------------------------

    def _start_network(self) -> None:
        self._stopped.clear()
        self._closing.clear()
        self._client = self._make_client()
        self._client.start()

    def _acknowledge(self, burst: list[Received]) -> None:
        client, generation = self._client, self._generation
        if client is None:
            return
        for message in burst:
            # A message from an earlier connection is redelivered by the broker instead.
            if message.qos > 0 and message.generation == generation:
                client.invoke_publish_acknowledgement(message.ack)

    async def _shutdown(self) -> None:
        client = self._client
        if client is None:
            return
        last = self._last_publish
        if last is not None and self.stats.connected:
            # awscrt's stop drops what is still queued: a suggestion already on a display
            # would never reach its topic.
            try:
                await asyncio.wait_for(asyncio.wrap_future(last), _OFFLINE_TIMEOUT_S)
            except (TimeoutError, crt_exceptions.AwsCrtError) as exc:
                log.info("mqtt.publishes.not_flushed error=%r", exc)
        if self.stats.connected and self._announce:
            # The clean disconnect suppresses the last will, so say "offline" ourselves.
            packet = mqtt5.PublishPacket(
                topic=self._status_topic, payload=b"offline", qos=_QOS[1], retain=True
            )
            try:
                await asyncio.wait_for(
                    asyncio.wrap_future(client.publish(packet)), _OFFLINE_TIMEOUT_S
                )
            except (TimeoutError, crt_exceptions.AwsCrtError) as exc:
                log.info("mqtt.offline.not_published error=%r", exc)
        self._closing.set()
        self._room.set()  # a callback waiting for room returns, so the thread can stop
        client.stop(mqtt5.DisconnectPacket())
        await asyncio.to_thread(self._stopped.wait, _STOP_TIMEOUT_S)
        self.stats.connected = False

    # ---- awscrt's thread ----------------------------------------------------------------

    def _make_client(self) -> mqtt5.Client:
        settings = self.settings
        # One event-loop thread per source: a callback waiting for room (flow control)
        # stalls only this connection, never the other source's.
        group = crt_io.EventLoopGroup(1)
        bootstrap = crt_io.ClientBootstrap(group, crt_io.DefaultHostResolver(group))
        will = None
        if self._announce:
            will = mqtt5.PublishPacket(
                topic=self._status_topic, payload=b"offline", qos=_QOS[1], retain=True
            )
        connect = mqtt5.ConnectPacket(
            client_id=self._client_id,
            keep_alive_interval_sec=settings.keepalive,
            session_expiry_interval_sec=settings.session_expiry_s,
            receive_maximum=settings.receive_maximum,
            will=will,
            username=settings.username or None,
            password=settings.password or None,
        )
        options = mqtt5.ClientOptions(
            host_name=settings.host,
            port=settings.port,
            bootstrap=bootstrap,
            tls_ctx=self._tls_context(),
            connect_options=connect,
            session_behavior=mqtt5.ClientSessionBehaviorType.REJOIN_ALWAYS,
            retry_jitter_mode=mqtt5.ExponentialBackoffJitterMode.FULL,
            min_reconnect_delay_ms=int(settings.reconnect_min_s * 1000),
            max_reconnect_delay_ms=int(settings.reconnect_max_s * 1000),
            connack_timeout_ms=_CONNACK_TIMEOUT_MS,
            on_publish_callback_fn=self._on_publish,
            on_lifecycle_event_connection_success_fn=self._on_connection_success,
            on_lifecycle_event_connection_failure_fn=self._on_connection_failure,
            on_lifecycle_event_disconnection_fn=self._on_disconnection,
            on_lifecycle_event_stopped_fn=self._on_stopped,
        )
        return mqtt5.Client(options)

    def _tls_context(self) -> crt_io.ClientTlsContext | None:
        settings = self.settings
        if not settings.tls:
            return None
        if settings.cert_file:
            options = crt_io.TlsContextOptions.create_client_with_mtls_from_path(
                settings.cert_file, settings.key_file
            )
        else:
            options = crt_io.TlsContextOptions()
        if settings.ca_file:
            options.override_default_trust_store_from_path(None, settings.ca_file)
        return crt_io.ClientTlsContext(options)

    def _on_publish(self, data: mqtt5.PublishReceivedData) -> None:
        packet = data.publish_packet
        qos = int(packet.qos)
        ack = None
        if qos > 0 and data.acquire_publish_acknowledgement_control is not None:
            ack = data.acquire_publish_acknowledgement_control()  # PUBACK after the commit
        topic: str = packet.topic
        payload = bytes(packet.payload or b"")
        while self._inbox_full() and not self._closing.is_set():
            # Flow control: not reading this socket until the consumer takes a burst.
            self._room.wait(_ROOM_POLL_S)
        fp = fingerprint(topic, payload) if self._journal is not None and qos else None
        self._enqueue(Received(topic, payload, ack, qos, self._generation, fp))

    def _on_connection_success(self, data: mqtt5.LifecycleConnectSuccessData) -> None:
        client = self._client
        session_present = bool(data.connack_packet and data.connack_packet.session_present)
        self._connected(session_present)
        _no_delay_to(self.settings.port)
        if client is not None:
            # Subscribe on every connect: a broker that lost our session forgets them.
            qos = _QOS[self.settings.qos]
            subscriptions = [mqtt5.Subscription(topic_filter=t, qos=qos) for t in self._topics]
            client.subscribe(mqtt5.SubscribePacket(subscriptions=subscriptions))
            if self._other_topics:
                client.unsubscribe(mqtt5.UnsubscribePacket(topic_filters=self._other_topics))
            if self._announce:
                self.publish(self._status_topic, b"online", qos=1, retain=True)
        log.info(
            "mqtt.connected host=%s port=%d session_present=%s client=awscrt",
            self.settings.host,
            self.settings.port,
            session_present,
        )
        self._call_on_loop(self._set_connected, True)

    def _on_connection_failure(self, data: mqtt5.LifecycleConnectFailureData) -> None:
        reason = data.connack_packet.reason_code if data.connack_packet else None
        refused = reason == mqtt5.ConnectReasonCode.UNSUPPORTED_PROTOCOL_VERSION
        # Some brokers (amqtt) neither accept nor refuse an MQTT 5 CONNECT: they just wait.
        silent = getattr(data.exception, "name", "") == "AWS_ERROR_MQTT5_CONNACK_TIMEOUT"
        if self._may_fall_back and not self._connected_before and (refused or silent):
            self._fall_back = True
            self._call_on_loop(super().request_stop)
            return
        if refused:
            log.error(
                "mqtt.connect.refused the broker does not speak MQTT 5: set [mqtt] client = "
                '"paho" (it falls back to 3.1.1)'
            )
        log.warning(
            "mqtt.connect.failed host=%s port=%d error=%r reason=%s",
            self.settings.host,
            self.settings.port,
            data.exception,
            reason,
        )

    def _on_disconnection(self, data: mqtt5.LifecycleDisconnectData) -> None:
        self._generation += 1
        if self._closing.is_set():
            log.info("mqtt.disconnected error=%r", data.exception)
        else:
            log.warning("mqtt.disconnected error=%r", data.exception)
        self._call_on_loop(self._set_connected, False)

    def _on_stopped(self, data: Any) -> None:
        self._stopped.set()


def _no_delay_to(port: int) -> None:
    """TCP_NODELAY on this process's TCP sockets to the broker's port.

    awscrt offers no socket option for it, and without it a suggestion (one small packet)
    waits for the broker's delayed ACK (Nagle): benchmarks/suggest.py measured a 26 ms p50
    on awscrt against 1.3 ms on paho (which sets it, mqtt.py). The socket is the C client's,
    so it is found by its peer port under /proc/self/fd (Linux; elsewhere nothing happens)
    and set through a duplicate descriptor. Every socket of ours to the broker is an MQTT
    client's, so setting it on all of them is right.
    """
    with contextlib.suppress(OSError):
        names = os.listdir("/proc/self/fd")
        for name in names:
            with contextlib.suppress(OSError, ValueError):
                if not os.readlink(f"/proc/self/fd/{name}").startswith("socket:"):
                    continue
                with socket.socket(fileno=os.dup(int(name))) as sock:
                    if sock.family not in (socket.AF_INET, socket.AF_INET6):
                        continue
                    if sock.type == socket.SOCK_STREAM and sock.getpeername()[1] == port:
                        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
