"""``edge-agent demo``: the agent, an embedded broker and simulated products on one machine.

Simulated products (two smart shelves, a kiosk, a door counter, a fridge probe) publish
customer events and telemetry over MQTT, with a little malformed input mixed in so the
quarantine shows up too. Runs until Ctrl-C or ``--duration``, then prints a summary.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import signal
import tempfile
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from edge_agent.app import RunningAgent, run_agent
from edge_agent.config import Config, config_from_dict
from edge_agent.embedded_broker import EmbeddedBroker, free_port
from edge_agent.events import format_ts

STORE_ID = "demo-store"
SKUS = [f"SKU-{n:06d}" for n in range(1, 41)]
CUSTOMERS = [f"c-{n:06d}" for n in range(1, 31)]


@dataclass(frozen=True)
class DemoOptions:
    duration: float | None
    broker: tuple[str, int] | None
    data_dir: Path | None
    http_port: int
    rate: float  # messages per second from all simulated products together
    seed: int


async def run_demo(options: DemoOptions) -> dict[str, Any]:
    data_dir = options.data_dir or Path(tempfile.mkdtemp(prefix="edge-demo-"))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(signum, stop.set)
    async with contextlib.AsyncExitStack() as stack:
        if options.broker is None:
            broker = await stack.enter_async_context(EmbeddedBroker())
            host, port = broker.host, broker.port
        else:
            host, port = options.broker
        config = _demo_config(data_dir, host, port, options.http_port)
        ready: asyncio.Future[RunningAgent] = loop.create_future()
        agent_task = asyncio.create_task(
            run_agent(config, stop, on_ready=ready.set_result), name="agent"
        )
        agent = await ready
        print(f"live page:   http://{config.http.host}:{agent.status.port}/", flush=True)
        print(f"broker:      mqtt://{host}:{port} (topics edge/{STORE_ID}/...)", flush=True)
        print(f"data dir:    {data_dir}", flush=True)
        products = asyncio.create_task(
            _simulate_products(host, port, options.rate, options.seed, stop), name="products"
        )
        if options.duration is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), options.duration)
        else:
            await stop.wait()
        summary = await agent.board.snapshot()
        stop.set()
        await products
        await agent_task
    return {
        "events_collected": summary["buffer"]["total"],
        "quarantined": summary["quarantine"]["total"],
        "suggestions_shown": summary["suggestions"]["shown"],
        "suggestions_accepted": summary["suggestions"]["accepted"],
        "synced": summary["sync"]["sent"],
        "sync_lag_s": summary["sync"]["lag_s"],
        "data_dir": str(data_dir),
    }


def _demo_config(data_dir: Path, host: str, port: int, http_port: int) -> Config:
    return config_from_dict(
        {
            "agent": {"store_id": STORE_ID, "data_dir": str(data_dir)},
            "mqtt": {"host": host, "port": port, "client_id": f"edge-agent-demo-{time.time_ns()}"},
            "http": {"host": "127.0.0.1", "port": http_port if http_port else free_port()},
        }
    )


async def _simulate_products(
    host: str, port: int, rate: float, seed: int, stop: asyncio.Event
) -> None:
    rng = random.Random(seed)
    client = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"demo-products-{seed}")
    await asyncio.to_thread(client.connect, host, port, 30)
    client.loop_start()
    prefix = f"edge/{STORE_ID}/devices"
    try:
        while not stop.is_set():
            topic, payload = _next_message(rng, prefix)
            client.publish(topic, payload, qos=1)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), rng.expovariate(rate))
    finally:
        client.loop_stop()
        client.disconnect()


def _next_message(rng: random.Random, prefix: str) -> tuple[str, bytes]:
    now = format_ts(datetime.now(UTC))
    roll = rng.random()
    customer = rng.choice(CUSTOMERS)
    if roll < 0.25:
        return f"{prefix}/fridge-01/telemetry", json.dumps(
            {"ts": now, "values": {"temp_c": round(rng.gauss(4.0, 0.4), 2), "door_open": False}}
        ).encode()
    if roll < 0.35:
        return f"{prefix}/door-01/telemetry", json.dumps(
            {"ts": now, "values": {"entries": rng.randint(0, 3)}}
        ).encode()
    if roll < 0.65:
        shelf = rng.choice(["shelf-01", "shelf-02"])
        event = {
            "type": "product.pickup",
            "customer_id": customer,
            "ts": now,
            "data": {"sku": rng.choice(SKUS), "weight_g": rng.randint(50, 900)},
        }
        return f"{prefix}/{shelf}/events", json.dumps(event).encode()
    if roll < 0.8:
        event = {
            "type": "kiosk.view",
            "customer_id": customer,
            "ts": now,
            "data": {"sku": rng.choice(SKUS), "page": "product"},
        }
        return f"{prefix}/kiosk-01/events", json.dumps(event).encode()
    if roll < 0.9:
        event = {
            "type": "basket.add",
            "customer_id": customer,
            "ts": now,
            "data": {"sku": rng.choice(SKUS), "qty": 1},
        }
        return f"{prefix}/kiosk-01/events", json.dumps(event).encode()
    if roll < 0.97:
        consent = {
            "personalization": rng.random() < 0.8,
            "profile_sharing": rng.random() < 0.6,
            "partner_sharing": rng.random() < 0.3,
        }
        event = {"type": "consent.update", "customer_id": customer, "ts": now, "data": consent}
        return f"{prefix}/kiosk-01/events", json.dumps(event).encode()
    # A product with a firmware bug: the quarantine should show it, the agent shrug it off.
    return f"{prefix}/shelf-02/events", b'{"type": "product.pickup", "data": {"sku": 12'
