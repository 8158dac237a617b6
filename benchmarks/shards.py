"""One JetStream stream against N shard streams, on a real 3-node cluster into PostgreSQL.

For each layout, in the same run, alternated ``--repeats`` times, each time on a fresh
three-node cluster (R3) and a fresh schema: ``one stream`` (``--shards 0``: ``EDGE_EVENTS``,
no mapping, one pull loop per worker), ``one stream xN loops`` (the same with N pull loops
per worker process, ``--workers N``: as many concurrent fetch-commit loops as the sharded
layout has, so the drain comparison is not just more loops) and ``N shards`` (the mapping,
``EDGE_EVENTS_<k>``, one loop per shard per worker):

1. publish: ``--events`` envelopes of ``--stores`` stores, from ``--publishers`` connections
   each keeping up to 256 PubAcks outstanding (``publish_async``, as the agent's sink), to
   ``edge.events.<store_id>``; the rate is events / seconds until the last PubAck;
2. drain: ``--workers`` ``customer-store ingest`` processes start on the full streams; the
   rate is events / the span of ``ingested_at`` in PostgreSQL (first to last committed
   batch, the store's own clock; slightly optimistic by one batch's time, alike for every
   layout), every event exactly once (checked).

3. recovery (``--restart-repeats``): the whole cluster killed with -9 and started again;
   seconds from the restart until every one of 40 stores' publishes is PubAcked (each
   store's shard has its stream leader back), beside the same for one stream.

Prints one JSON object per run, then medians and the N-shard / one-stream ratios, with the
load average before and after. On a shared 2-core machine every process competes for the
same cores: read the ratios, not the absolute rates.

    .venv/bin/python -m benchmarks.shards [--shards 4] [--events 20000] [--stores 200]
        [--publishers 4] [--workers 2] [--repeats 2] [--pg-url URL]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import select
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import nats
import nats.errors
import psycopg

from benchmarks.fleet import stop_child
from benchmarks.store import DEFAULT_PG, new_schema, scratch_database
from cloud_sync.store.nats_ingest import IngestSettings, prepare
from tests.support.nats import NatsCluster, jetstream_ready

_WINDOW = 256  # PubAcks outstanding per publisher connection


def envelope(store_id: str, number: int) -> bytes:
    return json.dumps(
        {
            "event_id": f"{store_id}-{number:07d}",
            "type": "product.pickup",
            "ts": "2026-11-27T08:00:00.000Z",
            "store_id": store_id,
            "device_id": "shelf-1",
            "customer_id": f"c-{number % 1000:06d}",
            "source": f"mqtt:edge/{store_id}/devices/shelf-1/events",
            "schema": 1,
            "data": {"sku": f"SKU-{number % 5000:06d}", "weight_g": 412},
        }
    ).encode()


async def publish(url: str, events: list[tuple[str, bytes, str]]) -> None:
    nc = await nats.connect(url.split(","), max_reconnect_attempts=-1)
    try:
        js = nc.jetstream(timeout=30)
        for start in range(0, len(events), _WINDOW):
            acks = [
                await js.publish_async(
                    f"edge.events.{store}", payload, headers={"Nats-Msg-Id": msg_id}
                )
                for store, payload, msg_id in events[start : start + _WINDOW]
            ]
            await asyncio.wait_for(asyncio.gather(*acks), 60)
    finally:
        await nc.close()


async def publish_all(url: str, args: argparse.Namespace) -> float:
    stores = [f"store-{n:04d}" for n in range(args.stores)]
    events = [
        (store, envelope(store, n), f"{store}:{store}-{n:07d}")
        for n in range(args.events)
        for store in [stores[n % len(stores)]]
    ]
    shares = [events[i :: args.publishers] for i in range(args.publishers)]
    started = time.perf_counter()
    await asyncio.gather(*(publish(url, share) for share in shares))
    return time.perf_counter() - started


def ingest_span_s(db_url: str) -> float:
    with psycopg.connect(db_url) as conn:
        found = conn.execute(
            "SELECT extract(epoch FROM max(ingested_at) - min(ingested_at)) FROM events"
        ).fetchone()
    assert found is not None
    return float(found[0])


def rows(db_url: str) -> tuple[int, int]:
    with psycopg.connect(db_url) as conn:
        found = conn.execute(
            "SELECT count(*), count(DISTINCT (store_id, event_id)) FROM events"
        ).fetchone()
    assert found is not None
    return int(found[0]), int(found[1])


def start_worker(
    url: str, db_url: str, shards: int, loops: int, log: Path
) -> subprocess.Popen[bytes]:
    command = [sys.executable, "-m", "cloud_sync.store", "ingest", "--from", url, "--db", db_url]
    command += ["--shards", str(shards), "--workers", str(loops), "--pool-size", "2"]
    command += ["--batch", "500"]
    with log.open("ab") as out:
        return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=out)


def wait_ingesting(proc: subprocess.Popen[bytes], log: Path) -> None:
    assert proc.stdout is not None
    found, _, _ = select.select([proc.stdout], [], [], 120)
    if not found or proc.stdout.readline().decode().strip() != "ingesting":
        raise SystemExit(f"worker did not start: {log.read_text()[-2000:]}")


def one_run(
    work: Path, db: str, layout: tuple[str, int, int], args: argparse.Namespace, index: int
) -> dict[str, Any]:
    name, shards, loops = layout
    label = f"shards{shards}x{loops}-{index}"
    cluster = NatsCluster(work / label, shards=shards)
    cluster.start()
    workers: list[subprocess.Popen[bytes]] = []
    try:
        asyncio.run(jetstream_ready(cluster.url, within=60))

        async def setup() -> None:
            nc = await nats.connect(cluster.url.split(","))
            try:
                await prepare(
                    nc.jetstream(timeout=30), IngestSettings(url=cluster.url, shards=shards)
                )
            finally:
                await nc.close()

        asyncio.run(setup())
        load_before = os.getloadavg()[0]
        publish_s = asyncio.run(publish_all(cluster.url, args))
        schema = new_schema(db, label.replace("-", "_"))
        logs = [work / f"{label}-worker-{n}.log" for n in range(args.workers)]
        workers = [start_worker(cluster.url, schema, shards, loops, log) for log in logs]
        for proc, log in zip(workers, logs, strict=True):
            wait_ingesting(proc, log)
        started = time.perf_counter()
        deadline = started + 600
        seen = rows(schema)
        while seen[1] < args.events and time.perf_counter() < deadline:
            time.sleep(0.2)
            seen = rows(schema)
        drain_s = ingest_span_s(schema)
        if seen != (args.events, args.events):
            raise SystemExit(f"{label}: stored {seen}, expected {args.events} exactly once")
        return {
            "layout": name,
            "shards": shards,
            "loops_per_worker": loops,
            "run": index,
            "events": args.events,
            "publish_per_s": round(args.events / publish_s),
            "drain_per_s": round(args.events / drain_s),
            "load_before": round(load_before, 2),
            "load_after": round(os.getloadavg()[0], 2),
        }
    finally:
        for proc in workers:
            stop_child(proc)
        cluster.stop()


async def acked_everywhere(url: str, stores: list[str], within: float) -> float:
    """Seconds until one publish of every store is PubAcked (retrying each every 0.2 s)."""
    started = time.perf_counter()
    nc = await nats.connect(
        url.split(","), max_reconnect_attempts=-1, reconnect_time_wait=0.2, error_cb=_quiet
    )
    try:
        js = nc.jetstream(timeout=2)
        for store in stores:
            while True:
                try:
                    await js.publish(f"edge.events.{store}", envelope(store, 0))
                    break
                except (nats.errors.Error, TimeoutError):
                    if time.perf_counter() - started > within:
                        raise SystemExit(f"{store}: no PubAck within {within}s") from None
                    await asyncio.sleep(0.2)
    finally:
        await nc.close()
    return time.perf_counter() - started


async def _quiet(exc: Exception) -> None:
    """Refused connections while the nodes restart are expected: no traceback per retry."""
    del exc


def restart_run(work: Path, shards: int, index: int) -> dict[str, Any]:
    label = f"restart{shards}-{index}"
    cluster = NatsCluster(work / label, shards=shards)
    cluster.start()
    stores = [f"store-{n:04d}" for n in range(40)]
    try:
        asyncio.run(jetstream_ready(cluster.url, within=60))

        async def setup() -> None:
            nc = await nats.connect(cluster.url.split(","))
            try:
                settings = IngestSettings(url=cluster.url, shards=shards)
                await prepare(nc.jetstream(timeout=30), settings)
            finally:
                await nc.close()

        asyncio.run(setup())
        asyncio.run(acked_everywhere(cluster.url, stores, 60))
        load_before = os.getloadavg()[0]
        for node in cluster.nodes:
            node.kill()
        for node in cluster.nodes:
            node.start(wait=False)
        seconds = asyncio.run(acked_everywhere(cluster.url, stores, 300))
        return {
            "layout": "one stream" if shards == 0 else f"{shards} shards",
            "run": index,
            "restart_to_all_acked_s": round(seconds, 2),
            "load_before": round(load_before, 2),
        }
    finally:
        cluster.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--events", type=int, default=20000)
    parser.add_argument("--stores", type=int, default=200)
    parser.add_argument("--publishers", type=int, default=4)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--pg-url", default=DEFAULT_PG)
    parser.add_argument("--restart-repeats", type=int, default=0)
    args = parser.parse_args()
    print(f"# {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} cpus={os.cpu_count()}")
    n = args.shards
    if args.restart_repeats:
        with tempfile.TemporaryDirectory(prefix="shards-") as tmp:
            for index in range(args.restart_repeats):
                for shards in (0, n):
                    print(json.dumps(restart_run(Path(tmp), shards, index)), flush=True)
        if not args.repeats:
            return
    layouts = [("one stream", 0, 1), (f"one stream x{n} loops", 0, n), (f"{n} shards", n, 1)]
    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="shards-") as tmp, scratch_database(args.pg_url) as db:
        for index in range(args.repeats):
            for layout in layouts:  # alternated: drift hits every layout alike
                result = one_run(Path(tmp), db, layout, args, index)
                print(json.dumps(result), flush=True)
                results.append(result)
    medians = {
        name: {
            key: statistics.median(r[key] for r in results if r["layout"] == name)
            for key in ("publish_per_s", "drain_per_s")
        }
        for name, _, _ in layouts
    }
    base = medians["one stream"]
    ratios = {
        name: {key: round(value / base[key], 2) for key, value in figures.items()}
        for name, figures in medians.items()
    }
    print(json.dumps({"medians": medians, "vs_one_stream": ratios}))


if __name__ == "__main__":
    main()
