"""The serial source over real ptys, with firmware-sim as a real subprocess."""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from edge_agent.events import Event, Rejected
from firmware_bridge.codec import FrameDecoder, encode
from firmware_bridge.link import serial_event_id
from firmware_bridge.messages import SetParam, ShowSuggestion
from firmware_bridge.serial_source import SerialSource
from firmware_bridge.sim_device import SimulatedDevice
from tests.firmware_bridge.bridge_helpers import Committed, SimLauncher, port_config, running, until


async def test_events_arrive_once_and_are_acked(sims: SimLauncher, tmp_path: Path) -> None:
    sim = await sims.start("--device-id", "shelf-07", "--events", "30", "--seed", "1")
    committed = Committed()
    live = SerialSource(port_config(sim.path))
    dead = SerialSource(port_config(str(tmp_path / "no-such-port")))  # must not stall `live`
    async with running(live, committed), running(dead, Committed()):
        code, summary = await sim.wait()
    assert code == 0, summary
    assert summary["acked"] == 30
    assert summary["events"] == 30
    assert len(committed.events) == 30
    assert set(committed.emits.values()) == {1}
    boot = int(summary["boot_ids"][0], 16)
    # Ids derive from (device, boot, seq); HELLOs use a few seqs too, so allow some room.
    assert set(committed.events) <= {serial_event_id("shelf-07", boot, s) for s in range(1, 40)}
    assert all(e.device_id == "shelf-07" and e.customer_id for e in committed.events.values())
    assert live.stats.accepted == 30
    assert live.stats.quarantined == 0
    assert not dead.stats.connected
    assert dead.connects == 0
    assert live.connects == 1


async def test_commands_reach_the_device(sims: SimLauncher) -> None:
    sim = await sims.start("--device-id", "label-3", "--rate", "5")
    source = SerialSource(port_config(sim.path))
    async with running(source, Committed()):
        await until(lambda: source.device_id == "label-3")
        show = ShowSuggestion("sg-1", "c-000042", (("SKU-000001", 0.9), ("SKU-000002", 0.4)))
        outcome = await source.send_command("label-3", show, ttl_s=5)
        param = await source.send_command("label-3", SetParam("telemetry_interval_s", "5"))
        sim.proc.send_signal(signal.SIGTERM)
        code, summary = await sim.wait()
    assert (outcome.status, param.status) == ("ok", "ok")
    assert code == 0
    assert summary["shown"] == ["sg-1"]
    assert summary["commands"] == 2


async def test_command_to_a_vanished_device_expires(sims: SimLauncher) -> None:
    sim = await sims.start("--device-id", "label-4", "--rate", "5")
    source = SerialSource(port_config(sim.path, ping_interval_s=0.2))
    async with running(source, Committed()):
        await until(lambda: source.device_id == "label-4")
        await sim.kill()
        outcome = await source.send_command("label-4", SetParam("x", "1"), ttl_s=0.5)
    assert outcome.status == "expired"


async def test_port_vanishes_and_returns(sims: SimLauncher) -> None:
    sim = await sims.start(
        "--device-id", "shelf-08", "--events", "40", "--vanish-after", "10", "--vanish-for", "0.7"
    )
    committed = Committed()
    source = SerialSource(port_config(sim.path))
    async with running(source, committed):
        code, summary = await sim.wait()
    assert code == 0
    assert summary["vanished"] == 1
    assert summary["acked"] == 40
    assert len(committed.events) == 40
    assert source.connects >= 2


async def test_sim_killed_and_replaced(sims: SimLauncher, tmp_path: Path) -> None:
    link = tmp_path / "by-id" / "usb-shelf-09"
    link.parent.mkdir()
    first = await sims.start("--device-id", "shelf-09", "--link", str(link), "--events", "500")
    committed = Committed()
    source = SerialSource(port_config(str(link)))
    async with running(source, committed):
        await until(lambda: len(committed.events) >= 10)
        await first.kill()  # kill -9: the pty master goes away, the symlink dangles
        await until(lambda: not source.stats.connected)
        second = await sims.start("--device-id", "shelf-09", "--link", str(link), "--events", "5")
        code, summary = await second.wait()
    assert code == 0
    assert summary["acked"] == 5
    boot = int(summary["boot_ids"][0], 16)
    assert len(committed.events) >= 15
    second_ids = {serial_event_id("shelf-09", boot, s) for s in range(1, 12)}
    assert len(second_ids & set(committed.events)) == 5
    assert source.connects >= 2


async def test_agent_crash_redelivers_what_was_not_acked(sims: SimLauncher) -> None:
    sim = await sims.start("--device-id", "shelf-10", "--events", "60", "--rate", "100")
    committed = Committed()
    crashed = SerialSource(port_config(sim.path))
    task = asyncio.create_task(crashed.run(committed))
    await until(lambda: len(committed.events) >= 10)
    task.cancel()  # no graceful stop: ACKs owed are never sent
    await asyncio.gather(task, return_exceptions=True)
    restarted = SerialSource(port_config(sim.path))
    async with running(restarted, committed):
        code, summary = await sim.wait()
    assert code == 0
    assert summary["acked"] == 60
    boot = int(summary["boot_ids"][0], 16)
    # Every event stored once, under the id its (device, boot, seq) always maps to.
    assert len(committed.events) == 60
    assert set(committed.events) <= {serial_event_id("shelf-10", boot, s) for s in range(1, 70)}


async def test_noisy_stream_drops_are_counted_events_still_arrive(sims: SimLauncher) -> None:
    sim = await sims.start(
        "--device-id",
        "shelf-11",
        "--events",
        "40",
        "--noise",
        "0.3",
        "--drop-bytes",
        "0.05",
        "--oversize",
        "0.25",
        "--seed",
        "3",
        "--retransmit",
        "0.2",
    )
    committed = Committed()
    source = SerialSource(port_config(sim.path))
    async with running(source, committed):
        code, summary = await sim.wait()
    assert code == 0
    assert summary["acked"] == 40
    assert summary["noise_bytes"] > 0
    assert len(committed.events) == 40
    assert committed.rejected == []
    assert sum(source.stats.drops.values()) > 0
    assert source.stats.drops["too_large"] > 0
    assert set(source.stats.drops) <= {"bad_cobs", "bad_crc", "too_short", "too_large"}


async def test_newer_firmware_is_refused_with_a_reason(sims: SimLauncher) -> None:
    sim = await sims.start(
        "--device-id", "shelf-12", "--events", "1", "--proto-min", "2", "--proto-max", "3"
    )
    source = SerialSource(port_config(sim.path, tick_s=0.02))
    async with running(source, Committed()):
        code, summary = await sim.wait()
        await until(lambda: "update the agent" in source.stats.detail.get("protocol", ""))
    assert code == 3
    assert "v2..v3" in summary["refused"]


async def test_reboot_and_stall_lose_nothing(sims: SimLauncher) -> None:
    sim = await sims.start(
        "--device-id",
        "shelf-13",
        "--events",
        "20",
        "--reboot-after",
        "8",
        "--stall-after",
        "12",
        "--stall-for",
        "0.5",
    )
    committed = Committed()
    source = SerialSource(port_config(sim.path))
    async with running(source, committed):
        code, summary = await sim.wait()
    assert code == 0
    assert summary["reboots"] == 1
    assert summary["acked"] == 20
    assert len(summary["boot_ids"]) == 2
    assert len(committed.events) == 20
    boots = [int(b, 16) for b in summary["boot_ids"]]
    ids = {serial_event_id("shelf-13", b, s) for b in boots for s in range(1, 30)}
    assert set(committed.events) <= ids


async def test_agent_killed_with_sigkill_loses_nothing(sims: SimLauncher, tmp_path: Path) -> None:
    sim = await sims.start("--device-id", "shelf-14", "--events", "150", "--rate", "150")
    log = tmp_path / "committed.jsonl"
    agent = [sys.executable, str(Path(__file__).with_name("agent_proc.py")), sim.path, str(log)]

    def committed() -> list[str]:
        lines = log.read_text("utf-8").splitlines() if log.exists() else []
        return [json.loads(line)["event_id"] for line in lines if line.endswith("}")]

    first = await asyncio.create_subprocess_exec(*agent)
    try:
        await until(lambda: len(committed()) >= 20)
    finally:
        first.kill()  # SIGKILL, by pid: owed ACKs are never sent
        await asyncio.wait_for(first.wait(), 10)
    second = await asyncio.create_subprocess_exec(*agent)
    try:
        code, summary = await sim.wait()
    finally:
        second.kill()
        await asyncio.wait_for(second.wait(), 10)
    assert code == 0
    assert summary["acked"] == 150
    boot = int(summary["boot_ids"][0], 16)
    ids = committed()
    # Every event is on disk, and stored once by id (redelivered ones map to the same id).
    assert len(set(ids)) == 150
    assert set(ids) <= {serial_event_id("shelf-14", boot, s) for s in range(1, 170)}


async def test_stop_finishes_inflight_commits_and_acks_them(sims: SimLauncher) -> None:
    sim = await sims.start("--device-id", "shelf-15", "--events", "5")
    gate = asyncio.Event()
    committed = Committed()

    async def slow_emit(items: Sequence[Event | Rejected]) -> None:
        await gate.wait()
        await committed(items)

    source = SerialSource(port_config(sim.path))
    task = asyncio.create_task(source.run(slow_emit))
    await until(lambda: source.stats.received == 5)
    source.request_stop()
    await asyncio.sleep(0.1)
    assert not task.done()  # still owes commits and ACKs
    gate.set()
    await asyncio.wait_for(task, 5)
    code, summary = await sim.wait()
    assert code == 0
    assert summary["acked"] == 5
    assert len(committed.events) == 5
    assert not source.stats.connected


async def test_socket_url_with_an_in_process_device() -> None:
    """A pyserial ``socket://`` URL (a serial-over-TCP adapter), the device in this process."""
    device = SimulatedDevice("tcp-01", random.Random(5), retransmit_s=0.2)

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        decoder = FrameDecoder()
        for _ in range(500):  # bounded: 500 turns of 10 ms
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(0.01):
                    data = await reader.read(4096)
                    if not data:
                        break
                    for frame in decoder.feed(data):
                        writer.write(b"".join(map(encode, device.receive(frame))))
            now = time.monotonic()
            frames = device.due(now)
            if device.ready and device.counters.events_sent < 5:
                frames.append(device.shopper_event(now))
            writer.write(b"".join(map(encode, frames)))
            if device.counters.events_sent == 5 and not device.in_flight:
                break
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    committed = Committed()
    source = SerialSource(port_config(f"socket://127.0.0.1:{port}"))
    async with server, running(source, committed):
        await until(lambda: device.counters.acked == 5)
    assert len(committed.events) == 5
    assert {e.device_id for e in committed.events.values()} == {"tcp-01"}


async def test_sim_without_a_reader_gives_up_by_its_timeout(sims: SimLauncher) -> None:
    sim = await sims.start("--device-id", "lonely", "--events", "3", "--timeout", "0.5")
    code, summary = await sim.wait()
    assert code == 1
    assert summary["ok"] is False
    assert summary["acked"] == 0


async def test_a_frame_that_kills_the_agent_is_dead_lettered_after_two_deaths(
    sims: SimLauncher, tmp_path: Path
) -> None:
    # Issue 9: the device retransmits until it is acknowledged, so a frame that kills the
    # agent would loop forever. After two deaths it is quarantined as poison and NACKed.
    sim = await sims.start("--device-id", "shelf-16", "--events", "1")
    log, journal_dir = tmp_path / "committed.jsonl", tmp_path / "inflight"
    journal, deaths_file = journal_dir / "serial.journal", journal_dir / "serial.deaths.json"
    agent = [sys.executable, str(Path(__file__).with_name("agent_proc.py")), sim.path, str(log)]

    def in_hand(deaths_so_far: int) -> bool:
        # After a death, first wait until this process has counted it (it then starts a new
        # journal), so the old journal's line is not taken for the new one.
        if deaths_so_far:
            counted = json.loads(deaths_file.read_text()) if deaths_file.exists() else {}
            if deaths_so_far not in counted.values():
                return False
        return journal.exists() and journal.read_text().startswith("B ")

    for death in range(2):
        process = await asyncio.create_subprocess_exec(*agent, str(journal_dir), "hang")
        try:
            await until(lambda death=death: in_hand(death), limit_s=20)
        finally:
            process.kill()  # SIGKILL while the frame is in hand
            await asyncio.wait_for(process.wait(), 10)
    last = await asyncio.create_subprocess_exec(*agent, str(journal_dir), "hang")
    try:
        code, summary = await sim.wait()
    finally:
        last.kill()
        await asyncio.wait_for(last.wait(), 10)
    assert code == 4, summary  # settled, but NACKed: quarantined
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    assert lines == [{"quarantined": "poison"}]
    assert json.loads(deaths_file.read_text()) == {}
