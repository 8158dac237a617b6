"""The agent's serial source: one port, reconnecting, committing before acknowledging.

Bytes come from ``pyserial-asyncio-fast`` (never a blocking read on the loop), frames from
the pure codec, meaning from the sans-IO ``DeviceLink``. Three named tasks share one
TaskGroup: the port (open, read, reconnect with capped exponential backoff and jitter), the
committer (emit batches, then ACK/NACK) and a timer (command retries, heartbeat, expiry).
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime

import serial
import serial_asyncio_fast

from cloud_sync.envelope_schema import Registry, default_registry
from edge_agent.backoff import Backoff
from edge_agent.deadletter import HandlingJournal, fingerprint
from edge_agent.device_time import DeviceClockJudge
from edge_agent.errors import EdgeAgentError
from edge_agent.sources.base import Emit, SourceStats
from firmware_bridge.codec import Frame, FrameDecoder, MessageType, encode
from firmware_bridge.link import (
    CommandOutcome,
    Delivery,
    DeliveryKey,
    DeviceLink,
    LinkOutput,
    LinkTiming,
)
from firmware_bridge.messages import Command

logger = logging.getLogger(__name__)

_READ_SIZE = 4096
_MAX_WRITE_BACKLOG = 64 * 1024  # a device that stopped reading must not grow our memory


class PortUnavailableError(EdgeAgentError):
    """The serial port could not be opened (absent, busy, or it did not answer in time)."""

    def __init__(self, url: str, detail: str) -> None:
        super().__init__(f"serial port {url}: {detail}")
        self.url = url


class UnknownDeviceError(EdgeAgentError, LookupError):
    """A command names a device this port has never seen."""


@dataclass(frozen=True, slots=True)
class SerialPortConfig:
    url: str  # a device path (prefer /dev/serial/by-id/...) or a pyserial URL
    store_id: str
    baud: int = 115200
    open_timeout_s: float = 5.0
    reconnect_initial_s: float = 0.5
    reconnect_max_s: float = 30.0
    read_poll_s: float = 0.2  # how soon a stop request is noticed while the line is idle
    tick_s: float = 0.05  # timer resolution for command retries and the heartbeat
    command_retry_s: float = 0.5
    command_ttl_s: float = 10.0
    ping_interval_s: float = 5.0
    silence_s: float = 15.0
    max_batch: int = 64  # items per emit
    queue_size: int = 256  # decoded items waiting for commit before reading pauses
    event_id_key: bytes = field(default=b"", repr=False)  # the agent's kept id key


class SerialSource:
    def __init__(
        self,
        config: SerialPortConfig,
        *,
        registry: Registry | None = None,
        clock: DeviceClockJudge | None = None,
        journal: HandlingJournal | None = None,
    ) -> None:
        self.config = config
        self.name = f"serial:{config.url}"
        self.stats = SourceStats()
        timing = LinkTiming(
            command_retry_s=config.command_retry_s,
            ping_interval_s=config.ping_interval_s,
            silence_s=config.silence_s,
        )
        self._link = DeviceLink(
            config.store_id,
            registry or default_registry(),
            agent_boot_id=random.getrandbits(32),
            timing=timing,
            id_key=config.event_id_key,
            clock=clock,
        )
        self._seen_devices: set[str] = set()
        self._journal = journal  # poison frames are dead-lettered, never looped
        self._in_hand: dict[DeliveryKey, tuple[int, str]] = {}  # its journal batch and mark
        self._writer: asyncio.StreamWriter | None = None
        self._queue: asyncio.Queue[Delivery] = asyncio.Queue(config.queue_size)
        self._commands: dict[int, asyncio.Future[CommandOutcome]] = {}
        self._stopping = asyncio.Event()
        self._backoff = Backoff(config.reconnect_initial_s, config.reconnect_max_s)
        self.connects = 0  # successful port opens, reconnects included

    @property
    def device_id(self) -> str | None:
        """The device currently identified on this port (from its HELLO), if any."""
        return self._link.device.device_id if self._link.device else None

    def request_stop(self) -> None:
        self._stopping.set()

    async def run(self, emit: Emit) -> None:
        if self._journal is not None:  # run again after a failure: what it held comes back
            self._journal.abandon()
            self._in_hand.clear()
        try:
            async with asyncio.TaskGroup() as group:
                committer = group.create_task(self._commit_loop(emit), name=f"{self.name}:commit")
                timer = group.create_task(self._timer_loop(), name=f"{self.name}:timer")
                await group.create_task(self._port_loop(), name=f"{self.name}:port")
                # Stopping: what was decoded is committed and acknowledged before we leave.
                await self._queue.join()
                committer.cancel()
                timer.cancel()
        finally:
            await self._close_port()
            for future in self._commands.values():
                future.cancel()

    async def send_command(
        self, device_id: str, command: Command, *, ttl_s: float | None = None
    ) -> CommandOutcome:
        """Send a COMMAND, retried until its RESULT or until it expires ("expired")."""
        if device_id not in self._seen_devices:
            raise UnknownDeviceError(f"device {device_id!r} never said HELLO on {self.name}")
        ttl = self.config.command_ttl_s if ttl_s is None else ttl_s
        seq = self._link.command(device_id, command, time.monotonic(), ttl)
        future: asyncio.Future[CommandOutcome] = asyncio.get_running_loop().create_future()
        self._commands[seq] = future
        self._apply(self._link.poll(time.monotonic()))
        try:
            # The timer settles the command; this bound only matters if run() is not running.
            async with asyncio.timeout(ttl + 2 * self.config.tick_s + 1.0):
                return await future
        except TimeoutError:
            return CommandOutcome("expired", "source not running", 0)
        finally:
            self._commands.pop(seq, None)

    # -- the port ---------------------------------------------------------------------
    async def _port_loop(self) -> None:
        while not self._stopping.is_set():
            try:
                reader, self._writer = await self._open()
            except PortUnavailableError as exc:
                logger.info("serial.port.unavailable url=%s detail=%s", self.config.url, exc)
                await self._back_off()
                continue
            self.stats.connected = True
            self.connects += 1
            logger.info("serial.port.open url=%s", self.config.url)
            self._send(self._link.connected(time.monotonic()))
            heard = await self._read_until_lost_or_stopped(reader)
            if self._stopping.is_set():
                return  # keep the port open: the committer still owes ACKs
            await self._close_port()
            if heard:  # the port worked: the next loss starts from the shortest wait
                self._backoff.reset()
            await self._back_off()

    async def _open(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        try:
            async with asyncio.timeout(self.config.open_timeout_s):
                reader, writer = await serial_asyncio_fast.open_serial_connection(
                    url=self.config.url, baudrate=self.config.baud
                )
        except (serial.SerialException, OSError, TimeoutError) as exc:
            raise PortUnavailableError(self.config.url, str(exc) or type(exc).__name__) from exc
        return reader, writer

    async def _read_until_lost_or_stopped(self, reader: asyncio.StreamReader) -> bool:
        decoder = FrameDecoder()
        heard = False
        while not self._stopping.is_set():
            try:
                async with asyncio.timeout(self.config.read_poll_s):
                    data = await reader.read(_READ_SIZE)
            except TimeoutError:
                continue
            except (serial.SerialException, OSError) as exc:
                logger.warning("serial.port.lost url=%s detail=%s", self.config.url, exc)
                return heard
            if not data:
                logger.warning("serial.port.lost url=%s detail=eof", self.config.url)
                return heard
            frames = decoder.feed(data)
            if decoder.drops:
                self.stats.drops.update(decoder.drops)
                decoder.drops.clear()
            heard = heard or bool(frames)
            for frame in frames:
                await self._on_frame(frame)
        return heard

    async def _on_frame(self, frame: Frame) -> None:
        journal, mark, batch, dead_letter, deaths = self._journal, None, 0, None, 0
        if journal is not None and frame.type in (MessageType.EVENT, MessageType.TELEMETRY):
            mark = fingerprint(f"serial:{frame.boot_id}:{frame.seq}", frame.payload)
            deaths = journal.verdict(mark)
            if deaths:
                await self._queue.join()  # a suspect is handled alone: a death blames it only
            if journal.is_poison(mark):
                dead_letter = f"the agent died {deaths} times while handling this frame"
                logger.warning(
                    "serial.frame.dead_lettered url=%s deaths=%d", self.config.url, deaths
                )
            batch = journal.begin([mark])  # before handling: a death now is on record
        try:
            out = self._link.receive(frame, time.monotonic(), datetime.now(UTC), dead_letter)
        except Exception:  # an unknown bug costs this frame (the device resends), not the port
            logger.exception(
                "serial.frame.internal_error url=%s type=%s", self.config.url, frame.type
            )
            self.stats.drops["internal_error"] += 1
            out = LinkOutput()
        if journal is not None and mark is not None:
            if out.deliveries:
                self._in_hand[out.deliveries[0].key] = (batch, mark)
            else:  # a duplicate, or nothing to commit: not in hand any more
                journal.end(batch, [mark])
        device_id = self.device_id
        if device_id is not None and device_id not in self._seen_devices:
            self._seen_devices.add(device_id)
        self._apply(out)
        for delivery in out.deliveries:
            self.stats.received += 1
            await self._queue.put(delivery)  # waits while commits lag: backpressure
        if deaths:
            await self._queue.join()  # nothing else in hand until the suspect is settled

    async def _back_off(self) -> None:
        try:
            async with asyncio.timeout(self._backoff.next_delay()):
                await self._stopping.wait()
        except TimeoutError:
            return

    async def _close_port(self) -> None:
        writer, self._writer = self._writer, None
        self.stats.connected = False
        if writer is None:
            return
        writer.close()
        try:
            async with asyncio.timeout(self.config.open_timeout_s):
                await writer.wait_closed()
        except (serial.SerialException, OSError, TimeoutError) as exc:
            logger.debug("serial.port.close_failed url=%s detail=%s", self.config.url, exc)

    # -- commit, acknowledge, timers --------------------------------------------------
    async def _commit_loop(self, emit: Emit) -> None:
        while True:
            batch = [await self._queue.get()]
            while len(batch) < self.config.max_batch and not self._queue.empty():
                batch.append(self._queue.get_nowait())
            items = [delivery.item for delivery in batch]
            await emit(items)
            self.stats.count(items)
            # Only now, committed: ACK (or NACK what was quarantined). If the port is gone
            # the answer is lost; the device resends and the link answers from memory.
            self._send([self._link.settled(d.key, d.item) for d in batch])
            if self._journal is not None:
                for delivery in batch:
                    batch_id, mark = self._in_hand.pop(delivery.key, (-1, ""))
                    self._journal.end(batch_id, [mark])
            for _ in batch:
                self._queue.task_done()

    async def _timer_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.tick_s)
            self._apply(self._link.poll(time.monotonic()))
            self._refresh_detail()

    def _apply(self, out: LinkOutput) -> None:
        self._send(out.send)
        for settled in out.settled:
            future = self._commands.get(settled.seq)
            if future is not None and not future.done():
                future.set_result(settled.outcome)
        if self._link.drops:
            self.stats.drops.update(self._link.drops)
            self._link.drops.clear()

    def _send(self, frames: list[Frame]) -> None:
        writer = self._writer
        if writer is None or not frames:
            return
        if writer.transport.get_write_buffer_size() > _MAX_WRITE_BACKLOG:
            self.stats.drops["write_backlog"] += len(frames)
            return
        writer.write(b"".join(encode(frame) for frame in frames))

    def _refresh_detail(self) -> None:
        link = self._link
        detail = self.stats.detail
        detail["device_id"] = self.device_id or ""
        detail["protocol"] = link.refusal or (f"v{link.version}" if link.device else "")
        detail["device"] = "alive" if link.alive(time.monotonic()) else "silent"
        detail["duplicates"] = str(link.duplicates)
        detail["pending_commands"] = str(link.pending_commands)
        detail["connects"] = str(self.connects)
