"""The sans-IO link: negotiation, mapping, dedup, ACK after commit, commands, heartbeat."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from cloud_sync.envelope_schema import Registry, default_registry
from edge_agent.config import InputSection
from edge_agent.decode import make_context
from edge_agent.device_time import ClockRules, DeviceClockJudge
from edge_agent.events import Event, Rejected
from firmware_bridge import codec
from firmware_bridge.codec import Frame, MessageType
from firmware_bridge.link import DeviceLink, LinkTiming, serial_event_id
from firmware_bridge.messages import (
    Ack,
    EventMessage,
    Hello,
    Nack,
    NackReason,
    Result,
    ResultStatus,
    SetLed,
    TelemetryMessage,
    decode_command,
)

WALL = datetime(2026, 11, 22, 8, 0, tzinfo=UTC)
BOOT = 0xB007


def make_link(**timing: Any) -> DeviceLink:
    return DeviceLink(
        "store-001", default_registry(), agent_boot_id=0xA6E7, timing=LinkTiming(**timing)
    )


def hello(link: DeviceLink, lo: int = 1, hi: int = 1, boot: int = BOOT) -> list[Frame]:
    payload = Hello("shelf-07", "fw-1", lo, hi).encode()
    return link.receive(Frame(MessageType.HELLO, boot, 1, payload, version=hi), 0.0, WALL).send


def event(seq: int, payload: bytes | None = None, boot: int = BOOT) -> Frame:
    if payload is None:
        data = {"sku": "SKU-1", "weight_g": 400}
        payload = EventMessage("product.pickup", "c-1", 1795852800123, data).encode()
    return Frame(MessageType.EVENT, boot, seq, payload)


def test_hello_is_answered_and_events_before_it_ask_for_one() -> None:
    link = make_link()
    out = link.receive(event(5), 0.0, WALL)
    assert not out.deliveries
    assert link.drops["unidentified"] == 1
    assert out.send[0].type == MessageType.HELLO
    assert out.send[0].flags & codec.FLAG_HELLO_REQUEST
    reply = hello(link)
    assert [f.type for f in reply] == [MessageType.HELLO]
    assert reply[0].flags == 0
    assert link.device is not None
    assert link.device.device_id == "shelf-07"


def test_event_is_mapped_and_acked_only_when_settled() -> None:
    link = make_link()
    hello(link)
    out = link.receive(event(7), 1.0, WALL)
    assert out.send == []  # nothing is acknowledged before the commit
    (delivery,) = out.deliveries
    item = delivery.item
    assert isinstance(item, Event)
    assert item.event_id == serial_event_id("shelf-07", BOOT, 7)
    assert (item.type, item.customer_id, item.device_id) == ("product.pickup", "c-1", "shelf-07")
    # The device's clock says six days ahead: not sane, so the receive time is used.
    assert item.ts == item.received_at == "2026-11-22T08:00:00.000Z"
    assert item.source == "serial:shelf-07"
    assert item.customer
    ack_frame = link.settled(delivery.key, item)
    assert ack_frame.type == MessageType.ACK
    assert Ack.decode(ack_frame.payload) == Ack(BOOT, 7)


def test_device_time_is_kept_when_sane_else_receive_time() -> None:
    link = make_link()
    hello(link)
    sane = EventMessage("product.scan", None, int(WALL.timestamp() * 1000) - 5000, {"sku": "a"})
    insane = EventMessage("product.scan", None, 12345, {"sku": "a"})
    (first,) = link.receive(event(1, sane.encode()), 0.0, WALL).deliveries
    (second,) = link.receive(event(2, insane.encode()), 0.0, WALL).deliveries
    assert isinstance(first.item, Event)
    assert first.item.ts == "2026-11-22T07:59:55.000Z"
    assert isinstance(second.item, Event)
    assert second.item.ts == "2026-11-22T08:00:00.000Z"


def test_retransmissions_are_delivered_once_and_reacked() -> None:
    link = make_link()
    hello(link)
    (delivery,) = link.receive(event(9), 0.0, WALL).deliveries
    assert link.receive(event(9), 0.1, WALL).deliveries == []  # in flight: ACK follows
    link.settled(delivery.key, delivery.item)
    again = link.receive(event(9), 0.2, WALL)
    assert again.deliveries == []
    assert [Ack.decode(f.payload) for f in again.send] == [Ack(BOOT, 9)]
    assert link.duplicates == 2
    # The same seq in a new boot is a different event.
    (other,) = link.receive(event(9, boot=BOOT + 1), 0.3, WALL).deliveries
    assert isinstance(other.item, Event)
    assert isinstance(delivery.item, Event)
    assert other.item.event_id != delivery.item.event_id


def test_dedup_memory_is_bounded() -> None:
    link = make_link(dedup_capacity=3)
    hello(link)
    for seq in range(1, 5):
        (delivery,) = link.receive(event(seq), 0.0, WALL).deliveries
        link.settled(delivery.key, delivery.item)
    # seq 1 was forgotten: delivered again (the buffer's event_id makes it a no-op).
    assert len(link.receive(event(1), 0.0, WALL).deliveries) == 1
    assert link.receive(event(4), 0.0, WALL).deliveries == []


def test_bad_payloads_are_rejected_then_nacked() -> None:
    link = make_link()
    hello(link)
    not_json = EventMessage("product.pickup", None, 0).encode()[:-2] + b"{oops"
    missing_sku = EventMessage("product.pickup", None, 0, {"weight_g": 1}).encode()
    unknown = EventMessage("teleport", None, 0, {}).encode()
    reasons = []
    for seq, payload in enumerate([not_json, missing_sku, unknown, b"\x05ab"], start=1):
        (delivery,) = link.receive(event(seq, payload), 0.0, WALL).deliveries
        assert isinstance(delivery.item, Rejected)
        assert delivery.item.raw == payload
        assert delivery.item.source == "serial:shelf-07"
        reasons.append(delivery.item.reason)
        nack = Nack.decode(link.settled(delivery.key, delivery.item).payload)
        assert (nack.seq, nack.reason) == (seq, NackReason.QUARANTINED)
    assert reasons == ["not_json", "missing_field", "unknown_type", "bad_payload"]


def test_telemetry_maps_to_a_telemetry_event() -> None:
    link = make_link()
    hello(link)
    payload = TelemetryMessage(0, {"temp_c": 4.2}).encode()
    frame = Frame(MessageType.TELEMETRY, BOOT, 3, payload)
    (delivery,) = link.receive(frame, 0.0, WALL).deliveries
    assert isinstance(delivery.item, Event)
    assert delivery.item.type == "telemetry"
    assert delivery.item.data == {"values": {"temp_c": 4.2}}
    assert delivery.item.customer_id is None
    assert not delivery.item.customer


def test_newer_firmware_is_refused_with_a_reason() -> None:
    link = make_link()
    (nack_frame,) = hello(link, lo=2, hi=3)
    nack = Nack.decode(nack_frame.payload)
    assert nack.reason == NackReason.VERSION_UNSUPPORTED
    assert link.refusal is not None
    assert "update the agent" in link.refusal
    assert "v2..v3" in nack.text
    assert link.device is None


def test_older_firmware_is_spoken_when_in_range() -> None:
    link = DeviceLink("s", default_registry(), agent_boot_id=1, versions=range(1, 3))
    (reply,) = hello(link, lo=1, hi=1)
    assert reply.type == MessageType.HELLO
    assert reply.version == 1
    assert link.version == 1


def test_commands_retry_until_result() -> None:
    link = make_link(command_retry_s=0.5, ping_interval_s=100.0)
    hello(link)
    seq = link.command("shelf-07", SetLed(1, (255, 0, 0)), now=10.0, ttl_s=5.0)
    (first,) = link.poll(10.0).send
    assert first.type == MessageType.COMMAND
    assert first.seq == seq
    assert first.flags == 0
    assert decode_command(first.payload) == SetLed(1, (255, 0, 0))
    assert link.poll(10.2).send == []
    (second,) = link.poll(10.6).send
    assert second.seq == seq
    assert second.flags & codec.FLAG_RETRANSMIT
    result = Result(0xA6E7, seq, ResultStatus.OK).encode()
    out = link.receive(Frame(MessageType.RESULT, BOOT, 50, result), 10.7, WALL)
    (settled,) = out.settled
    assert settled.seq == seq
    assert settled.outcome.status == "ok"
    assert settled.outcome.attempts == 2
    assert link.pending_commands == 0
    # A repeated RESULT settles nothing more.
    assert link.receive(Frame(MessageType.RESULT, BOOT, 51, result), 10.8, WALL).settled == []


def test_commands_expire() -> None:
    link = make_link()
    seq = link.command("shelf-07", SetLed(1, (0, 0, 0)), now=0.0, ttl_s=1.0)
    assert all(f.type != MessageType.COMMAND for f in link.poll(0.5).send)  # device not here
    (settled,) = link.poll(1.0).settled
    assert (settled.seq, settled.outcome.status, settled.outcome.attempts) == (seq, "expired", 0)


def test_heartbeat() -> None:
    link = make_link(ping_interval_s=1.0, silence_s=3.0)
    hello(link)
    assert link.poll(0.5).send == []
    assert [f.type for f in link.poll(1.1).send] == [MessageType.PING]
    assert link.poll(1.5).send == []
    assert link.alive(2.0)
    assert not link.alive(3.5)
    ping = Frame(MessageType.PING, BOOT, 8, b"\x01\x02\x03\x04")
    (pong,) = link.receive(ping, 4.0, WALL).send
    assert pong.type == MessageType.PONG
    assert pong.payload == ping.payload
    assert link.alive(4.0)


def test_own_hello_echoed_back_is_ignored() -> None:
    link = make_link()
    (request,) = link.connected(0.0)
    assert link.receive(request, 0.1, WALL).send == []
    assert link.drops["echo"] == 1
    assert link.device is None


def test_a_reconnect_forgets_who_was_on_the_port() -> None:
    link = make_link()
    hello(link)
    link.connected(1.0)
    assert link.device is None
    assert link.receive(event(3), 1.1, WALL).deliveries == []
    hello(link)
    assert len(link.receive(event(3), 1.2, WALL).deliveries) == 1


def test_numbers_and_strings_the_pipe_cannot_hold_are_rejected_then_nacked() -> None:
    # Issue 9 items 1-3, serial side: the same refusals as MQTT's decoder.
    link = make_link()
    hello(link)
    prefix = EventMessage("product.pickup", None, 0).encode()[:-2]
    payloads = {
        b'{"sku":"S","w":NaN}': "bad_number",
        b'{"sku":"S","w":1e400}': "bad_number",
        b'{"sku":"S","w":18446744073709551616}': "bad_number",
        b'{"sku":"\\ud800"}': "bad_unicode",
        b'{"sku":"S","\\udc00":1}': "bad_unicode",
        b'{"sku":"S\\u0000"}': "bad_unicode",
    }
    for seq, (data, reason) in enumerate(payloads.items(), start=1):
        (delivery,) = link.receive(event(seq, prefix + data), 0.0, WALL).deliveries
        assert isinstance(delivery.item, Rejected)
        assert delivery.item.reason == reason
        nack = Nack.decode(link.settled(delivery.key, delivery.item).payload)
        assert nack.reason == NackReason.QUARANTINED


def test_one_timestamp_rule_and_one_alarm_for_serial_and_mqtt() -> None:
    # A device 25 h "ahead" (the box's clock is behind): kept, never quarantined; once the
    # shared judge suspects the box's clock, the device time is kept as the ts.
    judge = DeviceClockJudge(ClockRules(skew_min_events=3))
    link = DeviceLink("store-001", default_registry(), agent_boot_id=1, clock=judge)
    hello(link)
    ahead_ms = int((WALL + timedelta(hours=25)).timestamp() * 1000)
    items = []
    for seq in range(1, 6):
        message = EventMessage("product.scan", None, ahead_ms + seq, {"sku": "a"})
        (delivery,) = link.receive(event(seq, message.encode()), 0.0, WALL).deliveries
        assert isinstance(delivery.item, Event)
        items.append(delivery.item)
    assert [item.ts == item.received_at for item in items] == [True, True, False, False, False]
    assert judge.status()["clock"]["suspect_skew"] is True
    mqtt = make_context("store-001", default_registry(), InputSection(), b"test-id-key", judge)
    assert mqtt.clock is judge  # the agent hands the same judge to every source


def test_a_bug_while_mapping_a_frame_costs_that_frame_only() -> None:
    registry = default_registry()
    faulty = Registry(registry.version, _ExplodingTypes(registry.types))
    link = DeviceLink("store-001", faulty, agent_boot_id=1)
    hello(link)
    boom = EventMessage("product.boom", None, 0, {}).encode()
    (bad,) = link.receive(event(1, boom), 0.0, WALL).deliveries
    (good,) = link.receive(event(2), 0.0, WALL).deliveries
    assert isinstance(bad.item, Rejected)
    assert bad.item.reason == "internal_error"
    assert bad.item.detail.startswith("RuntimeError")
    assert Nack.decode(link.settled(bad.key, bad.item).payload).seq == 1
    assert isinstance(good.item, Event)


class _ExplodingTypes(dict[str, Any]):
    """A type table that fails on one type: a stand-in for an unknown bug (the test's own)."""

    def get(self, key: str, default: Any = None) -> Any:
        if key == "product.boom":
            raise RuntimeError("a bug in mapping")
        return super().get(key, default)


def test_a_nul_in_a_str8_field_is_rejected() -> None:
    # Found by the serial fuzz target (corpus: crash-nul-in-customer-id): a customer id of
    # three NUL bytes is valid UTF-8, was accepted, and the central store refuses it.
    link = make_link()
    hello(link)
    payload = EventMessage("product.pickup", "\x00\x00\x00", 0, {"sku": "S"}).encode()
    (delivery,) = link.receive(event(1, payload), 0.0, WALL).deliveries
    assert isinstance(delivery.item, Rejected)
    assert delivery.item.reason == "bad_payload"
    nul_device = Hello("shelf\x0007", "fw", 1, 1).encode()
    link.receive(Frame(MessageType.HELLO, 9, 1, nul_device), 0.0, WALL)
    assert link.drops["bad_hello"] == 1
