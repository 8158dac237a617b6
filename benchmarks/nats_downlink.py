"""Erasure latency to the agent: NATS downlink against HTTP polling, in one run (prints figures).

    .venv/bin/python -m benchmarks.nats_downlink [--erasures 20] [--announce-interval-s 1.0]
        [--poll-intervals 1.0,5.0]

Not a test. One SQLite store (its real HTTP app on loopback), one nats-server, one agent
buffer file per mode. For each erasure: a customer's event is committed to the agent's
buffer, the store records the erasure (``Backend.erase``, as ``DELETE /v1/customers/{id}``
does), and the time until the customer is gone from the buffer is measured (the buffer is
looked at every 10 ms). Before each erasure a random 0 to max(1 s, the mode's interval) passes,
so that erasures fall anywhere in the poll cycle rather than just after a poll.

Modes: ``nats`` (``customer-store announce``'s loop at ``--announce-interval-s`` and the
agent's ``NatsDownlink``), and the baseline ``http`` (the uploader's downlink loop:
``Downlink.apply_erasures`` every ``sync.interval_s``) at each of ``--poll-intervals`` (the
agent's default is 5 s). Printed: p50, p99 and max latency per mode, the ratio of each
``nats`` figure to the baseline's, and the load average.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from aiohttp import web

from benchmarks.store import percentile
from cloud_sync.store import auth
from cloud_sync.store.app import create_app
from cloud_sync.store.backend import Backend, open_backend
from cloud_sync.store.nats_announce import Announcer, AnnounceSettings
from cloud_sync.sync_client import StoreClient
from cloud_sync.sync_downlink import Downlink
from cloud_sync.sync_nats_downlink import NatsDownlink
from edge_agent.buffer import Buffer
from edge_agent.config import BufferSection, Config, config_from_dict
from edge_agent.events import Event
from tests.support.nats import NatsNode, jetstream_ready

STORE = "bench-store"
_LOOK_EVERY_S = 0.01
_BOUND_S = 60.0  # one erasure that takes longer than this is a failure, not a figure


def pickup(customer_id: str) -> Event:
    return Event(
        event_id=f"ev-{customer_id}",
        type="product.pickup",
        ts="2026-11-22T08:00:00.000Z",
        store_id=STORE,
        device_id="shelf-1",
        customer_id=customer_id,
        source=f"mqtt:edge/{STORE}/devices/shelf-1/events",
        data={"sku": "SKU-1"},
        received_at="2026-11-22T08:00:00.000Z",
    )


@contextlib.asynccontextmanager
async def store_app(backend: Backend) -> AsyncIterator[str]:
    runner = web.AppRunner(create_app(backend))
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


def config(data_dir: Path, nats_url: str, http_url: str, token: str, interval_s: float) -> Config:
    return config_from_dict(
        {
            "agent": {"store_id": STORE, "data_dir": str(data_dir)},
            "sync": {
                "transport": "nats",
                "url": nats_url,
                "downlink_url": http_url,
                "token": token,
                "nats_downlink": True,
                "interval_s": interval_s,
                "timeout_s": 5.0,
            },
        }
    )


async def measure(
    backend: Backend,
    buffer: Buffer,
    erasures: int,
    prefix: str,
    rng: random.Random,
    spacing_s: float,
) -> list[float]:
    latencies = []
    for number in range(erasures):
        customer = f"{prefix}-{number}"
        await buffer.commit([pickup(customer)])
        await asyncio.sleep(rng.uniform(0.0, spacing_s))
        started = time.monotonic()
        await backend.erase([customer], "benchmark", datetime.now(UTC))
        while customer in await buffer.held_customers():
            if time.monotonic() - started > _BOUND_S:
                raise RuntimeError(f"{prefix}: erasure {number} not applied in {_BOUND_S}s")
            await asyncio.sleep(_LOOK_EVERY_S)
        latencies.append(time.monotonic() - started)
    return latencies


async def run_mode(
    backend: Backend,
    cfg: Config,
    erasures: int,
    prefix: str,
    rng: random.Random,
    background: Callable[[Downlink], Coroutine[Any, Any, None]],
) -> list[float]:
    buffer = await Buffer.open(cfg.data_dir / "buffer.db", BufferSection())
    try:
        async with StoreClient(cfg.sync.downlink_url, cfg.sync.token, 5.0) as client:
            downlink = Downlink(client, buffer, cfg, b"k" * 32)
            task = asyncio.create_task(background(downlink), name=f"bench:{prefix}")
            try:
                spacing = max(cfg.sync.interval_s, 1.0)  # anywhere in a poll cycle
                return await measure(backend, buffer, erasures, prefix, rng, spacing)
            finally:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
    finally:
        await buffer.aclose()


def summary(name: str, values: list[float], nats: list[float] | None) -> str:
    """One mode's figures; for a baseline also nats's p50 and p99 as a share of its own."""
    p50, p99, top = percentile(values, 0.5), percentile(values, 0.99), max(values)
    line = (
        f"{name:<18} p50 {p50 * 1000:6.0f} ms  p99 {p99 * 1000:6.0f} ms  max {top * 1000:6.0f} ms"
    )
    if nats:
        line += (
            f"  nats/this: p50 {percentile(nats, 0.5) / p50:.2f}"
            f" p99 {percentile(nats, 0.99) / p99:.2f}"
        )
    return line


async def main_async(args: argparse.Namespace) -> None:
    rng = random.Random(14)
    with tempfile.TemporaryDirectory(prefix="bench-downlink-") as scratch:
        root = Path(scratch)
        node = NatsNode(root / "nats", "bench")
        node.start()
        backend = await open_backend(f"sqlite://{root / 'store.db'}")
        try:
            await jetstream_ready(node.url)
            token = await auth.create_credential(backend, "agent", name="b", store_id=STORE)
            async with store_app(backend) as http_url:
                announcer = Announcer(
                    backend,
                    AnnounceSettings(url=node.url, interval_s=args.announce_interval_s),
                )
                announcing = asyncio.create_task(announcer.run(), name="bench:announce")
                try:
                    nats_cfg = config(root / "nats-agent", node.url, http_url, token, 1.0)

                    async def nats_reader(downlink: Downlink) -> None:
                        reader = NatsDownlink(downlink, nats_cfg.sync, STORE)
                        await reader.run([], [])

                    results = {
                        "nats": await run_mode(
                            backend, nats_cfg, args.erasures, "n", rng, nats_reader
                        )
                    }
                finally:
                    announcing.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await announcing
                for interval in args.poll_intervals:
                    http_cfg = config(
                        root / f"http-{interval}", node.url, http_url, token, interval
                    )

                    async def http_poll(downlink: Downlink, every: float = interval) -> None:
                        while True:  # the uploader's _downlink_loop, erasures only
                            await downlink.apply_erasures()
                            await asyncio.sleep(every)

                    results[f"http poll {interval:g} s"] = await run_mode(
                        backend, http_cfg, args.erasures, f"h{interval}", rng, http_poll
                    )
        finally:
            await backend.close()
            node.stop()
    print(
        f"erasure commit -> agent buffer erased, {args.erasures} erasures per mode,"
        f" announcer every {args.announce_interval_s:g} s;"
        f" load average {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f}"
    )
    for name, values in results.items():
        print(summary(name, values, None if name == "nats" else results["nats"]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else "")
    parser.add_argument("--erasures", type=int, default=20)
    parser.add_argument("--announce-interval-s", type=float, default=1.0)
    parser.add_argument(
        "--poll-intervals",
        type=lambda text: [float(part) for part in text.split(",")],
        default=[1.0, 5.0],
    )
    asyncio.run(main_async(parser.parse_args()))


if __name__ == "__main__":
    main()
