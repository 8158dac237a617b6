"""Run the demo: broker, central store, serial shelf, agent and products, then a summary.

Everything lives under one data directory; Ctrl-C (or ``--duration``) stops the products
first, then the agent (which commits and acknowledges what it holds), then the children.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from edge_agent.app import RunningAgent, run_agent
from edge_agent.config import Config, config_from_dict
from edge_agent.demo.processes import ChildProcess, python_module, run_command
from edge_agent.demo.products import Products
from edge_agent.embedded_broker import EmbeddedBroker, free_port

log = logging.getLogger(__name__)

STORE_ID: Final = "store-001"  # a store the bundled model knows
SERIAL_DEVICE: Final = "shelf-serial-01"


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


async def run_demo(options: DemoOptions) -> dict[str, Any]:
    data_dir = options.data_dir or Path(tempfile.mkdtemp(prefix="edge-demo-"))
    data_dir.mkdir(parents=True, exist_ok=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(signum, stop.set)
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
                http_port=options.http_port,
                sync_url=sync_url,
                token=token,
                serial=serial_link,
            )
            return await _run(
                config,
                options,
                stop=stop,
                host=host,
                port=port,
                sync_url=sync_url,
                data_dir=data_dir,
            )
    finally:
        for child in reversed(children):
            await child.stop()


async def _run(
    config: Config,
    options: DemoOptions,
    *,
    stop: asyncio.Event,
    host: str,
    port: int,
    sync_url: str,
    data_dir: Path,
) -> dict[str, Any]:
    agent_stop = asyncio.Event()
    ready: asyncio.Future[RunningAgent] = asyncio.get_running_loop().create_future()
    agent_task = asyncio.create_task(
        run_agent(config, agent_stop, on_ready=ready.set_result), name="agent"
    )
    agent = await ready
    print(f"live page:      http://{config.http.host}:{agent.status.port}/", flush=True)
    print(f"broker:         mqtt://{host}:{port} (topics edge/{STORE_ID}/...)", flush=True)
    print(f"customer store: {sync_url or 'off'}", flush=True)
    print(f"data dir:       {data_dir}", flush=True)
    products = Products(host, port, STORE_ID, options.rate, options.seed)
    products_task = asyncio.create_task(products.run(stop), name="products")
    started = time.monotonic()
    try:
        if options.duration is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), options.duration)
        else:
            await stop.wait()
    finally:
        stop.set()
        await products_task
        await asyncio.sleep(min(2.0, config.sync.interval_s))  # let the last events sync
        summary = await agent.board.snapshot()
        agent_stop.set()
        await agent_task
    return _summary(summary, products, time.monotonic() - started, data_dir)


async def _start_store(
    options: DemoOptions, data_dir: Path, children: list[ChildProcess]
) -> tuple[str, str]:
    if not options.sync:
        return "", ""
    db = f"sqlite:///{data_dir / 'customer-store.db'}"
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
        "http": {"host": "127.0.0.1", "port": http_port if http_port else free_port()},
    }
    if sync_url:
        document["sync"] = {"url": sync_url, "token": token, "interval_s": 2.0}
    if serial:
        document["serial"] = {"ports": [{"url": serial}]}
    return config_from_dict(document)


def _summary(
    status: dict[str, Any], products: Products, elapsed: float, data_dir: Path
) -> dict[str, Any]:
    return {
        "duration_s": round(elapsed, 1),
        "published_by_products": products.published,
        "events_collected": status["buffer"]["total"],
        "quarantined": status["quarantine"]["total"],
        "suggestions_shown": status["suggestions"]["shown"],
        "suggestions_accepted": status["suggestions"]["accepted"],
        "synced": status["sync"]["sent"],
        "sync_lag_s": status["sync"]["lag_s"],
        "sources": {
            name: {"accepted": f["accepted"], "connected": f["connected"]}
            for name, f in status["sources"].items()
        },
        "data_dir": str(data_dir),
    }
