"""One driver process of the simulated fleet: many stores as asyncio tasks, each with the
real sink (``benchmarks/fleet.py`` starts several of these and reads their results).

    python -m benchmarks.fleet_driver PLAN.json

The plan names the transport (``nats``: ``cloud_sync.sync_nats.NatsEvents``; ``http``:
``cloud_sync.uploader.HttpEvents``), the stores (and their tokens for HTTP), the offered
rate and the run's length. The driver opens every store's connection, prints ``ready``,
waits for ``go EPOCH`` on stdin, runs until every event it made was acknowledged or its
deadline passed, and prints one JSON object: events made and acknowledged, failures by
kind, and its own CPU seconds (so a reader can tell whether the driver limited the run).

Each store mirrors the uploader's loop (``cloud_sync/uploader.py``): events are made at the
store's rate, every tick the pending ones go out in batches of ``sync.batch_size`` until
none is left, a batch counts only once the sink returned (PubAck or HTTP 2xx), a failure
backs off (``edge_agent.backoff.Backoff`` with the agent's defaults) while a readiness probe
once a second ends the wait as soon as the hub is back. Stores start spread over the first
tick, as real agents are not in lockstep.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import sys
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

from cloud_sync.sync_batches import Row
from cloud_sync.sync_client import StoreClient
from cloud_sync.sync_nats import NatsEvents
from cloud_sync.uploader import HttpEvents
from edge_agent.backoff import Backoff
from edge_agent.buffer.reads import PendingRow
from edge_agent.config import SyncSection
from edge_agent.errors import SyncError
from edge_agent.governance import ConsentLedger

KEY = b"k" * 32
_PROBE_EVERY_S = 1.0  # the uploader's readiness probe during a long backoff
_CONNECT_AT_ONCE = 50  # connections opened in parallel while getting ready


class Sink(Protocol):
    async def post_rows(
        self, rows: list[Row], consent: ConsentLedger, key: bytes, compress: bool
    ) -> object: ...

    async def ready(self, timeout_s: float) -> bool: ...

    async def __aexit__(self, *exc_info: object) -> None: ...


@dataclass(frozen=True)
class Plan:
    transport: str  # "nats" or "http"
    url: str
    stores: list[str]
    index_offset: int  # this driver's first store's place in the fleet (spreads the ticks)
    fleet_size: int
    rate: float  # events/s offered per store
    seconds: float  # how long events are made
    deadline_s: float  # from go: every store stops here, acknowledged or not
    tick_s: float = 1.0
    sync_timeout_s: float = 30.0  # the agent's default
    tokens: dict[str, str] = field(default_factory=dict)

    @classmethod
    def read(cls, path: Path) -> Plan:
        return cls(**json.loads(path.read_text()))


@dataclass
class StoreTally:
    made: int = 0
    acknowledged: int = 0
    failures: Counter[str] = field(default_factory=Counter)


def envelope_row(store_id: str, seq: int) -> Row:
    """A customer event as the buffer holds it (compact JSON, ``ts`` = now)."""
    now = datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    event_id = f"{store_id}-{seq:07d}-{uuid.uuid4().hex[:6]}"
    text = (
        f'{{"event_id":"{event_id}","type":"product.pickup","ts":"{now}",'
        f'"store_id":"{store_id}","device_id":"shelf-1","customer_id":"c-{seq % 500}",'
        f'"source":"mqtt:edge/{store_id}/devices/shelf-1/events","schema":1,'
        f'"data":{{"sku":"SKU-{seq % 97}"}}}}'
    )
    return PendingRow(seq, text, True, f"c-{seq % 500}")


def make_sink(plan: Plan, store_id: str, settings: SyncSection) -> Sink:
    if plan.transport == "nats":
        return NatsEvents(settings, store_id)
    client = StoreClient(plan.url, plan.tokens[store_id], settings.timeout_s, 2)
    return _ClosingHttp(client)


class _ClosingHttp(HttpEvents):
    async def __aexit__(self, *exc_info: object) -> None:
        await self.client.__aexit__(*exc_info)


async def run_store(
    sink: Sink, store_id: str, plan: Plan, settings: SyncSection, start: float, offset: float
) -> StoreTally:
    """Make ``rate`` events a second for ``seconds``; send them as the uploader would."""
    tally = StoreTally()
    pending: list[Row] = []
    made = asyncio.Event()  # set at each tick that made events
    loop = asyncio.get_running_loop()
    began, stop_at = start + offset, start + plan.deadline_s
    await asyncio.sleep(max(0.0, began - loop.time()))
    async with asyncio.TaskGroup() as group:
        maker = group.create_task(make_events(store_id, plan, tally, pending, made, began))
        group.create_task(send_events(sink, settings, tally, pending, made, maker, stop_at))
    return tally


async def make_events(
    store_id: str,
    plan: Plan,
    tally: StoreTally,
    pending: list[Row],
    made: asyncio.Event,
    began: float,
) -> None:
    """The store's devices: events at ``rate``, whatever the sender is doing."""
    loop = asyncio.get_running_loop()
    tick = 0
    while True:
        elapsed = loop.time() - began
        # A late tick (a busy driver) makes what fell due meanwhile: the offer stays whole.
        due = int(plan.rate * min(elapsed, plan.seconds)) - tally.made
        for _ in range(max(0, due)):
            pending.append(envelope_row(store_id, tally.made))
            tally.made += 1
        if due > 0:
            made.set()
        if elapsed >= plan.seconds:
            return
        tick += 1
        await asyncio.sleep(max(0.0, began + tick * plan.tick_s - loop.time()))


async def send_events(
    sink: Sink,
    settings: SyncSection,
    tally: StoreTally,
    pending: list[Row],
    made: asyncio.Event,
    maker: asyncio.Task[None],
    stop_at: float,
) -> None:
    """The uploader: every batch until none is left, backing off through an outage."""
    loop = asyncio.get_running_loop()
    consent = ConsentLedger(require_consent=False)
    backoff = Backoff(settings.backoff_initial_s, settings.backoff_max_s)
    while loop.time() < stop_at:
        if not pending:
            if maker.done():
                return
            made.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(made.wait(), max(0.0, stop_at - loop.time()))
            continue
        batch = pending[: settings.batch_size]
        try:
            await sink.post_rows(batch, consent, KEY, settings.gzip)
        except SyncError as exc:
            # By kind across the fleet: the store ids (in subjects) left out.
            text = re.sub(r"fs-\d+", "<store>", str(exc))
            tally.failures[f"{type(exc).__name__}: {text[-100:]}"] += 1
            await pause(sink, backoff.next_delay(), stop_at)
            continue
        backoff.reset()
        del pending[: len(batch)]
        tally.acknowledged += len(batch)


async def pause(sink: Sink, delay: float, stop_at: float) -> None:
    """The uploader's backoff: wait ``delay``, or less once a probe finds the hub ready."""
    loop = asyncio.get_running_loop()
    deadline = min(loop.time() + delay, stop_at)
    while (left := deadline - loop.time()) > 0:
        if left <= _PROBE_EVERY_S:
            await asyncio.sleep(left)
            return
        await asyncio.sleep(_PROBE_EVERY_S)
        if await sink.ready(2.0):
            return


async def drive(plan: Plan) -> dict[str, Any]:
    # The agent's defaults (batch 500, backoff 0.5 s doubling to 60 s), the plan's timeout.
    settings = SyncSection(transport=plan.transport, url=plan.url, timeout_s=plan.sync_timeout_s)
    sinks = {store_id: make_sink(plan, store_id, settings) for store_id in plan.stores}
    gate = asyncio.Semaphore(_CONNECT_AT_ONCE)

    async def warm(sink: Sink) -> bool:
        async with gate:
            return await sink.ready(10.0)

    warmed = await asyncio.gather(*(warm(sink) for sink in sinks.values()))
    print(f"ready {sum(warmed)}", flush=True)
    line = await asyncio.to_thread(sys.stdin.readline)
    go_epoch = float(line.split()[1])
    loop = asyncio.get_running_loop()
    start = loop.time() + (go_epoch - time.time())
    await asyncio.sleep(max(0.0, start - loop.time()))
    cpu_at_go = _cpu_seconds()
    tallies: dict[str, asyncio.Task[StoreTally]] = {}
    try:
        async with asyncio.TaskGroup() as group:
            for number, (store_id, sink) in enumerate(sinks.items()):
                place = (plan.index_offset + number * plan.fleet_size // len(sinks)) % max(
                    plan.fleet_size, 1
                )
                offset = plan.tick_s * place / max(plan.fleet_size, 1)
                tallies[store_id] = group.create_task(
                    run_store(sink, store_id, plan, settings, start, offset), name=store_id
                )
    finally:
        cpu = _cpu_seconds() - cpu_at_go
        ended = time.time()
        await asyncio.gather(*(sink.__aexit__(None, None, None) for sink in sinks.values()))
    failures: Counter[str] = Counter()
    for task in tallies.values():
        failures.update(task.result().failures)
    return {
        "stores": len(sinks),
        "made": sum(task.result().made for task in tallies.values()),
        "acknowledged": sum(task.result().acknowledged for task in tallies.values()),
        "failures": dict(failures.most_common(6)),
        "failure_count": sum(failures.values()),
        "cpu_s": round(cpu, 2),
        "ended_epoch": ended,
    }


def _cpu_seconds() -> float:
    times = os.times()
    return times.user + times.system


def main() -> None:
    result = asyncio.run(drive(Plan.read(Path(sys.argv[1]))))
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
