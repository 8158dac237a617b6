"""Fuzz targets: one function per reader, bytes in, an AssertionError (or any other
exception) out when the reader broke its promise.

The promise of every reader: any input becomes either events whose envelope the rest of
the pipe can hold (strict JSON, UTF-8, 64-bit integers, a representable ts) or a rejection
with a reason; nothing else escapes. ``run.py`` drives these under atheris (coverage-guided);
``test_fuzz.py`` replays the committed corpus through them without atheris, and runs each
under atheris for a bounded time.

Input layouts, so that a hand-written corpus file reads as what it tests:
- ``mqtt``: ``E`` + payload (events topic), ``T`` + payload (telemetry topic), or
  ``/`` + topic + ``\\n`` + payload (any topic, through parse_topic).
- ``serial``: ``F`` + type byte + payload: one valid frame (right COBS and CRC) of that
  type after a HELLO, so noise that forms valid frames reaches the link; anything else is
  raw noise fed to the frame decoder in two chunks split at the first byte's value.
- ``config``: TOML text; a line ``#ENV NAME=VALUE`` also sets an environment override.
- ``onnx``: the bytes of a ``model.onnx`` (``make_onnx_corpus.py`` writes the seeds): read,
  checked as a graph, and run on zero-filled feeds of the declared types and shapes. The
  promise: a ``ModelFormatError`` (or ``ModelRunError`` from a run) with a reason, nothing else.
"""

from __future__ import annotations

import json
import math
from datetime import UTC, datetime
from typing import Any, Final

import numpy as np

from cloud_sync.envelope_schema import MAX_ID_LENGTH, default_registry
from edge_agent.config import InputSection, config_from_toml
from edge_agent.decode import (
    EVENTS_CHANNEL,
    TELEMETRY_CHANNEL,
    TopicParts,
    decode_message,
    make_context,
    parse_topic,
)
from edge_agent.errors import ConfigError
from edge_agent.events import Event, Rejected, parse_ts
from firmware_bridge import codec
from firmware_bridge.codec import Frame, FrameDecoder, MessageType
from firmware_bridge.link import DeviceLink
from firmware_bridge.messages import Hello
from models.errors import ModelFormatError, ModelRunError
from models.numpy_runtime import NumpySession
from models.onnx_reader import read_model

NOW: Final = datetime(2026, 11, 22, 8, 0, tzinfo=UTC)
STORE: Final = "store-001"
_CONTEXT: Final = make_context(STORE, default_registry(), InputSection(), b"fuzz-id-key")
_INT64: Final = 2**63
_MAX_FEED_ELEMENTS: Final = 4096  # a declared input larger than this is not fed


def check_mqtt(data: bytes) -> None:
    if data[:1] == b"/":
        raw_topic, _, payload = data[1:].partition(b"\n")
        topic_text = raw_topic.decode("utf-8", "replace")  # MQTT topics are UTF-8
        topic = parse_topic(topic_text, "edge", STORE)
        if topic is None:
            return
        source = f"mqtt:{topic_text}"
    else:
        channel = TELEMETRY_CHANNEL if data[:1] == b"T" else EVENTS_CHANNEL
        topic, payload = TopicParts("shelf-07", channel), data[1:]
        source = f"mqtt:edge/{STORE}/devices/shelf-07/{channel}"
    items = decode_message(_CONTEXT, topic, source, payload, NOW)
    assert items, "decoding returned nothing"
    for item in items:
        _check_item(item)


def check_serial(data: bytes) -> None:
    link = DeviceLink(STORE, default_registry(), agent_boot_id=0xA6E7)
    decoder = FrameDecoder()
    if data[:1] == b"F" and len(data) >= 2:
        kind = MessageType(1 + data[1] % len(MessageType))
        hello = Frame(MessageType.HELLO, 7, 1, Hello("shelf-07", "fw", 1, 1).encode())
        frame = Frame(kind, 7, 2, data[2 : 2 + codec.MAX_PAYLOAD])
        chunks = [codec.encode(hello) + codec.encode(frame)]
    else:
        split = data[0] if data else 0
        chunks = [data[:split], data[split:]]
    frames = [frame for chunk in chunks for frame in decoder.feed(chunk)]
    for index, frame in enumerate(frames):
        out = link.receive(frame, float(index), NOW)
        for delivery in out.deliveries:
            _check_item(delivery.item)
            answer = link.settled(delivery.key, delivery.item)
            assert answer.type in (MessageType.ACK, MessageType.NACK)
            codec.encode(answer)  # every answer fits a frame
        for sent in out.send:
            codec.encode(sent)
    for sent in link.poll(1000.0).send:
        codec.encode(sent)


def check_config(data: bytes) -> None:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return  # load_config refuses it before TOML (tested in test_config.py)
    environ = {}
    for line in text.splitlines():
        if line.startswith("#ENV ") and "=" in line:
            name, _, value = line[5:].partition("=")
            environ[name] = value
    try:
        config = config_from_toml(text, environ)
    except ConfigError as exc:
        problem: ConfigError | None = exc
    else:
        problem = None
        assert config.agent.store_id
    assert problem is None or problem.key, "a ConfigError must name the key"


def check_onnx(data: bytes) -> None:
    try:
        session = NumpySession(read_model(data))
    except ModelFormatError as exc:
        refusal = str(exc)
        assert refusal, "a refusal needs a reason"
        return
    feeds = {}
    for info in session.inputs():
        if info.shape is None or not all(isinstance(size, int) for size in info.shape):
            return  # no fixed shape to feed
        shape = tuple(size for size in info.shape if isinstance(size, int))
        if math.prod(shape) > _MAX_FEED_ELEMENTS:
            return
        feeds[info.name] = np.zeros(shape, info.dtype)
    try:
        outputs = session.run(None, feeds)
    except ModelRunError as exc:
        failure = str(exc)
        assert failure, "a failed run needs a reason"
        return
    assert len(outputs) == len(session.output_names())
    assert all(isinstance(output, np.ndarray) for output in outputs)


def _check_item(item: Event | Rejected) -> None:
    if isinstance(item, Rejected):
        assert item.reason, "a rejection needs a reason"
        assert item.reason != "internal_error", f"the guard caught a bug: {item.detail}"
        return
    envelope = item.envelope()
    text = json.dumps(envelope, allow_nan=False, ensure_ascii=False)
    text.encode("utf-8")  # raises on a lone surrogate anywhere
    # Not a search for "\\u0000" in the text: a literal backslash before "u0000" is fine.
    assert not _holds_nul(envelope), "U+0000: the central store's PostgreSQL cannot hold it"
    assert json.loads(text) == envelope
    _check_numbers(envelope["data"])
    assert parse_ts(item.ts) is not None
    assert parse_ts(item.received_at) is not None
    assert 0 < len(item.event_id) <= MAX_ID_LENGTH
    assert default_registry().check_data(item.type, item.data) is None


def _holds_nul(node: Any) -> bool:
    stack = [node]
    while stack:
        value = stack.pop()
        if isinstance(value, dict):
            stack.extend(value.keys())
            stack.extend(value.values())
        elif isinstance(value, list):
            stack.extend(value)
        elif isinstance(value, str) and "\x00" in value:
            return True
    return False


def _check_numbers(node: Any) -> None:
    stack = [node]
    while stack:
        value = stack.pop()
        if isinstance(value, dict):
            stack.extend(value.values())
        elif isinstance(value, list):
            stack.extend(value)
        elif isinstance(value, float):
            assert math.isfinite(value)
        elif isinstance(value, int) and not isinstance(value, bool):
            assert -_INT64 <= value < _INT64


TARGETS: Final = {
    "mqtt": check_mqtt,
    "serial": check_serial,
    "config": check_config,
    "onnx": check_onnx,
}
