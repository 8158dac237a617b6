"""Run the demo: broker, central store, serial shelf, agent and products, then a summary.

Everything lives under one data directory (a temporary one, removed at exit, unless
``--data-dir`` or ``--keep-data``). Ctrl-C (or ``--duration``) stops the products first,
then the agent (which commits and acknowledges what it holds), then the children. A signal
during start-up, a port in use or a part that fails to start ends the demo at once with a
clear message: nothing waits on a part that will never be ready.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import shutil
import signal
import socket
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from edge_agent.app import RunningAgent, run_agent
from edge_agent.config import Config, config_from_dict
from edge_agent.demo.journey import Journey
from edge_agent.demo.processes import ChildProcess, python_module, run_command
from edge_agent.demo.products import Products
from edge_agent.demo.summary import summarize
from edge_agent.embedded_broker import EmbeddedBroker, free_port
from edge_agent.errors import DemoError, DemoInterruptedError, PortInUseError

log = logging.getLogger(__name__)

STORE_ID: Final = "store-001"  # a store the bundled model knows
SERIAL_DEVICE: Final = "shelf-serial-01"
HTTP_HOST: Final = "127.0.0.1"
SUBSCRIBE_TIMEOUT_S: Final = 10.0  # for the agent's MQTT connections before products start
DRAIN_TIMEOUT_S: Final = 10.0  # for the agent to take in what the products sent last
AGENT_STOP_TIMEOUT_S: Final = 30.0  # the agent's orderly stop; beyond it, it is cancelled
JOURNEY_GRACE_S: Final = 20.0  # the cross-store customer's journey may end after the products


@dataclass(frozen=True)
class DemoOptions:
    duration: float | None
    broker: tuple[str, int] | None
    data_dir: Path | None
    http_port: int
    rate: float  # messages per second from the simulated MQTT products
    seed: int
    serial: bool = True
    sync: bool = True
    keep_data: bool = False  # keep a temporary data directory at exit


class _Signals:
    """Ctrl-C / SIGTERM: once running, an orderly stop; during start-up (or a second
    signal during the stop), the main task is cancelled, so no wait can outlive it."""

    def __init__(self, stop: asyncio.Event) -> None:
        self.stop = stop
        self.main = asyncio.current_task()
        self.running = False
        self.forced: int | None = None

    def handle(self, signum: int) -> None:
        if self.running and not self.stop.is_set():
            self.stop.set()
            return
        self.stop.set()
        if self.forced is None and self.main is not None:
            self.forced = signum
            self.main.cancel()


async def run_demo(options: DemoOptions) -> dict[str, Any]:
    temporary = options.data_dir is None
    data_dir = options.data_dir or Path(tempfile.mkdtemp(prefix="edge-demo-"))
    data_dir.mkdir(parents=True, exist_ok=True)
    stop = asyncio.Event()
    signals = _Signals(stop)
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(signum, signals.handle, signum)
    removed = temporary and not options.keep_data
    try:
        summary = await _demo(options, data_dir, stop, signals)
    except asyncio.CancelledError:
        if signals.forced is None:
            raise
        if signals.main is not None:
            signals.main.uncancel()
        raise DemoInterruptedError(signals.forced) from None
    finally:
        for signum in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError):
                loop.remove_signal_handler(signum)
        if removed:
            _remove(data_dir)
    summary["data_dir"] = None if removed else str(data_dir)
    return summary


def _remove(data_dir: Path) -> None:
    try:
        shutil.rmtree(data_dir)
    except OSError as exc:  # a cleanup that fails must not hide the demo's own outcome
        log.warning("demo.cleanup.failed data_dir=%s error=%s", data_dir, exc)
    else:
        log.info("demo.cleanup.done data_dir=%s", data_dir)


async def _demo(
    options: DemoOptions, data_dir: Path, stop: asyncio.Event, signals: _Signals
) -> dict[str, Any]:
    http_port = options.http_port or free_port(HTTP_HOST)
    _check_port_free("the live page's", HTTP_HOST, http_port)
    children: list[ChildProcess] = []
    try:
        async with contextlib.AsyncExitStack() as stack:
            if options.broker is None:
                broker = await stack.enter_async_context(EmbeddedBroker())
                host, port = broker.host, broker.port
            else:
                host, port = options.broker
            sync_url, token = await _start_store(options, data_dir, children)
            serial_link = await _start_serial_shelf(options, data_dir, children)
            config = _config(
                data_dir,
                host=host,
                port=port,
                embedded=options.broker is None,
                http_port=http_port,
                sync_url=sync_url,
                token=token,
                serial=serial_link,
            )
            agent_stop = asyncio.Event()
            ready: asyncio.Future[RunningAgent] = asyncio.get_running_loop().create_future()
            agent_task = asyncio.create_task(
                run_agent(config, agent_stop, on_ready=ready.set_result), name="agent"
            )
            stack.push_async_callback(_stop_agent, agent_stop, agent_task)
            agent = await _wait_ready(ready, agent_task, http_port)
            await _subscribed(agent, SUBSCRIBE_TIMEOUT_S)
            signals.running = True
            _announce(config, agent, host=host, port=port, sync_url=sync_url, data_dir=data_dir)
            journey = None
            if sync_url:
                journey = Journey(
                    host=host,
                    port=port,
                    embedded=options.broker is None,
                    store_url=sync_url,
                    db=_store_db(data_dir),
                    data_dir=data_dir,
                    main_store=STORE_ID,
                )
            return await _run(
                agent, agent_task, options, stop=stop, host=host, port=port, journey=journey
            )
    finally:
        for child in reversed(children):
            await child.stop()


def _check_port_free(what: str, host: str, port: int) -> None:
    """Fail before anything starts: the agent would only find out after the broker, the
    store and the serial shelf are up."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the agent binds
        try:
            sock.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise PortInUseError(what, host, port) from exc
            raise DemoError(f"cannot listen on {host}:{port}: {exc}") from exc


async def _wait_ready(
    ready: asyncio.Future[RunningAgent], agent_task: asyncio.Task[None], http_port: int
) -> RunningAgent:
    """The started agent, or the reason it never will be (it ended during its start)."""
    waited: set[asyncio.Future[Any]] = {ready, agent_task}
    await asyncio.wait(waited, return_when=asyncio.FIRST_COMPLETED)
    if ready.done():
        return ready.result()
    failure = agent_task.exception()
    if isinstance(failure, OSError) and failure.errno == errno.EADDRINUSE:
        raise PortInUseError("the live page's", HTTP_HOST, http_port) from failure
    if failure is not None:
        raise DemoError(f"the agent failed to start: {failure}") from failure
    raise DemoError("the agent stopped before it was ready")


async def _stop_agent(agent_stop: asyncio.Event, agent_task: asyncio.Task[None]) -> None:
    agent_stop.set()
    if not agent_task.done():
        await asyncio.wait({agent_task}, timeout=AGENT_STOP_TIMEOUT_S)
    if not agent_task.done():
        log.warning("demo.agent.stop_forced timeout_s=%.0f", AGENT_STOP_TIMEOUT_S)
        agent_task.cancel()
        await asyncio.wait({agent_task})
    elif not agent_task.cancelled() and agent_task.exception() is not None:
        # Already reported where it mattered (start or run); logged here for the record.
        log.debug("demo.agent.ended error=%s", agent_task.exception())


def _announce(
    config: Config, agent: RunningAgent, *, host: str, port: int, sync_url: str, data_dir: Path
) -> None:
    print(f"live page:      http://{config.http.host}:{agent.status.port}/", flush=True)
    print(f"broker:         mqtt://{host}:{port} (topics edge/{STORE_ID}/...)", flush=True)
    print(f"customer store: {sync_url or 'off'}", flush=True)
    print(f"data dir:       {data_dir}", flush=True)
    print(
        "note:           about 1% of the products' messages are malformed on purpose (as a"
        " firmware bug would send them); the agent quarantines them, they are not errors",
        flush=True,
    )


async def _run(
    agent: RunningAgent,
    agent_task: asyncio.Task[None],
    options: DemoOptions,
    *,
    stop: asyncio.Event,
    host: str,
    port: int,
    journey: Journey | None = None,
) -> dict[str, Any]:
    products = Products(host, port, STORE_ID, options.rate, options.seed)
    products_task = asyncio.create_task(products.run(stop), name="products")
    journey_task = (
        asyncio.create_task(journey.run(agent), name="journey") if journey is not None else None
    )
    stopped = asyncio.create_task(stop.wait(), name="demo-stop")
    started = time.monotonic()
    try:
        await asyncio.wait(
            {stopped, agent_task, products_task},
            timeout=options.duration,
            return_when=asyncio.FIRST_COMPLETED,
        )
    finally:
        stop.set()
        stopped.cancel()
        await asyncio.wait({products_task})
    if agent_task.done():
        failure = None if agent_task.cancelled() else agent_task.exception()
        raise DemoError(f"the agent stopped during the demo: {failure}") from failure
    products_task.result()  # a products failure (the broker went away) ends the demo here
    travelled = await _journey_outcome(journey_task)
    journey_sent = journey.published_to_main if journey is not None else 0
    sent = products.published + products.accepted_by_shoppers + journey_sent
    await _taken_in(agent, sent, DRAIN_TIMEOUT_S)
    await asyncio.sleep(min(2.0, agent.config.sync.interval_s))  # let the last events sync
    status = await agent.board.snapshot()
    summary = summarize(status, products, time.monotonic() - started, journey_sent)
    if travelled is not None:
        summary["cross_store_customer"] = travelled
    return summary


async def _journey_outcome(task: asyncio.Task[dict[str, Any]] | None) -> dict[str, Any] | None:
    """The journey's summary; a journey still under way after the grace is cut short."""
    if task is None:
        return None
    done, _ = await asyncio.wait({task}, timeout=JOURNEY_GRACE_S)
    if not done:
        task.cancel()
        await asyncio.wait({task})
        return {"completed": False, "reason": "the demo ended before the journey did"}
    return task.result()


def _store_db(data_dir: Path) -> str:
    return f"sqlite:///{data_dir / 'customer-store.db'}"


async def _subscribed(agent: RunningAgent, within: float) -> None:
    """Until every MQTT connection of the agent is up (bounded): the embedded broker keeps
    nothing for a subscription that does not exist yet, so products start after it."""
    deadline = time.monotonic() + within
    mqtt = [source for source in agent.sources if source.name.startswith("mqtt")]
    while time.monotonic() < deadline:
        if all(source.stats.connected for source in mqtt):
            break
        await asyncio.sleep(0.05)
    await asyncio.sleep(0.2)  # the SUBACK follows the CONNACK that set `connected`


async def _taken_in(agent: RunningAgent, sent: int, within: float) -> None:
    """Until the agent's MQTT sources took in all the products sent (bounded): the summary
    compares the two."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        received = sum(s.stats.received for s in agent.sources if s.name.startswith("mqtt"))
        if received >= sent:
            return
        await asyncio.sleep(0.05)
    log.warning("demo.drain.incomplete sent=%d within_s=%.0f", sent, within)


async def _start_store(
    options: DemoOptions, data_dir: Path, children: list[ChildProcess]
) -> tuple[str, str]:
    if not options.sync:
        return "", ""
    db = _store_db(data_dir)
    out = await run_command(
        sys.executable, "-m", "cloud_sync.store", "token", "create", "--db", db, "--store", STORE_ID
    )
    token = out.strip().splitlines()[-1]
    store = ChildProcess(
        "customer-store",
        python_module("cloud_sync.store", "serve", "--db", db, "--port", "0"),
        data_dir / "customer-store.log",
    )
    children.append(store)
    line = await store.start()
    return line.removeprefix("listening").strip(), token


async def _start_serial_shelf(
    options: DemoOptions, data_dir: Path, children: list[ChildProcess]
) -> str:
    if not options.serial:
        return ""
    link = data_dir / "serial-shelf"
    sim = ChildProcess(
        "firmware-sim",
        python_module(
            "firmware_bridge.sim",
            "--device-id",
            SERIAL_DEVICE,
            "--rate",
            "0.5",
            "--telemetry",
            "10",
            "--link",
            str(link),
            "--timeout",
            "0",
            "--seed",
            str(options.seed),
        ),
        data_dir / "firmware-sim.log",
    )
    children.append(sim)
    return await sim.start()


def _config(
    data_dir: Path,
    *,
    host: str,
    port: int,
    embedded: bool,
    http_port: int,
    sync_url: str,
    token: str,
    serial: str,
) -> Config:
    document: dict[str, Any] = {
        "agent": {"store_id": STORE_ID, "data_dir": str(data_dir / "agent")},
        "mqtt": {
            "host": host,
            "port": port,
            "client_id": f"edge-agent-demo-{time.time_ns()}",
            # The embedded broker (amqtt) speaks 3.1.1 only; a named broker is asked for 5.
            "protocol": "3.1.1" if embedded else "auto",
        },
        "http": {"host": HTTP_HOST, "port": http_port},
    }
    if sync_url:
        document["sync"] = {"url": sync_url, "token": token, "interval_s": 2.0}
    if serial:
        document["serial"] = {"ports": [{"url": serial}]}
    return config_from_dict(document)
