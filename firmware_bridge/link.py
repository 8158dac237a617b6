"""The agent's side of one serial link, sans-IO: frames in, frames and deliveries out.

It negotiates the protocol version from HELLO, maps EVENT/TELEMETRY frames to ``Event`` or
``Rejected``, recognises retransmissions by (device id, boot id, seq), answers ACK or NACK
only when the source says the item is committed, retries COMMANDs until their RESULT or
expiry, and keeps a PING heartbeat. Time comes in as arguments; nothing here waits or reads.
"""

from __future__ import annotations

import logging
import struct
from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from datetime import datetime
from typing import Final

from cloud_sync.envelope_schema import MAX_ID_LENGTH, Cleaned, Registry
from edge_agent import __version__
from edge_agent.device_time import DeviceClockJudge, from_epoch_ms
from edge_agent.errors import DecodeError
from edge_agent.events import Event, Rejected, derive_event_id, format_ts
from firmware_bridge import codec
from firmware_bridge.codec import Frame, MessageType
from firmware_bridge.messages import (
    Ack,
    Command,
    EventMessage,
    Hello,
    Nack,
    NackReason,
    Result,
    TelemetryMessage,
)

logger = logging.getLogger(__name__)

AGENT_NAME: Final = "edge-agent"


@dataclass(frozen=True, slots=True)
class DeliveryKey:
    device_id: str
    boot_id: int
    seq: int


@dataclass(frozen=True, slots=True)
class Delivery:
    """An item to commit; the source calls ``DeviceLink.settled(key, item)`` after it is."""

    key: DeliveryKey
    item: Event | Rejected


@dataclass(frozen=True, slots=True)
class CommandOutcome:
    status: str  # a ResultStatus name in lower case ("ok", "unsupported", ...) or "expired"
    detail: str
    attempts: int


@dataclass(frozen=True, slots=True)
class CommandSettled:
    seq: int
    outcome: CommandOutcome


@dataclass
class LinkOutput:
    send: list[Frame] = field(default_factory=list)
    deliveries: list[Delivery] = field(default_factory=list)
    settled: list[CommandSettled] = field(default_factory=list)


@dataclass
class _PendingCommand:
    device_id: str
    payload: bytes
    expires_at: float
    next_try: float
    attempts: int = 0


@dataclass(frozen=True, slots=True)
class LinkTiming:
    command_retry_s: float = 0.5
    hello_retry_s: float = 2.0
    ping_interval_s: float = 5.0
    silence_s: float = 15.0  # no frame for this long: the device is reported silent
    dedup_capacity: int = 4096  # remembered (device, boot, seq) outcomes; the buffer dedups too


def serial_event_id(device_id: str, boot_id: int, seq: int, key: bytes = b"") -> str:
    """The same id for every retransmission of one device frame, across agent restarts.

    The agent passes its kept id key (``governance.event_id_key``) so every derived id is
    keyed alike; the input (device, boot, seq) names no person, so tools may leave it empty.
    """
    return derive_event_id(key, f"serial:{device_id}", struct.pack("<II", boot_id, seq))


class DeviceLink:
    def __init__(
        self,
        store_id: str,
        registry: Registry,
        *,
        agent_boot_id: int,
        versions: range = range(codec.PROTOCOL_MIN, codec.PROTOCOL_MAX + 1),
        timing: LinkTiming = LinkTiming(),
        id_key: bytes = b"",
        clock: DeviceClockJudge | None = None,
    ) -> None:
        self.store_id = store_id
        self._id_key = id_key
        # The agent shares one judge between its sources: one timestamp rule, one alarm.
        self.clock = clock or DeviceClockJudge()
        self.registry = registry
        self.agent_boot_id = agent_boot_id
        self.versions = versions
        self.timing = timing
        self.device: Hello | None = None
        self.device_boot_id: int | None = None
        self.version = versions.stop - 1
        self.refusal: str | None = None  # why the last device's protocol was not spoken
        self.drops: Counter[str] = Counter()
        self.duplicates = 0
        self.received = 0  # EVENT and TELEMETRY frames taken in, retransmissions included
        self._seq = 0
        self._inflight: set[DeliveryKey] = set()
        self._outcomes: OrderedDict[DeliveryKey, bool] = OrderedDict()  # True: ACKed
        self._commands: dict[int, _PendingCommand] = {}
        self._last_heard = float("-inf")
        self._last_ping = float("-inf")
        self._last_hello_request = float("-inf")

    # -- frames out -------------------------------------------------------------------
    def _frame(self, kind: MessageType, payload: bytes = b"", flags: int = 0) -> Frame:
        self._seq = self._seq % codec.U32_MAX + 1
        return Frame(kind, self.agent_boot_id, self._seq, payload, flags, self.version)

    def _hello(self, flags: int = 0) -> Frame:
        hello = Hello(AGENT_NAME, __version__, self.versions.start, self.versions.stop - 1)
        return self._frame(MessageType.HELLO, hello.encode(), flags)

    def connected(self, now: float) -> list[Frame]:
        """The port just opened: ask whoever is there to introduce itself.

        Until it does, nothing is attributed: another device may sit on this port now.
        """
        self.device = None
        self.device_boot_id = None
        self._last_hello_request = now
        return [self._hello(codec.FLAG_HELLO_REQUEST)]

    def alive(self, now: float) -> bool:
        return now - self._last_heard < self.timing.silence_s

    # -- frames in --------------------------------------------------------------------
    def receive(
        self, frame: Frame, now: float, wall: datetime, dead_letter: str | None = None
    ) -> LinkOutput:
        """``dead_letter``: the frame killed the agent before (deadletter.py); deliver it as
        quarantined ("poison") with this detail instead of decoding it again."""
        self._last_heard = now
        out = LinkOutput()
        if frame.type == MessageType.HELLO:
            self._on_hello(frame, now, out)
        elif frame.type in (MessageType.EVENT, MessageType.TELEMETRY):
            self._on_data(frame, now, wall, out, dead_letter)
        elif frame.type == MessageType.RESULT:
            self._on_result(frame, out)
        elif frame.type == MessageType.PING:
            out.send.append(self._frame(MessageType.PONG, frame.payload))
        elif frame.type != MessageType.PONG:
            self.drops["unexpected_type"] += 1
        return out

    def _on_hello(self, frame: Frame, now: float, out: LinkOutput) -> None:
        try:
            hello = Hello.decode(frame.payload)
        except DecodeError as exc:
            self.drops["bad_hello"] += 1
            logger.warning("serial.hello.invalid reason=%s detail=%s", exc.reason, exc.detail)
            return
        if hello.device_id == AGENT_NAME:
            self.drops["echo"] += 1  # our own HELLO, e.g. on loop:// or an echoing adapter
            return
        low = max(hello.proto_min, self.versions.start)
        high = min(hello.proto_max, self.versions.stop - 1)
        if low > high:
            refusal = (
                f"device {hello.device_id} firmware {hello.firmware} speaks protocol "
                f"v{hello.proto_min}..v{hello.proto_max}; this agent speaks "
                f"v{self.versions.start}..v{self.versions.stop - 1}; "
                + ("update the agent" if hello.proto_min > high else "update the firmware")
            )
            if refusal != self.refusal:
                logger.warning("serial.hello.refused reason=%r", refusal)
            self.device, self.refusal = None, refusal
            nack = Nack(frame.boot_id, frame.seq, NackReason.VERSION_UNSUPPORTED, refusal)
            out.send.append(self._frame(MessageType.NACK, nack.encode()))
            return
        rebooted = self.device_boot_id is not None and self.device_boot_id != frame.boot_id
        if self.device is None or self.device.device_id != hello.device_id or rebooted:
            logger.info(
                "serial.device.hello device_id=%s firmware=%s boot_id=%08x version=%d caps=0x%02x",
                hello.device_id,
                hello.firmware,
                frame.boot_id,
                high,
                int(hello.capabilities),
            )
        self.device, self.device_boot_id, self.version, self.refusal = (
            hello,
            frame.boot_id,
            high,
            None,
        )
        out.send.append(self._hello())
        # The device may have lost commands in a reboot: send what is pending right away.
        for pending in self._commands.values():
            if pending.device_id == hello.device_id:
                pending.next_try = now

    def _on_data(
        self, frame: Frame, now: float, wall: datetime, out: LinkOutput, dead_letter: str | None
    ) -> None:
        self.received += 1
        if self.device is None:
            self.drops["unidentified"] += 1
            if now - self._last_hello_request >= self.timing.hello_retry_s:
                self._last_hello_request = now
                out.send.append(self._hello(codec.FLAG_HELLO_REQUEST))
            return
        key = DeliveryKey(self.device.device_id, frame.boot_id, frame.seq)
        if key in self._inflight:
            self.duplicates += 1  # the ACK follows the commit already under way
            return
        acked = self._outcomes.get(key)
        if acked is not None:
            self.duplicates += 1  # our ACK was lost: say it again
            out.send.append(self._answer(key, acked))
            return
        self._inflight.add(key)
        source = f"serial:{key.device_id}"
        if dead_letter is not None:
            poison = Rejected(source, "poison", frame.payload, dead_letter, format_ts(wall))
            out.deliveries.append(Delivery(key, poison))
            return
        try:
            item = self._to_item(frame, key, wall)
        except Exception as exc:  # an unknown bug costs this frame (NACKed), not the link
            logger.exception("serial.decode.internal_error device_id=%s", key.device_id)
            detail = f"{type(exc).__name__}: {exc}"[:200]
            item = Rejected(source, "internal_error", frame.payload, detail)
        out.deliveries.append(Delivery(key, item))

    def _to_item(self, frame: Frame, key: DeliveryKey, wall: datetime) -> Event | Rejected:
        source = f"serial:{key.device_id}"
        message: EventMessage | TelemetryMessage
        try:
            if frame.type == MessageType.EVENT:
                message = EventMessage.decode(frame.payload)
            else:
                message = TelemetryMessage.decode(frame.payload)
        except DecodeError as exc:
            return Rejected(source, exc.reason, frame.payload, exc.detail, format_ts(wall))
        if isinstance(message, EventMessage):
            kind, customer_id, data = message.type, message.customer_id, message.data
        else:
            kind, customer_id, data = "telemetry", None, {"values": message.values}
        declared: Cleaned | str = "wrong_type"
        if customer_id is None or len(customer_id) <= MAX_ID_LENGTH:
            declared = self.registry.admit_data(kind, data)  # undeclared fields dropped, counted
        if isinstance(declared, str):
            return Rejected(source, declared, frame.payload, f"type={kind}", format_ts(wall))
        return Event(
            event_id=serial_event_id(key.device_id, key.boot_id, key.seq, self._id_key),
            type=kind,
            ts=format_ts(self.clock.judge(from_epoch_ms(message.ts_ms), wall)),
            store_id=self.store_id,
            device_id=key.device_id,
            customer_id=customer_id,
            source=source,
            data=declared.data,
            received_at=format_ts(wall),
            customer=self.registry.is_customer_type(kind),
        )

    def _answer(self, key: DeliveryKey, acked: bool) -> Frame:
        if acked:
            return self._frame(MessageType.ACK, Ack(key.boot_id, key.seq).encode())
        nack = Nack(key.boot_id, key.seq, NackReason.QUARANTINED, "quarantined")
        return self._frame(MessageType.NACK, nack.encode())

    def settled(self, key: DeliveryKey, item: Event | Rejected) -> Frame:
        """The item is committed (or quarantined): the ACK (or NACK) frame to send."""
        self._inflight.discard(key)
        acked = isinstance(item, Event)
        self._outcomes[key] = acked
        self._outcomes.move_to_end(key)
        while len(self._outcomes) > self.timing.dedup_capacity:
            self._outcomes.popitem(last=False)
        return self._answer(key, acked)

    def _on_result(self, frame: Frame, out: LinkOutput) -> None:
        try:
            result = Result.decode(frame.payload)
        except DecodeError as exc:
            self.drops["bad_result"] += 1
            logger.warning("serial.result.invalid detail=%s", exc.detail)
            return
        if result.boot_id != self.agent_boot_id:
            return  # an answer to an earlier agent process
        pending = self._commands.pop(result.seq, None)
        if pending is None:
            return  # a repeated RESULT for a command already settled
        outcome = CommandOutcome(result.status.name.lower(), result.detail, pending.attempts)
        out.settled.append(CommandSettled(result.seq, outcome))

    # -- commands and timers ----------------------------------------------------------
    def command(self, device_id: str, command: Command, now: float, ttl_s: float) -> int:
        """Register a COMMAND; ``poll`` sends it (at once if the device is here)."""
        self._seq = self._seq % codec.U32_MAX + 1
        self._commands[self._seq] = _PendingCommand(device_id, command.encode(), now + ttl_s, now)
        return self._seq

    def poll(self, now: float) -> LinkOutput:
        out = LinkOutput()
        for seq, pending in list(self._commands.items()):
            if now >= pending.expires_at:
                del self._commands[seq]
                outcome = CommandOutcome("expired", "no RESULT before expiry", pending.attempts)
                out.settled.append(CommandSettled(seq, outcome))
                continue
            here = self.device is not None and self.device.device_id == pending.device_id
            if here and now >= pending.next_try:
                flags = codec.FLAG_RETRANSMIT if pending.attempts else 0
                out.send.append(
                    Frame(
                        MessageType.COMMAND,
                        self.agent_boot_id,
                        seq,
                        pending.payload,
                        flags,
                        self.version,
                    )
                )
                pending.attempts += 1
                pending.next_try = now + self.timing.command_retry_s
        if self.device is None and self.refusal is None:
            if now - self._last_hello_request >= self.timing.hello_retry_s:
                self._last_hello_request = now
                out.send.append(self._hello(codec.FLAG_HELLO_REQUEST))
        elif (
            self.device is not None
            and now - self._last_heard >= self.timing.ping_interval_s
            and now - self._last_ping >= self.timing.ping_interval_s
        ):
            self._last_ping = now
            out.send.append(self._frame(MessageType.PING))
        return out

    @property
    def pending_commands(self) -> int:
        return len(self._commands)
