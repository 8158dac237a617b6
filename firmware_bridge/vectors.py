"""Test vectors shared by the Python and C codecs, generated from the Python codec.

``python -m firmware_bridge.vectors`` rewrites ``vectors.json`` next to this module; the
tests check that the file matches what this module builds, then run the C codec on it.
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path
from typing import Any

from cobs import cobs

from firmware_bridge import codec
from firmware_bridge.codec import Frame, FrameDecoder, MessageType
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
)

VECTORS_PATH = Path(__file__).with_name("vectors.json")
_BOOT = 0x1A2B3C4D


def _frames() -> list[tuple[str, Frame]]:
    rng = random.Random(7)
    nonzero = bytes(rng.randrange(1, 256) for _ in range(codec.MAX_PAYLOAD))
    event = EventMessage("product.pickup", "c-000123", 1795852800123, {"sku": "SKU-004512"})
    show = ShowSuggestion("sg-42", "c-000123", (("SKU-000001", 0.91), ("SKU-000777", 0.5)), 20)
    hello = Hello("shelf-07", "fw-2.3.1", 1, 1, Capability.DISPLAY | Capability.LED)
    frames = [
        ("ping_empty", Frame(MessageType.PING, _BOOT, 1)),
        ("hello", Frame(MessageType.HELLO, _BOOT, 2, hello.encode())),
        ("event", Frame(MessageType.EVENT, _BOOT, 3, event.encode())),
        ("event_retransmit", Frame(MessageType.EVENT, _BOOT, 3, event.encode(), 1)),
        (
            "telemetry",
            Frame(MessageType.TELEMETRY, _BOOT, 4, TelemetryMessage(0, {"temp_c": 4.5}).encode()),
        ),
        ("ack", Frame(MessageType.ACK, 0xFFFFFFFF, 9, Ack(_BOOT, 3).encode())),
        ("command_show", Frame(MessageType.COMMAND, 0x01020304, 10, show.encode())),
        (
            "result",
            Frame(MessageType.RESULT, _BOOT, 5, Result(0x01020304, 10, ResultStatus.OK).encode()),
        ),
        ("zeros", Frame(MessageType.EVENT, 0, 0, bytes(40))),
        ("max_payload", Frame(MessageType.EVENT, _BOOT, 6, nonzero, 1)),
    ]
    # COBS block edges: non-zero runs around 254 bytes (the seq's high bytes are the last zero).
    for size in (252, 253, 254, 255, 256, 496):
        frames.append((f"run_{size}", Frame(MessageType.EVENT, _BOOT, 7, nonzero[:size], 1)))
    return frames


def _frame_json(name: str, frame: Frame) -> dict[str, Any]:
    return {
        "name": name,
        "version": frame.version,
        "type": int(frame.type),
        "flags": frame.flags,
        "boot_id": frame.boot_id,
        "seq": frame.seq,
        "payload_hex": frame.payload.hex(),
        "wire_hex": codec.encode(frame).hex(),
    }


def _streams(frames: list[tuple[str, Frame]]) -> list[dict[str, Any]]:
    wire = {name: codec.encode(frame) for name, frame in frames}
    bad_crc = bytearray(codec.frame_body(frames[2][1]))
    bad_crc[5] ^= 0x40

    cases = {
        "noise_then_frame": b"\x13\x37\xff\x00" + wire["hello"],
        "bad_crc_then_frame": bytes(cobs.encode(bytes(bad_crc))) + b"\x00" + wire["event"],
        "too_short": bytes(cobs.encode(b"\x01\x02\x03")) + b"\x00" + wire["ack"],
        "bad_cobs": b"\x05ab\x00" + wire["ping_empty"],
        "too_large": b"\x01" * (codec.MAX_ENCODED + 50) + b"\x00" + wire["result"],
        "truncated_merges": wire["event"][:20] + wire["telemetry"] + wire["ping_empty"],
        "idle_delimiters": b"\x00\x00" + wire["ack"] + b"\x00\x00" + wire["ack"],
    }
    streams = []
    for name, data in cases.items():
        decoder = FrameDecoder()
        decoded = decoder.feed(data)
        streams.append(
            {
                "name": name,
                "wire_hex": data.hex(),
                "frames": [_frame_json("", frame) for frame in decoded],
                "drops": dict(sorted(decoder.drops.items())),
            }
        )
    return streams


def _payloads() -> list[dict[str, Any]]:
    return [
        {
            "kind": "hello",
            "fields": {"min": 1, "max": 2, "caps": 0x1F, "device_id": "shelf-07", "fw": "2.3"},
            "hex": Hello("shelf-07", "2.3", 1, 2, Capability(0x1F)).encode().hex(),
        },
        {
            "kind": "event",
            "fields": {"type": "product.scan", "customer_id": "c-9", "ts_ms": 1795852800123},
            "json": '{"sku":"SKU-1"}',
            "hex": EventMessage("product.scan", "c-9", 1795852800123, {"sku": "SKU-1"})
            .encode()
            .hex(),
        },
        {
            "kind": "event",
            "fields": {"type": "kiosk.view", "customer_id": "", "ts_ms": 0},
            "json": '{"page":"home"}',
            "hex": EventMessage("kiosk.view", None, 0, {"page": "home"}).encode().hex(),
        },
        {
            "kind": "result",
            "fields": {"boot_id": 7, "seq": 70000, "status": 1, "detail": "no-led"},
            "hex": Result(7, 70000, ResultStatus.UNSUPPORTED, "no-led").encode().hex(),
        },
        {
            "kind": "ack",
            "fields": {"boot_id": _BOOT, "seq": 3},
            "hex": Ack(_BOOT, 3).encode().hex(),
        },
        {
            "kind": "nack",
            "fields": {"boot_id": _BOOT, "seq": 4, "reason": 1, "text": "quarantined"},
            "hex": Nack(_BOOT, 4, NackReason.QUARANTINED, "quarantined").encode().hex(),
        },
        {
            "kind": "command",
            "text": "SHOW 20 sg-42 c-000123 2 SKU-000001 910 SKU-000777 500",
            "hex": ShowSuggestion(
                "sg-42", "c-000123", (("SKU-000001", 0.91), ("SKU-000777", 0.5)), 20
            )
            .encode()
            .hex(),
        },
        {
            "kind": "command",
            "text": "LED 2 255 128 0 2 1500",
            "hex": SetLed(2, (255, 128, 0), 2, 1500).encode().hex(),
        },
        {
            "kind": "command",
            "text": "PARAM telemetry_interval_s 30",
            "hex": SetParam("telemetry_interval_s", "30").encode().hex(),
        },
        {"kind": "command", "text": "ERR 1", "hex": "09"},  # unknown kind: unsupported
        {"kind": "command", "text": "ERR 2", "hex": "0302"},  # truncated: bad args
    ]


def build_vectors() -> dict[str, Any]:
    frames = _frames()
    return {
        "comment": "Generated by python -m firmware_bridge.vectors; do not edit by hand.",
        "protocol_version": codec.PROTOCOL_MAX,
        "crc": "CRC-32/ISO-HDLC (zlib.crc32), little-endian after the payload",
        "max_frame": codec.MAX_FRAME,
        "frames": [_frame_json(name, frame) for name, frame in frames],
        "streams": _streams(frames),
        "payloads": _payloads(),
    }


def render() -> str:
    return json.dumps(build_vectors(), indent=1) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    path = Path(args[0]) if args else VECTORS_PATH
    path.write_text(render(), encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
