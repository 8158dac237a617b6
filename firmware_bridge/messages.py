"""Payload layouts of each message type (PROTOCOL.md, "Payloads"). Pure, like the codec.

Protocol messages (HELLO, ACK, NACK, COMMAND, RESULT, PING/PONG) use fixed little-endian
fields and ``str8`` strings (a length byte, then UTF-8), so firmware parses them without a
JSON parser. EVENT and TELEMETRY carry their ``data`` as a compact JSON object after a small
binary prefix: firmware writes it with ``snprintf`` into its frame buffer.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from enum import IntEnum, IntFlag
from typing import Any, Final

from edge_agent.errors import DecodeError
from edge_agent.safe_json import BadNumberError, load_json, may_hold_unholdable, unholdable_string

_U8: Final = struct.Struct("<B")
_U16: Final = struct.Struct("<H")
_U32: Final = struct.Struct("<I")
_U64: Final = struct.Struct("<Q")


class Capability(IntFlag):
    NONE = 0
    DISPLAY = 0x01  # can SHOW_SUGGESTION
    LED = 0x02  # can SET_LED
    PARAMS = 0x04  # can SET_PARAM
    TELEMETRY = 0x08  # sends TELEMETRY
    PERSISTENT_QUEUE = 0x10  # keeps unacknowledged events across a reboot


class CommandKind(IntEnum):
    SHOW_SUGGESTION = 1
    SET_LED = 2
    SET_PARAM = 3


class ResultStatus(IntEnum):
    OK = 0
    UNSUPPORTED = 1
    BAD_ARGS = 2
    FAILED = 3
    BUSY = 4


class NackReason(IntEnum):
    QUARANTINED = 1  # payload undecodable or invalid; kept by the agent, stop resending
    VERSION_UNSUPPORTED = 2  # no protocol version in common


class _Writer:
    def __init__(self) -> None:
        self.out = bytearray()

    def u8(self, value: int) -> _Writer:
        self.out += _U8.pack(value)
        return self

    def u16(self, value: int) -> _Writer:
        self.out += _U16.pack(value)
        return self

    def u32(self, value: int) -> _Writer:
        self.out += _U32.pack(value)
        return self

    def u64(self, value: int) -> _Writer:
        self.out += _U64.pack(value)
        return self

    def str8(self, text: str) -> _Writer:
        raw = text.encode("utf-8")
        if len(raw) > 255:
            raise ValueError(f"string of {len(raw)} bytes does not fit a str8: {text[:32]!r}")
        self.out += _U8.pack(len(raw)) + raw
        return self


class _Reader:
    """Reads fields; any shortfall, bad UTF-8 or NUL in a string is a
    DecodeError('bad_payload')."""

    def __init__(self, payload: bytes) -> None:
        self.data = payload
        self.pos = 0

    def _take(self, size: int) -> bytes:
        if self.pos + size > len(self.data):
            raise DecodeError("bad_payload", f"truncated at byte {self.pos}")
        chunk = self.data[self.pos : self.pos + size]
        self.pos += size
        return chunk

    def u8(self) -> int:
        return int(_U8.unpack(self._take(1))[0])

    def u16(self) -> int:
        return int(_U16.unpack(self._take(2))[0])

    def u32(self) -> int:
        return int(_U32.unpack(self._take(4))[0])

    def u64(self) -> int:
        return int(_U64.unpack(self._take(8))[0])

    def str8(self) -> str:
        raw = self._take(self.u8())
        if b"\x00" in raw:  # valid UTF-8, but no id or type holds it (nor PostgreSQL text)
            raise DecodeError("bad_payload", f"NUL in a string before byte {self.pos}")
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise DecodeError("bad_payload", f"string not UTF-8 at byte {self.pos}") from exc

    def rest(self) -> bytes:
        chunk = self.data[self.pos :]
        self.pos = len(self.data)
        return chunk

    def end(self) -> None:
        if self.pos != len(self.data):
            raise DecodeError("bad_payload", f"{len(self.data) - self.pos} trailing bytes")


def _json_object(raw: bytes) -> dict[str, Any]:
    if not raw:
        return {}
    try:
        value = load_json(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise DecodeError("not_utf8", str(exc)) from exc
    except BadNumberError as exc:  # NaN, 1e400, beyond 64 bits: they would poison the envelope
        raise DecodeError("bad_number", str(exc)) from exc
    except RecursionError as exc:
        raise DecodeError("too_deep", "nesting exceeds the JSON parser's limit") from exc
    except ValueError as exc:
        raise DecodeError("not_json", str(exc)) from exc
    if not isinstance(value, dict):
        raise DecodeError("not_object", f"data is a {type(value).__name__}")
    if may_hold_unholdable(raw):
        where = unholdable_string(value)
        if where is not None:
            raise DecodeError("bad_unicode", f"lone surrogate or NUL in {where}")
    return value


def _json_bytes(data: dict[str, Any]) -> bytes:
    return json.dumps(data, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


@dataclass(frozen=True, slots=True)
class Hello:
    device_id: str
    firmware: str
    proto_min: int
    proto_max: int
    capabilities: Capability = Capability.NONE

    def encode(self) -> bytes:
        w = _Writer().u8(self.proto_min).u8(self.proto_max).u16(self.capabilities)
        return bytes(w.str8(self.device_id).str8(self.firmware).out)

    @classmethod
    def decode(cls, payload: bytes) -> Hello:
        # Newer firmware may append fields to HELLO; only this prefix is frozen.
        r = _Reader(payload)
        proto_min, proto_max, caps = r.u8(), r.u8(), r.u16()
        device_id, firmware = r.str8(), r.str8()
        if not device_id:
            raise DecodeError("bad_payload", "empty device_id")
        return cls(device_id, firmware, proto_min, proto_max, Capability(caps))


@dataclass(frozen=True, slots=True)
class EventMessage:
    type: str
    customer_id: str | None
    ts_ms: int  # device time in ms since the Unix epoch; 0 when the device has no clock
    data: dict[str, Any] = field(default_factory=dict)

    def encode(self) -> bytes:
        w = _Writer().str8(self.type).str8(self.customer_id or "").u64(self.ts_ms)
        return bytes(w.out) + _json_bytes(self.data)

    @classmethod
    def decode(cls, payload: bytes) -> EventMessage:
        r = _Reader(payload)
        kind, customer, ts_ms = r.str8(), r.str8(), r.u64()
        return cls(kind, customer or None, ts_ms, _json_object(r.rest()))


@dataclass(frozen=True, slots=True)
class TelemetryMessage:
    ts_ms: int
    values: dict[str, Any] = field(default_factory=dict)

    def encode(self) -> bytes:
        return bytes(_Writer().u64(self.ts_ms).out) + _json_bytes(self.values)

    @classmethod
    def decode(cls, payload: bytes) -> TelemetryMessage:
        r = _Reader(payload)
        ts_ms = r.u64()
        return cls(ts_ms, _json_object(r.rest()))


@dataclass(frozen=True, slots=True)
class Ack:
    """Acknowledges (boot_id, seq) of a device frame once it is committed."""

    boot_id: int
    seq: int

    def encode(self) -> bytes:
        return bytes(_Writer().u32(self.boot_id).u32(self.seq).out)

    @classmethod
    def decode(cls, payload: bytes) -> Ack:
        r = _Reader(payload)
        ack = cls(r.u32(), r.u32())
        r.end()
        return ack


@dataclass(frozen=True, slots=True)
class Nack:
    boot_id: int
    seq: int
    reason: NackReason
    text: str = ""

    def encode(self) -> bytes:
        w = _Writer().u32(self.boot_id).u32(self.seq).u8(self.reason)
        return bytes(w.str8(self.text[:255]).out)

    @classmethod
    def decode(cls, payload: bytes) -> Nack:
        r = _Reader(payload)
        boot_id, seq, code, text = r.u32(), r.u32(), r.u8(), r.str8()
        r.end()
        try:
            reason = NackReason(code)
        except ValueError as exc:
            raise DecodeError("bad_payload", f"unknown nack reason {code}") from exc
        return cls(boot_id, seq, reason, text)


@dataclass(frozen=True, slots=True)
class ShowSuggestion:
    suggestion_id: str
    customer_id: str
    items: tuple[tuple[str, float], ...]  # (sku, score in [0, 1])
    display_s: int = 30

    def encode(self) -> bytes:
        w = _Writer().u8(CommandKind.SHOW_SUGGESTION).u16(self.display_s)
        w.str8(self.suggestion_id).str8(self.customer_id).u8(len(self.items))
        for sku, score in self.items:
            w.str8(sku).u16(round(min(max(score, 0.0), 1.0) * 1000))
        return bytes(w.out)


@dataclass(frozen=True, slots=True)
class SetLed:
    led: int
    rgb: tuple[int, int, int]
    mode: int = 1  # 0 off, 1 on, 2 blink
    duration_ms: int = 0  # 0: until changed

    def encode(self) -> bytes:
        w = _Writer().u8(CommandKind.SET_LED).u8(self.led)
        w.u8(self.rgb[0]).u8(self.rgb[1]).u8(self.rgb[2]).u8(self.mode).u16(self.duration_ms)
        return bytes(w.out)


@dataclass(frozen=True, slots=True)
class SetParam:
    name: str
    value: str  # text; the firmware parses numbers with strtol/strtof

    def encode(self) -> bytes:
        return bytes(_Writer().u8(CommandKind.SET_PARAM).str8(self.name).str8(self.value).out)


Command = ShowSuggestion | SetLed | SetParam


def decode_command(payload: bytes) -> Command:
    """The device side of COMMAND (the simulator and the tests use it)."""
    r = _Reader(payload)
    kind = r.u8()
    command: Command
    if kind == CommandKind.SHOW_SUGGESTION:
        display_s, suggestion_id, customer_id = r.u16(), r.str8(), r.str8()
        items = tuple((r.str8(), r.u16() / 1000) for _ in range(r.u8()))
        command = ShowSuggestion(suggestion_id, customer_id, items, display_s)
    elif kind == CommandKind.SET_LED:
        led, red, green, blue, mode, duration = r.u8(), r.u8(), r.u8(), r.u8(), r.u8(), r.u16()
        command = SetLed(led, (red, green, blue), mode, duration)
    elif kind == CommandKind.SET_PARAM:
        command = SetParam(r.str8(), r.str8())
    else:
        raise DecodeError("bad_payload", f"unknown command kind {kind}")
    r.end()
    return command


@dataclass(frozen=True, slots=True)
class Result:
    """The device's answer to the COMMAND sent as (boot_id, seq) by the agent."""

    boot_id: int
    seq: int
    status: ResultStatus
    detail: str = ""

    def encode(self) -> bytes:
        w = _Writer().u32(self.boot_id).u32(self.seq).u8(self.status)
        return bytes(w.str8(self.detail[:255]).out)

    @classmethod
    def decode(cls, payload: bytes) -> Result:
        r = _Reader(payload)
        boot_id, seq, code, detail = r.u32(), r.u32(), r.u8(), r.str8()
        try:
            status = ResultStatus(code)
        except ValueError as exc:
            raise DecodeError("bad_payload", f"unknown result status {code}") from exc
        return cls(boot_id, seq, status, detail)
