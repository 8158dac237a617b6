"""The simulated device's protocol logic, sans-IO (the pty and the CLI live in sim.py).

It behaves as PROTOCOL.md asks of firmware: HELLO until the agent answers, every EVENT
kept and resent until ACKed (or NACKed), COMMANDs answered with a RESULT (a repeated
command is answered from a small cache, not executed twice), PING answered with PONG.
"""

from __future__ import annotations

import logging
import random
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from edge_agent.errors import DecodeError
from firmware_bridge import codec
from firmware_bridge.codec import Frame, MessageType
from firmware_bridge.messages import (
    Ack,
    Capability,
    EventMessage,
    Hello,
    Nack,
    NackReason,
    Result,
    ResultStatus,
    SetLed,
    SetParam,
    ShowSuggestion,
    TelemetryMessage,
    decode_command,
)

logger = logging.getLogger(__name__)

CAPABILITIES = (
    Capability.DISPLAY
    | Capability.LED
    | Capability.PARAMS
    | Capability.TELEMETRY
    | Capability.PERSISTENT_QUEUE
)


@dataclass
class _Unacked:
    frame: Frame
    next_send: float
    customer: bool


@dataclass
class DeviceCounters:
    events_sent: int = 0  # distinct customer events created
    telemetry_sent: int = 0
    acked: int = 0
    nacked: int = 0
    retransmissions: int = 0
    commands: int = 0  # commands executed (repeats answered from the cache not counted)
    reboots: int = 0
    shown: list[str] = field(default_factory=list)  # suggestion ids shown on the display


class SimulatedDevice:
    def __init__(
        self,
        device_id: str,
        rng: random.Random,
        *,
        proto_min: int = codec.PROTOCOL_MIN,
        proto_max: int = codec.PROTOCOL_MAX,
        retransmit_s: float = 0.5,
        firmware: str = "sim-1.0",
    ) -> None:
        self.device_id = device_id
        self.rng = rng
        self.proto_min, self.proto_max = proto_min, proto_max
        self.retransmit_s = retransmit_s
        self.firmware = firmware
        self.boot_id = rng.getrandbits(32)
        self.boot_ids = [self.boot_id]
        self.version: int | None = None  # negotiated: the agent's HELLO says which
        self.refused: str | None = None
        self.counters = DeviceCounters()
        self.params: dict[str, str] = {}
        self._seq = 0
        self._unacked: OrderedDict[tuple[int, int], _Unacked] = OrderedDict()
        self._results: OrderedDict[tuple[int, int], Result] = OrderedDict()
        self._hello_due = 0.0

    @property
    def ready(self) -> bool:
        return self.version is not None

    @property
    def in_flight(self) -> int:
        return len(self._unacked)

    def customer_in_flight(self) -> int:
        return sum(1 for item in self._unacked.values() if item.customer)

    def _frame(self, kind: MessageType, payload: bytes, flags: int = 0) -> Frame:
        self._seq += 1
        version = self.version if self.version is not None else self.proto_max
        return Frame(kind, self.boot_id, self._seq, payload, flags, version)

    def hello(self) -> Frame:
        hello = Hello(self.device_id, self.firmware, self.proto_min, self.proto_max, CAPABILITIES)
        return self._frame(MessageType.HELLO, hello.encode())

    def reboot(self) -> None:
        """A new boot id and sequence; the persistent queue keeps what is unacknowledged."""
        self.boot_id = self.rng.getrandbits(32)
        self.boot_ids.append(self.boot_id)
        self._seq = 0
        self.version = None
        self._hello_due = 0.0
        self.counters.reboots += 1

    def _track(self, frame: Frame, now: float, customer: bool) -> Frame:
        self._unacked[(frame.boot_id, frame.seq)] = _Unacked(
            frame, now + self.retransmit_s, customer
        )
        return frame

    def shopper_event(self, now: float) -> Frame:
        customer = f"c-{self.rng.randrange(1, 200):06d}"
        kind = "product.pickup" if self.rng.random() < 0.7 else "product.putback"
        data: dict[str, Any] = {
            "sku": f"SKU-{self.rng.randrange(1, 500):06d}",
            "weight_g": self.rng.randrange(50, 2000),
            "shelf": f"{self.device_id}-{self.rng.randrange(1, 5)}",
        }
        message = EventMessage(kind, customer, int(time.time() * 1000), data)
        self.counters.events_sent += 1
        return self._track(self._frame(MessageType.EVENT, message.encode()), now, customer=True)

    def telemetry(self, now: float) -> Frame:
        values = {"temp_c": round(self.rng.uniform(3.0, 6.0), 2), "door_open": False}
        message = TelemetryMessage(int(time.time() * 1000), values)
        self.counters.telemetry_sent += 1
        return self._track(
            self._frame(MessageType.TELEMETRY, message.encode()), now, customer=False
        )

    def due(self, now: float) -> list[Frame]:
        """HELLO until answered, then retransmissions whose time has come."""
        if not self.ready:
            if now >= self._hello_due and self.refused is None:
                self._hello_due = now + 1.0
                return [self.hello()]
            return []
        frames = []
        for item in self._unacked.values():
            if now >= item.next_send:
                item.next_send = now + self.retransmit_s
                self.counters.retransmissions += 1
                old = item.frame
                # A retransmission keeps its boot id and seq: that is how the agent dedups.
                frames.append(
                    Frame(
                        old.type,
                        old.boot_id,
                        old.seq,
                        old.payload,
                        codec.FLAG_RETRANSMIT,
                        self.version or old.version,
                    )
                )
        return frames

    def receive(self, frame: Frame) -> list[Frame]:
        try:
            return self._receive(frame)
        except DecodeError as exc:
            logger.warning("sim.frame.invalid type=%s reason=%s", frame.type.name, exc)
            return []

    def _receive(self, frame: Frame) -> list[Frame]:
        if frame.type == MessageType.HELLO:
            if frame.flags & codec.FLAG_HELLO_REQUEST:
                self.version = None
                self._hello_due = 0.0
                return []
            if self.proto_min <= frame.version <= self.proto_max:
                self.version = frame.version
                for item in self._unacked.values():
                    item.next_send = 0.0  # resend at once: the link is fresh
        elif frame.type in (MessageType.ACK, MessageType.NACK):
            self._settle(frame)
        elif frame.type == MessageType.COMMAND:
            return [self._execute(frame)]
        elif frame.type == MessageType.PING:
            return [self._frame(MessageType.PONG, frame.payload)]
        return []

    def _settle(self, frame: Frame) -> None:
        if frame.type == MessageType.ACK:
            ack = Ack.decode(frame.payload)
            if self._unacked.pop((ack.boot_id, ack.seq), None) is not None:
                self.counters.acked += 1
            return
        nack = Nack.decode(frame.payload)
        if nack.reason == NackReason.VERSION_UNSUPPORTED:
            self.refused = nack.text
            logger.warning("sim.refused reason=%s", nack.text)
        elif self._unacked.pop((nack.boot_id, nack.seq), None) is not None:
            self.counters.nacked += 1

    def _execute(self, frame: Frame) -> Frame:
        key = (frame.boot_id, frame.seq)
        result = self._results.get(key)
        if result is None:
            status, detail = self._run_command(frame.payload)
            result = Result(frame.boot_id, frame.seq, status, detail)
            self._results[key] = result
            while len(self._results) > 16:
                self._results.popitem(last=False)
        return self._frame(MessageType.RESULT, result.encode())

    def _run_command(self, payload: bytes) -> tuple[ResultStatus, str]:
        try:
            command = decode_command(payload)
        except DecodeError as exc:
            return ResultStatus.BAD_ARGS, exc.detail
        self.counters.commands += 1
        if isinstance(command, ShowSuggestion):
            self.counters.shown.append(command.suggestion_id)
            skus = ", ".join(sku for sku, _ in command.items)
            logger.info("sim.display customer=%s items=%s", command.customer_id, skus)
        elif isinstance(command, SetLed):
            logger.info("sim.led led=%d rgb=%s mode=%d", command.led, command.rgb, command.mode)
        elif isinstance(command, SetParam):
            self.params[command.name] = command.value
        return ResultStatus.OK, ""
