"""The frame codec: round trips, arbitrary input, noise, size limits."""

from __future__ import annotations

import struct

import pytest
from cobs import cobs
from hypothesis import given, settings
from hypothesis import strategies as st

from firmware_bridge import codec
from firmware_bridge.codec import Frame, FrameDecoder, MessageType

frames = st.builds(
    Frame,
    type=st.sampled_from(MessageType),
    boot_id=st.integers(0, codec.U32_MAX),
    seq=st.integers(0, codec.U32_MAX),
    payload=st.binary(max_size=codec.MAX_PAYLOAD),
    flags=st.integers(0, 255),
    version=st.just(codec.PROTOCOL_MAX),
)


@settings(deadline=None)  # a loaded shared CI box must not fail a property
@given(frame=frames)
def test_encode_decode_round_trip(frame: Frame) -> None:
    wire = codec.encode(frame)
    assert wire.count(0) == 1
    assert wire.endswith(b"\x00")
    assert len(wire) <= codec.MAX_ENCODED + 1
    decoder = FrameDecoder()
    assert decoder.feed(wire) == [frame]
    assert not decoder.drops


@settings(deadline=None)  # a loaded shared CI box must not fail a property
@given(batch=st.lists(frames, max_size=5), cuts=st.lists(st.integers(0, 3000), max_size=8))
def test_any_chunking_yields_the_same_frames(batch: list[Frame], cuts: list[int]) -> None:
    stream = b"".join(codec.encode(frame) for frame in batch)
    decoder = FrameDecoder()
    out: list[Frame] = []
    start = 0
    for cut in sorted(cuts):
        out += decoder.feed(stream[start:cut])
        start = max(start, cut)
    out += decoder.feed(stream[start:])
    assert out == batch


def _crc_ok(frame: Frame) -> bool:
    body = codec.frame_body(frame)
    (crc,) = struct.unpack("<I", body[-4:])
    return bool(codec.crc32(body[:-4]) == crc)


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=2000), more=st.binary(max_size=600))
def test_arbitrary_bytes_never_raise_nor_yield_a_bad_frame(data: bytes, more: bytes) -> None:
    decoder = FrameDecoder()
    out = decoder.feed(data) + decoder.feed(more)
    for frame in out:
        assert _crc_ok(frame)
        assert frame.version in decoder.versions or frame.type == MessageType.HELLO
    # Whatever the noise was, a delimiter then a valid frame is always recovered.
    probe = Frame(MessageType.PING, 1, 2, b"probe")
    assert decoder.feed(b"\x00" + codec.encode(probe)) == [probe]


noise = st.binary(min_size=1, max_size=40)


@settings(deadline=None)  # a loaded shared CI box must not fail a property
@given(batch=st.lists(frames, min_size=1, max_size=6), data=st.data())
def test_noise_loses_only_the_frames_it_touches(batch: list[Frame], data: st.DataObject) -> None:
    stream = b""
    touched: set[int] = set()
    for index, frame in enumerate(batch):
        wire = codec.encode(frame)
        where = data.draw(st.sampled_from(["none", "before", "inside"]))
        burst = data.draw(noise)
        if where == "before":
            stream += burst
            # The burst merges with this frame unless it ends with a delimiter itself.
            if not burst.endswith(b"\x00"):
                touched.add(index)
        elif where == "inside":
            at = data.draw(st.integers(0, len(wire) - 1))
            wire = wire[:at] + burst + wire[at:]
            touched.add(index)
        stream += wire
    out = FrameDecoder().feed(stream)
    untouched = [frame for i, frame in enumerate(batch) if i not in touched]
    # Every untouched frame comes out, in order; nothing that was not sent comes out.
    remaining = iter(out)
    assert all(any(frame == got for got in remaining) for frame in untouched)
    assert all(frame in batch for frame in out)


def test_oversized_chunk_is_dropped_then_stream_resyncs() -> None:
    decoder = FrameDecoder()
    ok = Frame(MessageType.EVENT, 5, 6, b"x")
    assert decoder.feed(b"\x01" * (codec.MAX_ENCODED + 1)) == []
    assert decoder.feed(b"\x02" * 100 + b"\x00" + codec.encode(ok)) == [ok]
    assert decoder.drops == {"too_large": 1}


def test_drop_reasons_are_counted() -> None:
    decoder = FrameDecoder()
    good = codec.frame_body(Frame(MessageType.EVENT, 1, 1, b"abc"))
    bad_crc = bytearray(good)
    bad_crc[-1] ^= 1
    bad_type = bytearray(good[:-4])
    bad_type[1] = 0x7F
    bad_type += struct.pack("<I", codec.crc32(bytes(bad_type)))
    newer = bytearray(good[:-4])
    newer[0] = 9
    newer += struct.pack("<I", codec.crc32(bytes(newer)))
    chunks = [bytes(bad_crc), b"\x01\x02", bytes(bad_type), bytes(newer)]
    stream = b"".join(bytes(cobs.encode(chunk)) + b"\x00" for chunk in chunks)
    assert decoder.feed(stream + b"\x07xy\x00") == []
    assert decoder.drops == {
        "bad_crc": 1,
        "too_short": 1,
        "bad_type": 1,
        "bad_version": 1,
        "bad_cobs": 1,
    }
    assert decoder.last_bad_version == 9


def test_hello_of_an_unknown_version_still_reaches_the_link() -> None:
    hello = Frame(MessageType.HELLO, 1, 1, b"\x05\x06\x00\x00\x01d\x01f", version=6)
    assert FrameDecoder().feed(codec.encode(hello)) == [hello]


def test_encode_refuses_an_oversized_payload() -> None:
    frame = Frame(MessageType.EVENT, 1, 1, bytes(codec.MAX_PAYLOAD + 1))
    with pytest.raises(ValueError, match="exceeds"):
        codec.encode(frame)
