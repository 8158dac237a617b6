"""Framing for the serial firmware protocol: header, CRC-32, COBS, 0x00 delimiter.

Pure: bytes in, frames out. No I/O, no asyncio, no clock. See PROTOCOL.md for the layout.

A frame on the wire is ``COBS(header + payload + crc32_le) + b"\\x00"``. The decoder is
incremental (``feed`` any chunking of the stream), never raises on input, counts every
dropped chunk by reason and resynchronises at the next 0x00.
"""

from __future__ import annotations

import struct
import zlib
from collections import Counter
from dataclasses import dataclass
from enum import IntEnum
from typing import Final

from cobs import cobs

DELIMITER: Final = b"\x00"
PROTOCOL_MIN: Final = 1  # the oldest protocol version this codec speaks
PROTOCOL_MAX: Final = 1  # the newest
HEADER: Final = struct.Struct("<BBBII")  # version, type, flags, boot_id, seq
HEADER_LEN: Final = HEADER.size  # 11
_CRC: Final = struct.Struct("<I")
CRC_LEN: Final = 4
MAX_FRAME: Final = 512  # decoded bytes: header + payload + crc
MAX_PAYLOAD: Final = MAX_FRAME - HEADER_LEN - CRC_LEN  # 497
# COBS adds one byte per 254 and one up front; the delimiter is not counted here.
MAX_ENCODED: Final = MAX_FRAME + MAX_FRAME // 254 + 1
U32_MAX: Final = 0xFFFFFFFF

FLAG_RETRANSMIT: Final = 0x01  # the sender sent this frame before (informational)
FLAG_HELLO_REQUEST: Final = 0x02  # agent -> device: "introduce yourself" (answer with HELLO)


class MessageType(IntEnum):
    HELLO = 0x01
    EVENT = 0x02
    TELEMETRY = 0x03
    ACK = 0x04
    NACK = 0x05
    COMMAND = 0x06
    RESULT = 0x07
    PING = 0x08
    PONG = 0x09


_TYPES: Final = {int(t): t for t in MessageType}


@dataclass(frozen=True, slots=True)
class Frame:
    """One decoded frame. ``payload`` is opaque here; messages.py gives it meaning."""

    type: MessageType
    boot_id: int
    seq: int
    payload: bytes = b""
    flags: int = 0
    version: int = PROTOCOL_MAX


def crc32(data: bytes) -> int:
    """CRC-32/ISO-HDLC (zlib, Ethernet): the same as crc32_ieee() in Zephyr."""
    return zlib.crc32(data) & U32_MAX


def frame_body(frame: Frame) -> bytes:
    """The decoded bytes of a frame (header + payload + CRC), before COBS."""
    if len(frame.payload) > MAX_PAYLOAD:
        raise ValueError(f"payload of {len(frame.payload)} bytes exceeds {MAX_PAYLOAD}")
    if not (0 <= frame.boot_id <= U32_MAX and 0 <= frame.seq <= U32_MAX):
        raise ValueError(f"boot_id/seq out of range: {frame.boot_id}/{frame.seq}")
    head = HEADER.pack(frame.version, frame.type, frame.flags, frame.boot_id, frame.seq)
    body = head + frame.payload
    return body + _CRC.pack(crc32(body))


def encode(frame: Frame) -> bytes:
    """Wire bytes of one frame, delimiter included. Raises ValueError for an invalid frame."""
    return bytes(cobs.encode(frame_body(frame))) + DELIMITER


class FrameDecoder:
    """Incremental decoder: ``feed(chunk) -> frames``; never raises on any input.

    ``drops`` counts chunks lost before they became frames, by reason. A HELLO in a protocol
    version outside ``versions`` is still returned (its layout is frozen across versions, so
    the link can negotiate); any other frame in such a version is dropped as ``bad_version``
    and the version is remembered in ``last_bad_version`` for status.
    """

    def __init__(self, versions: range = range(PROTOCOL_MIN, PROTOCOL_MAX + 1)) -> None:
        self.versions = versions
        self.drops: Counter[str] = Counter()
        self.frames = 0
        self.last_bad_version: int | None = None
        self._pending = bytearray()
        self._skipping = False  # inside an oversized chunk: discard until the next 0x00

    def feed(self, data: bytes) -> list[Frame]:
        frames: list[Frame] = []
        start = 0
        end = len(data)
        while start < end:
            zero = data.find(0, start)
            if zero < 0:
                self._accumulate(data, start, end)
                break
            if self._pending or self._skipping:
                self._accumulate(data, start, zero)
                chunk = b"" if self._skipping else bytes(self._pending)
                self._pending.clear()
                self._skipping = False
            elif zero - start > MAX_ENCODED:
                self.drops["too_large"] += 1
                chunk = b""
            else:
                chunk = data[start:zero]  # the common case: a whole frame inside this read
            if chunk:
                frame = self._decode_chunk_guarded(chunk)
                if frame is not None:
                    frames.append(frame)
            start = zero + 1
        self.frames += len(frames)
        return frames

    def _accumulate(self, data: bytes, start: int, stop: int) -> None:
        if self._skipping or start == stop:
            return
        if len(self._pending) + (stop - start) > MAX_ENCODED:
            self.drops["too_large"] += 1
            self._pending.clear()
            self._skipping = True
            return
        self._pending += data[start:stop]

    def _decode_chunk_guarded(self, chunk: bytes) -> Frame | None:
        try:
            return self._decode_chunk(chunk)
        except Exception:  # "never raises on input": an unknown bug costs one chunk
            self.drops["internal_error"] += 1
            return None

    def _decode_chunk(self, chunk: bytes) -> Frame | None:
        try:
            body = cobs.decode(chunk)
        except cobs.DecodeError:
            self.drops["bad_cobs"] += 1
            return None
        if len(body) < HEADER_LEN + CRC_LEN:
            self.drops["too_short"] += 1
            return None
        (expected,) = _CRC.unpack_from(body, len(body) - CRC_LEN)
        if zlib.crc32(memoryview(body)[:-CRC_LEN]) != expected:
            self.drops["bad_crc"] += 1
            return None
        version, kind, flags, boot_id, seq = HEADER.unpack_from(body)
        message_type = _TYPES.get(kind)
        if message_type is None:
            self.drops["bad_type"] += 1
            return None
        if version not in self.versions and kind != MessageType.HELLO:
            self.drops["bad_version"] += 1
            self.last_bad_version = version
            return None
        return Frame(message_type, boot_id, seq, body[HEADER_LEN:-CRC_LEN], flags, version)
