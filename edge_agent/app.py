"""The wiring: open the buffer, start the status endpoint and the sources, stop in order.

Sinks open first and close last; sources stop first. On stop the sources stop taking
input, commit and acknowledge what they hold, and the buffer closes after them.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import re
import signal
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Final

from cloud_sync.envelope_schema import default_registry
from cloud_sync.heartbeat import Heartbeat
from cloud_sync.uploader import Uploader
from edge_agent import systemd
from edge_agent.buffer import Buffer
from edge_agent.component import Component, Ports, Serving
from edge_agent.config import Config
from edge_agent.deadletter import HandlingJournal
from edge_agent.decode import (
    EVENTS_CHANNEL,
    TELEMETRY_CHANNEL,
    TELEMETRY_VALUE_CHANNEL,
    clock_rules,
    make_context,
)
from edge_agent.device_time import DeviceClockJudge
from edge_agent.displays import SerialDisplays
from edge_agent.errors import HttpPortInUseError, StorageError
from edge_agent.governance import ConsentLedger, event_id_key
from edge_agent.pipeline import Pipeline
from edge_agent.sources.base import Source
from edge_agent.sources.mqtt_consumer import MqttConsumer
from edge_agent.sources.mqtt_select import make_mqtt_source
from edge_agent.sources.supervisor import run_supervised
from edge_agent.status import StatusBoard, StatusServer
from firmware_bridge.serial_source import SerialPortConfig, SerialSource

log = logging.getLogger(__name__)

STOP_GRACE_S: Final = 10.0
SERVE_GRACE_S: Final = 2.0  # at stop: suggestions in flight get this long to go out
RECOUNT_EVERY_S: Final = 60.0


@dataclass
class RunningAgent:
    """What a started agent is made of; handed to ``on_ready`` (tests, the demo)."""

    config: Config
    buffer: Buffer
    pipeline: Pipeline
    board: StatusBoard
    status: StatusServer
    sources: list[Source] = field(default_factory=list)
    components: list[Component] = field(default_factory=list)


def build_sources(config: Config, clock: DeviceClockJudge | None = None) -> list[Source]:
    id_key = event_id_key(config)  # the kept key: derived ids survive restarts
    context = make_context(config.agent.store_id, default_registry(), config.input, id_key, clock)
    client_id = config.mqtt_client_id
    inflight = config.data_dir / "inflight"  # the dead-letter journals (deadletter.py)
    deaths = config.input.poison_max_deaths
    sources: list[Source] = [
        make_mqtt_source(
            config.mqtt,
            client_id,
            context,
            channels=(EVENTS_CHANNEL,),
            journal=HandlingJournal(inflight, "mqtt", deaths),
        ),
        make_mqtt_source(
            config.mqtt,
            f"{client_id}-telemetry",
            context,
            channels=(TELEMETRY_CHANNEL, TELEMETRY_VALUE_CHANNEL),
            name="mqtt-telemetry",
            announce=False,
            journal=HandlingJournal(inflight, "mqtt-telemetry", deaths),
        ),
    ]
    for port in config.serial.ports:
        settings = SerialPortConfig(
            url=port.url, store_id=config.agent.store_id, baud=port.baud, event_id_key=id_key
        )
        journal = HandlingJournal(inflight, "serial-" + re.sub(r"[^\w.-]", "_", port.url), deaths)
        sources.append(
            SerialSource(settings, registry=context.registry, clock=context.clock, journal=journal)
        )
    return sources


def build_components(config: Config) -> list[Component]:
    components: list[Component] = []
    if config.model.enabled:
        # onnxruntime and numpy cost ~30 MB: a collect-only agent never loads them.
        from edge_agent.personalize import Personalizer

        components.append(Personalizer(config))
        if config.sync.url and config.profiles.enabled:
            from edge_agent.personalize.profiles import CentralProfiles

            components.append(CentralProfiles(config))
    if config.sync.url:
        components.append(Uploader(config))
    if config.sync.url and config.sync.http_url:  # NATS without downlink_url: no heartbeat
        components.append(Heartbeat(config))
    return components


async def run_agent(
    config: Config,
    stop: asyncio.Event,
    on_ready: Callable[[RunningAgent], None] | None = None,
    sources: Sequence[Source] | None = None,
    components: Sequence[Component] | None = None,
) -> None:
    """Run until ``stop`` is set; return after an orderly shutdown."""
    config.data_dir.mkdir(parents=True, exist_ok=True)
    buffer = await Buffer.open(
        config.buffer_path,
        config.buffer,
        on_wait=_starting_slowly,
        collect_only=not config.sync.url,  # nothing will ever make room: retention applies
    )
    try:
        clock = DeviceClockJudge(clock_rules(config.input))  # one timestamp rule, one alarm
        chosen = list(sources) if sources is not None else build_sources(config, clock)
        parts = list(components) if components is not None else build_components(config)
        # Governance: the consent in force, from the durable copy, before any input flows.
        consent = ConsentLedger(config.governance.require_consent)
        consent.load(await buffer.consent())
        consent.load_central(await buffer.central_grants())  # after: a local record wins
        pipeline = Pipeline(buffer, consent)
        board = StatusBoard(
            buffer,
            chosen,
            store_id=config.agent.store_id,
            pipeline=pipeline,
            stall_after_s=config.agent.stall_after_s,
        )
        board.providers.append(clock.status)
        board.providers.extend(part.status for part in parts)
        board.providers.append(default_registry().status)  # undeclared fields dropped
        status = StatusServer(board, config.http.host, config.http.port)
        try:
            await status.start()
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:  # an operator's mistake, not a crash: one line
                raise HttpPortInUseError(config.http.host, config.http.port) from exc
            raise
        try:
            agent = RunningAgent(config, buffer, pipeline, board, status, chosen, parts)
            await _run_sources(agent, _ports(pipeline, chosen, board), stop, on_ready)
        finally:
            await status.stop()
    finally:
        await buffer.aclose()
        log.info("agent.stopped committed=%d", buffer.counters.committed)


def _starting_slowly(reason: str, seconds: float) -> None:
    """The buffer waits (disk full, locked) before READY: tell systemd, so that its start
    timeout does not turn the wait into a restart loop."""
    extend_usec = int((seconds + 5.0) * 1_000_000)
    systemd.notify(f"EXTEND_TIMEOUT_USEC={extend_usec}\nSTATUS=waiting for the buffer: {reason}")


def _ports(pipeline: Pipeline, sources: Sequence[Source], board: StatusBoard) -> Ports:
    """What the components may use: suggestions go out on the customer-event MQTT
    connection (the first), displays are the serial ports; an erased customer's consent
    record leaves the ledger with the buffer's copy."""
    mqtt = [source for source in sources if isinstance(source, MqttConsumer)]
    serial = [source for source in sources if isinstance(source, SerialSource)]
    return Ports(
        pipeline.buffer,
        pipeline,
        pipeline.consent,
        suggestions=mqtt[0] if mqtt else None,
        displays=SerialDisplays(serial),
        status=board,
        erasure_listeners=[pipeline.consent.forget],
    )


async def _run_sources(
    agent: RunningAgent,
    ports: Ports,
    stop: asyncio.Event,
    on_ready: Callable[[RunningAgent], None] | None,
) -> None:
    async with asyncio.TaskGroup() as group:
        parts = [
            group.create_task(part.run(ports), name=f"component:{part.name}")
            for part in agent.components
        ]
        await asyncio.sleep(0)  # let components attach their taps before input flows
        tasks = [
            group.create_task(
                run_supervised(source, agent.pipeline.emitter(source.name)),
                name=f"source:{source.name}",
            )
            for source in agent.sources
        ]
        watchdog = group.create_task(_watchdog(agent), name="watchdog")
        reconcile = group.create_task(_reconcile(agent.buffer), name="buffer-reconcile")
        systemd.notify("READY=1")
        log.info(
            "agent.ready store_id=%s buffer=%s status=http://%s:%d/",
            agent.config.agent.store_id,
            agent.buffer.path,
            agent.config.http.host,
            agent.status.port,
        )
        if on_ready is not None:
            on_ready(agent)
        await stop.wait()
        watchdog.cancel()  # stopping is timed by TimeoutStopSec, not by the watchdog
        reconcile.cancel()
        systemd.notify("STOPPING=1")
        log.info("agent.stopping")
        # The connection that carries suggestions out stops last: a trigger another input
        # (serial) delivered just before the stop still gets its suggestion published.
        outlet: object = ports.suggestions  # one of the sources (app._ports)
        first = [(s, t) for s, t in zip(agent.sources, tasks, strict=True) if s is not outlet]
        last = [(s, t) for s, t in zip(agent.sources, tasks, strict=True) if s is outlet]
        deadline = asyncio.get_running_loop().time() + STOP_GRACE_S
        await _stop_sources(first, deadline)
        if last:
            await _served(agent.components, min(SERVE_GRACE_S, _left(deadline)))
            await _stop_sources(last, deadline)
        for part_task in parts:  # after the sources: what they committed is still served
            part_task.cancel()


def _left(deadline: float) -> float:
    return max(0.0, deadline - asyncio.get_running_loop().time())


async def _stop_sources(running: list[tuple[Source, asyncio.Task[None]]], deadline: float) -> None:
    for source, _ in running:
        source.request_stop()
    tasks = [task for _, task in running]
    if tasks:
        _, late = await asyncio.wait(tasks, timeout=_left(deadline))
        for task in late:
            log.warning("agent.stop.forced task=%s", task.get_name())
            task.cancel()


async def _served(components: Sequence[Component], within_s: float) -> None:
    """Wait (bounded) until no component has work of its own in flight."""
    serving = [part for part in components if isinstance(part, Serving)]
    for _ in range(max(1, int(within_s / 0.01))):  # polled: busy() is a plain counter
        if not any(part.busy() for part in serving):
            return
        await asyncio.sleep(0.01)


async def _watchdog(agent: RunningAgent) -> None:
    """Ping systemd only while the pipeline makes progress (health.py): a dead or stuck
    writer, or input that waits with nothing committed, stops the pings and systemd
    restarts the agent. Waiting for sync to make room or for disk space does not."""
    interval = systemd.watchdog_interval_s()
    if interval is None:
        return
    health = agent.board.health
    while True:
        await asyncio.sleep(interval)
        problems = health.problems()
        if problems:
            log.error("watchdog.withheld problems=%s", "; ".join(problems))
            continue
        counters = agent.buffer.counters
        held = f" held={counters.held}" if counters.held else ""
        systemd.notify(
            f"WATCHDOG=1\nSTATUS=pending={counters.pending} committed={counters.committed}{held}"
        )


async def _reconcile(buffer: Buffer) -> None:
    """Reset the tracked totals from the file now and then: erasures by the CLI delete rows
    the counters never saw. A count over a million rows holds up the writer, so not often."""
    while True:
        await asyncio.sleep(RECOUNT_EVERY_S)
        try:
            await buffer.recount()
        except StorageError as exc:  # the writer is gone: health reports it
            log.error("buffer.recount.failed error=%s", exc)  # noqa: TRY400 - no traceback
            return


async def run_until_signalled(config: Config) -> None:
    """The service's main: SIGTERM or SIGINT starts an orderly stop."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(signum, stop.set)
    await run_agent(config, stop)
