"""A store's NATS downlink and one agent's reader of it, in this process, on real parts.

The store: its backend (SQLite file or PostgreSQL), its aiohttp app on a loopback port (the
agent's ``downlink_url``), and ``Announcer`` rounds run by the test. The agent: a real buffer
file, ``Downlink`` over HTTP and ``NatsDownlink`` over a real nats-server, run as a task the
test starts and cancels (a stop between two notices, like a restart).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nats
from nats.aio.client import Client
from nats.js.kv import KeyValue

from cloud_sync.store.backend import Backend
from cloud_sync.store.nats_announce import (
    Announcer,
    AnnounceSettings,
    ensure_state,
    ensure_stream,
)
from cloud_sync.sync_client import StoreClient
from cloud_sync.sync_downlink import Downlink
from cloud_sync.sync_nats_downlink import NatsDownlink
from edge_agent.buffer import Buffer
from edge_agent.component import ModelAnswer
from edge_agent.config import BufferSection, Config, config_from_dict
from edge_agent.events import Event

BOUND_S = 30.0


async def eventually(
    probe: Callable[[], Awaitable[bool]], within_s: float = BOUND_S, every: float = 0.05
) -> None:
    deadline = time.monotonic() + within_s
    while not await probe():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {within_s}s")
        await asyncio.sleep(every)


@dataclass
class StoreSide:
    """The announcer's connection and state bucket; ``round()`` publishes once."""

    backend: Backend
    nats_url: str
    options: dict[str, Any] = field(default_factory=dict)
    announcer: Announcer | None = None
    nc: Client | None = None
    state: KeyValue | None = None

    async def open(self) -> StoreSide:
        settings = AnnounceSettings(url=self.nats_url, timeout_s=5.0)
        self.nc = await nats.connect(self.nats_url, **self.options)
        js = self.nc.jetstream(timeout=5)
        replicas = await ensure_stream(js, settings)
        self.state = await ensure_state(js, replicas)
        self.announcer = Announcer(self.backend, settings)
        return self

    async def round(self) -> None:
        assert self.announcer is not None
        assert self.nc is not None
        assert self.state is not None
        await self.announcer.round(self.nc.jetstream(timeout=5), self.state)

    async def close(self) -> None:
        if self.nc is not None:
            await self.nc.close()


def agent_config(
    data_dir: Path, store_id: str, nats_url: str, http_url: str, token: str, **sync: Any
) -> Config:
    return config_from_dict(
        {
            "agent": {"store_id": store_id, "data_dir": str(data_dir)},
            "sync": {
                "transport": "nats",
                "url": nats_url,
                "downlink_url": http_url,
                "token": token,
                "nats_downlink": True,
                "interval_s": 0.2,
                "timeout_s": 3.0,
                "backoff_initial_s": 0.1,
                "backoff_max_s": 0.5,
                **sync,
            },
        }
    )


@dataclass
class AgentSide:
    """One agent's buffer and downlinks; ``running()`` runs the NATS reader as a task."""

    config: Config
    buffer: Buffer
    client: StoreClient
    downlink: Downlink
    offered: list[Path] = field(default_factory=list)
    forgotten: list[str] = field(default_factory=list)
    reader: NatsDownlink | None = None

    async def offer(self, directory: Path) -> ModelAnswer:
        self.offered.append(directory)
        return ModelAnswer(True, directory.name, "test listener")

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[NatsDownlink]:
        reader = self.reader = NatsDownlink(
            self.downlink, self.config.sync, self.config.agent.store_id
        )
        task = asyncio.create_task(
            reader.run([self.forgotten.append], [self.offer]), name="test:nats-downlink"
        )
        try:
            yield reader
        finally:
            crashed = task.done()  # it never returns by itself: done means it raised
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task  # re-raises what it failed with, if it did
            assert not crashed


@contextlib.asynccontextmanager
async def agent_side(config: Config, key: bytes = b"k" * 32) -> AsyncIterator[AgentSide]:
    buffer = await Buffer.open(config.data_dir / "buffer.db", BufferSection())
    try:
        async with StoreClient(config.sync.downlink_url, config.sync.token, 3.0) as client:
            yield AgentSide(config, buffer, client, Downlink(client, buffer, config, key))
    finally:
        await buffer.aclose()


def pickup(store_id: str, customer_id: str, n: int = 1) -> Event:
    """A customer's pickup, committed straight into an agent's buffer (the rows an erasure
    must remove)."""
    return Event(
        event_id=f"ev-{customer_id}-{n}",
        type="product.pickup",
        ts="2026-11-22T08:00:00.000Z",
        store_id=store_id,
        device_id="shelf-1",
        customer_id=customer_id,
        source=f"mqtt:edge/{store_id}/devices/shelf-1/events",
        data={"sku": f"SKU-{n}"},
        received_at="2026-11-22T08:00:00.000Z",
    )
