"""Payload layouts: round trips, and arbitrary bytes fail only as DecodeError."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edge_agent.errors import DecodeError
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

# No U+0000: the agent refuses it in every string (the central store cannot hold it).
chars = st.characters(exclude_categories=["Cs"], exclude_characters="\x00")
text = st.text(chars, max_size=40).filter(lambda s: len(s.encode()) <= 255)
ids = st.text(chars, min_size=1, max_size=30).filter(lambda s: len(s.encode()) <= 255)
u32 = st.integers(0, 0xFFFFFFFF)
json_values = st.one_of(st.integers(-(10**9), 10**9), st.booleans(), text, st.none())
json_objects = st.dictionaries(text, json_values, max_size=5)


@settings(deadline=None)  # a loaded shared CI box must not fail a property
@given(
    st.builds(
        Hello,
        ids,
        text,
        st.integers(0, 255),
        st.integers(0, 255),
        st.integers(0, 0x1F).map(Capability),
    )
)
def test_hello_round_trip(hello: Hello) -> None:
    assert Hello.decode(hello.encode()) == hello


@settings(deadline=None)  # a loaded shared CI box must not fail a property
@given(
    st.builds(EventMessage, text, st.one_of(st.none(), ids), st.integers(0, 2**63), json_objects)
)
def test_event_round_trip(message: EventMessage) -> None:
    assert EventMessage.decode(message.encode()) == message


@settings(deadline=None)  # a loaded shared CI box must not fail a property
@given(st.builds(TelemetryMessage, st.integers(0, 2**63), json_objects))
def test_telemetry_round_trip(message: TelemetryMessage) -> None:
    assert TelemetryMessage.decode(message.encode()) == message


@settings(deadline=None)  # a loaded shared CI box must not fail a property
@given(st.builds(Ack, u32, u32))
def test_ack_round_trip(ack: Ack) -> None:
    assert Ack.decode(ack.encode()) == ack


@settings(deadline=None)  # a loaded shared CI box must not fail a property
@given(st.builds(Nack, u32, u32, st.sampled_from(NackReason), text))
def test_nack_round_trip(nack: Nack) -> None:
    assert Nack.decode(nack.encode()) == nack


@settings(deadline=None)  # a loaded shared CI box must not fail a property
@given(st.builds(Result, u32, u32, st.sampled_from(ResultStatus), text))
def test_result_round_trip(result: Result) -> None:
    assert Result.decode(result.encode()) == result


items = st.lists(st.tuples(ids, st.integers(0, 1000).map(lambda n: n / 1000)), max_size=6)
commands = st.one_of(
    st.builds(ShowSuggestion, ids, ids, items.map(tuple), st.integers(0, 65535)),
    st.builds(
        SetLed,
        st.integers(0, 255),
        st.tuples(*[st.integers(0, 255)] * 3),
        st.integers(0, 2),
        st.integers(0, 65535),
    ),
    st.builds(SetParam, ids, text),
)


@settings(deadline=None)  # a loaded shared CI box must not fail a property
@given(commands)
def test_command_round_trip(command: ShowSuggestion | SetLed | SetParam) -> None:
    assert decode_command(command.encode()) == command


decoders: list[Callable[[bytes], object]] = [
    Hello.decode,
    EventMessage.decode,
    TelemetryMessage.decode,
    Ack.decode,
    Nack.decode,
    Result.decode,
    decode_command,
]


@pytest.mark.parametrize("decode", decoders)
@settings(deadline=None)  # a loaded shared CI box must not fail a property
@given(raw=st.binary(max_size=80))
def test_arbitrary_payloads_fail_only_as_decode_errors(
    decode: Callable[[bytes], object], raw: bytes
) -> None:
    reason = None
    try:
        decode(raw)
    except DecodeError as exc:
        reason = exc.reason
    assert reason in {None, "bad_payload", "not_utf8", "not_json", "not_object"}


def test_event_data_must_be_a_json_object() -> None:
    payload = EventMessage("product.scan", None, 0).encode()[:-2] + b"[1]"
    with pytest.raises(DecodeError) as info:
        EventMessage.decode(payload)
    assert info.value.reason == "not_object"


def test_str8_refuses_long_strings() -> None:
    with pytest.raises(ValueError, match="str8"):
        SetParam("x" * 256, "1").encode()
