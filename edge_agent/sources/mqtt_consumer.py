"""The event-loop half of an MQTT source, shared by the paho and the awscrt clients.

A client's network thread (paho's loop, awscrt's native event loop) only appends what it
receives to an inbox and wakes the event loop once per burst (one ``call_soon_threadsafe``
per burst, not per message). Decoding, committing and acknowledging run on the event loop:
a burst is decoded and committed as one emit, then its acknowledgements are sent in arrival
order. Only the client-specific parts (connect, acknowledge, publish, stop) live in the
client modules.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import threading
from abc import ABC, abstractmethod
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final

from edge_agent.config import MqttSection
from edge_agent.deadletter import HandlingJournal
from edge_agent.decode import (
    EVENTS_CHANNEL,
    TELEMETRY_CHANNEL,
    DecodeContext,
    decode_message,
    parse_topic,
)
from edge_agent.events import Event, Rejected
from edge_agent.sources.base import Emit, SourceStats

log = logging.getLogger(__name__)

MAX_BURST: Final = 2000  # messages per emit: bounds one transaction and one decode pass
MAX_BURST_BYTES: Final = 256 * 1024  # and bytes: a burst must fit even the smallest budget
_BURSTS_IN_FLIGHT: Final = 4  # bursts decoded and handed on while earlier ones commit
# Messages read but not yet taken into a burst. Beyond this the network thread stops reading
# the socket (TCP flow control: the broker queues, then the publisher slows) instead of
# dropping what it read; QoS 0 has no other flow control. As many as the bursts in flight,
# so the next bursts are at hand when a commit finishes.
INBOX_LIMIT: Final = 4 * MAX_BURST
# Messages a telemetry-only connection decodes between two yields to the event loop: its
# bursts are decoded in slices of about a millisecond, so a customer event that arrives on
# the events connection meanwhile is decoded and its trigger tapped within a slice, not
# after the whole burst (benchmarks/suggest.py, loaded phase). A connection that carries
# customer events decodes its burst in one pass, as before: nothing on the loop is more
# urgent, and a yield can hand the GIL to the client's thread for a switch interval.
DECODE_SLICE: Final = 100


@dataclass(slots=True)  # not frozen: one per message, on the client's thread (half the cost)
class Received:
    topic: str
    payload: bytes
    ack: object  # what the client needs to acknowledge it: paho's mid, awscrt's control
    qos: int
    generation: int  # the connection it came on: a PUBACK is only valid on that one
    fingerprint: str | None  # for the dead-letter journal (QoS 1 only: QoS 0 never returns)


@dataclass(frozen=True, slots=True)
class _InFlight:
    task: asyncio.Task[None]
    burst: list[Received]
    items: list[Event | Rejected]
    batch: int  # its id in the dead-letter journal
    suspect: bool  # a message the agent died with before, handled alone


def status_topic(prefix: str, store_id: str) -> str:
    return f"{prefix}/{store_id}/agent/status"


class MqttConsumer(ABC):
    """Events or telemetry (or both) from products on the store network.

    The agent runs two: customer events on one connection and telemetry on another, each
    with its own session and in-flight window, so a customer event never waits at the
    broker behind a queue of telemetry. Only the events connection announces the agent's
    online/offline status.
    """

    def __init__(
        self,
        settings: MqttSection,
        client_id: str,
        decode_context: DecodeContext,
        *,
        channels: tuple[str, ...] = (EVENTS_CHANNEL, TELEMETRY_CHANNEL),
        name: str = "mqtt",
        announce: bool = True,
        journal: HandlingJournal | None = None,
        inbox_limit: int = INBOX_LIMIT,
    ) -> None:
        self.name = name
        self.settings = settings
        self.stats = SourceStats()
        self._context = decode_context
        store_id = decode_context.store_id
        prefix = f"{settings.topic_prefix}/{store_id}/devices/+/"
        self._topics = [prefix + channel for channel in channels]
        # An older session of this client id may hold the other channel's subscription.
        self._other_topics = [
            prefix + channel
            for channel in (EVENTS_CHANNEL, TELEMETRY_CHANNEL)
            if channel not in channels
        ]
        self._announce = announce
        self._journal = journal
        self._status_topic = status_topic(settings.topic_prefix, store_id)
        self._client_id = client_id
        self._connected_before = False  # a later CONNACK without our session is a loss
        self._inbox: collections.deque[Received] = collections.deque()
        self._inbox_limit = inbox_limit
        self._room = threading.Event()  # set when the inbox drained below its limit
        self._generation = 0
        self._wake_pending = False
        self._wake_lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake = asyncio.Event()
        self._stop = asyncio.Event()
        self._channels = channels
        self._decode_slice = MAX_BURST if EVENTS_CHANNEL in channels else DECODE_SLICE
        self._init_client()

    @abstractmethod
    def _init_client(self) -> None:
        """The client's own state, made once at construction (the network starts in run)."""

    # ---- the public surface -----------------------------------------------------------

    async def run(self, emit: Emit) -> None:
        self._loop = asyncio.get_running_loop()
        # run() again after a failure (sources/supervisor.py): start from a clean slate; what
        # was not acknowledged is redelivered on the new connection.
        if self._journal is not None:
            self._journal.abandon()
        with self._wake_lock:
            self._inbox.clear()
            self._wake_pending = False
        self._start_network()
        try:
            await self._consume(emit)
        finally:
            await asyncio.shield(self._shutdown())

    def request_stop(self) -> None:
        self._stop.set()
        self._wake.set()

    @abstractmethod
    def publish(self, topic: str, payload: bytes | str, qos: int = 0, retain: bool = False) -> None:
        """Queue a message for the broker (suggestions, status); safe from the event loop."""

    # ---- what a client module provides ------------------------------------------------

    @abstractmethod
    def _start_network(self) -> None:
        """Start connecting (and reconnecting) in the client's own thread."""

    @abstractmethod
    async def _shutdown(self) -> None:
        """Say offline, disconnect cleanly, stop the client's thread (bounded)."""

    @abstractmethod
    def _acknowledge(self, burst: list[Received]) -> None:
        """Acknowledge a committed burst, in arrival order."""

    # ---- the event loop side ----------------------------------------------------------

    async def _consume(self, emit: Emit) -> None:
        """Decode bursts and hand them on while earlier ones commit; acknowledge in order.

        Up to _BURSTS_IN_FLIGHT emits run at once, so the next burst is decoded (and a
        trigger among it answered) during the previous commit's fsync, and the writer can
        group several bursts into one transaction. PUBACKs still follow each burst's commit,
        in arrival order.
        """
        in_flight: collections.deque[_InFlight] = collections.deque()
        journal = self._journal
        async with asyncio.TaskGroup() as group:
            while not self._stop.is_set() or in_flight:
                while in_flight and in_flight[0].task.done():
                    done = in_flight.popleft()
                    done.task.result()  # a failed commit is a bug or a dead disk: let it escape
                    self.stats.count(done.items)
                    self._acknowledge(done.burst)
                    if journal is not None:
                        journal.end(done.batch, (message.fingerprint for message in done.burst))
                burst: list[Received] = []
                taking = len(in_flight) < _BURSTS_IN_FLIGHT and not self._stop.is_set()
                if self._inbox and taking and not (in_flight and in_flight[-1].suspect):
                    burst = self._take_burst(alone=not in_flight)
                if burst:
                    batch = 0
                    if journal is not None:  # before handling: a death now is on record
                        batch = journal.begin(message.fingerprint for message in burst)
                    items = await self._decode_in_slices(burst)
                    task = group.create_task(emit(items), name="mqtt-emit")
                    suspect = journal is not None and journal.verdict(burst[0].fingerprint) > 0
                    in_flight.append(_InFlight(task, burst, items, batch, suspect))
                    await asyncio.sleep(0)  # let the emit enqueue its commit, in order
                elif in_flight:
                    await asyncio.wait([in_flight[0].task])
                elif not self._stop.is_set():
                    await self._wake.wait()
                    self._wake.clear()

    def _take_burst(self, alone: bool) -> list[Received]:
        """The next burst. A message the agent died while handling before (a suspect) is
        taken alone, with nothing else in flight, so a death again blames only it."""
        journal = self._journal
        with self._wake_lock:
            self._wake_pending = False
            burst: list[Received] = []
            size = 0
            while self._inbox and len(burst) < MAX_BURST and size < MAX_BURST_BYTES:
                message = self._inbox[0]
                if journal is not None and journal.verdict(message.fingerprint):
                    if not burst and alone:
                        burst.append(self._inbox.popleft())
                    break
                self._inbox.popleft()
                burst.append(message)
                size += len(message.payload)
            if len(self._inbox) < self._inbox_limit:
                self._room.set()
        self.stats.received += len(burst)
        return burst

    async def _decode_in_slices(self, burst: list[Received]) -> list[Event | Rejected]:
        """Decode a burst; a telemetry-only connection lets the loop run other work (the other
        connection's customer events, the personalizer's answers) between its slices."""
        now = datetime.now(UTC)  # one receive time per burst: they arrived together
        step = self._decode_slice
        items = self._decode(burst[:step], now)
        for start in range(step, len(burst), step):
            await asyncio.sleep(0)
            items += self._decode(burst[start : start + step], now)
        return items

    def _decode(self, burst: list[Received], now: datetime) -> list[Event | Rejected]:
        items: list[Event | Rejected] = []
        prefix, store_id = self.settings.topic_prefix, self._context.store_id
        for message in burst:
            source = f"mqtt:{message.topic}"
            topic = parse_topic(message.topic, prefix, store_id)
            if self._journal is not None and self._journal.is_poison(message.fingerprint):
                items.append(self._dead_letter(source, message))
                continue
            if topic is None:
                items.append(Rejected(source, "bad_topic", message.payload[:256], message.topic))
                continue
            try:
                items.extend(decode_message(self._context, topic, source, message.payload, now))
            except Exception as exc:  # one guard per message: an unknown bug costs one message
                log.exception("mqtt.decode.internal_error topic=%s", message.topic)
                detail = f"{type(exc).__name__}: {exc}"[:200]
                items.append(Rejected(source, "internal_error", message.payload, detail))
        return items

    def _dead_letter(self, source: str, message: Received) -> Rejected:
        deaths = self._journal.verdict(message.fingerprint) if self._journal else 0
        log.warning(
            "mqtt.message.dead_lettered topic=%s bytes=%d deaths=%d (quarantined as poison "
            "and acknowledged; see docs/operations.md)",
            message.topic,
            len(message.payload),
            deaths,
        )
        detail = f"the agent died {deaths} times while handling this message"
        return Rejected(source, "poison", message.payload, detail)

    # ---- called from the client's thread ----------------------------------------------

    def _enqueue(self, received: Received) -> None:
        """Put one message in the inbox; wake the event loop once per burst."""
        with self._wake_lock:
            self._inbox.append(received)
            if self._wake_pending:
                return
            self._wake_pending = True
        self._call_on_loop(self._wake.set)

    def _connected(self, session_present: bool) -> None:
        """A new connection (client's thread): a new generation of PUBACK handles, and a
        warning and a count when the broker forgot the agent's session."""
        self._generation += 1
        if self._connected_before and not session_present and self.settings.qos > 0:
            # The broker forgot us (restarted without persistence, session expired, another
            # client took our id): whatever it had queued for the agent is gone.
            log.warning(
                "mqtt.session.lost host=%s port=%d client_id=%s (messages queued for the "
                "agent while it was away are gone)",
                self.settings.host,
                self.settings.port,
                self._client_id,
            )
            self._call_on_loop(self._count_session_lost)
        self._connected_before = True

    def _inbox_full(self) -> bool:
        with self._wake_lock:
            if len(self._inbox) < self._inbox_limit:
                return False
            self._room.clear()
            return True

    def _call_on_loop(self, function: Any, *args: Any) -> None:
        loop = self._loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(function, *args)

    def _set_connected(self, connected: bool) -> None:
        self.stats.connected = connected

    def _count_session_lost(self) -> None:
        self.stats.sessions_lost += 1

    def _count_drop(self, reason: str) -> None:
        self.stats.drops[reason] += 1
