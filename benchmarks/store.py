"""Benchmark the central store on PostgreSQL (not a test; prints figures).

    .venv/bin/python benchmarks/store.py [--events 100000] [--agents 200] [--instances 1]

Three measurements, each into its own schema of one scratch database (dropped at the end):
- fleet: ``--agents`` simulated agents (one aiohttp session, token and store each) post
  gzip batches to ``--instances`` store processes on one PostgreSQL; aggregate events/s and
  request latency percentiles;
- drain: ``--events`` envelopes through the store's HTTP ingest path in large batches, and
  through the backend's ``ingest`` alone (no HTTP), against
- copy: a bare ``COPY`` of the same rows into the same ``events`` table, the ceiling.

``measure_copy(pg_url, envelopes)`` is importable, so the agent's drain benchmark can print
the same ceiling next to its end-to-end figure.
"""

from __future__ import annotations

import argparse
import asyncio
import gzip
import json
import os
import random
import select
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

import aiohttp
import psycopg
from psycopg import sql

from benchmarks.figures import Figures, add_png_argument
from cloud_sync.envelope_schema import default_registry
from cloud_sync.store import auth
from cloud_sync.store.backend import open_backend
from cloud_sync.store.db_postgres import event_records
from cloud_sync.store.ingest import to_row
from cloud_sync.store.records import EventRow

DEFAULT_PG = os.environ.get("EDGE_TEST_PG_URL", "postgresql://postgres@127.0.0.1:5432/test")
COPY_SQL = (
    "COPY events (event_id, type, ts, store_id, device_id, customer_id, source, schema, data,"
    " received_at) FROM STDIN"
)
TYPES = ("product.pickup", "kiosk.view", "basket.add", "suggestion.shown", "telemetry")


def make_envelopes(count: int, store_id: str, start: int = 0) -> list[dict[str, Any]]:
    """Realistic envelopes: mostly customer events over 1,000 customers, some telemetry."""
    base = datetime(2026, 11, 1, tzinfo=UTC)
    out = []
    for i in range(start, start + count):
        kind = TYPES[i % len(TYPES)]
        data: dict[str, Any] = {"sku": f"SKU-{i % 5000:06d}", "weight_g": 400 + i % 50}
        if kind == "suggestion.shown":
            data = {
                "suggestion_id": f"s-{i}",
                "items": ["SKU-000001", "SKU-000002"],
                "source": "model",
                "model_version": "2026.11.1",
            }
        elif kind == "telemetry":
            data = {"values": {"temp_c": 4.0 + (i % 10) / 10}}
        ts = (base + timedelta(milliseconds=i * 37)).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"
        out.append(
            {
                "event_id": str(uuid.uuid4()),
                "type": kind,
                "ts": ts,
                "store_id": store_id,
                "device_id": f"shelf-{i % 40:02d}",
                "customer_id": None if kind == "telemetry" else f"c-{i % 1000:06d}",
                "source": f"mqtt:edge/{store_id}/devices/shelf-{i % 40:02d}/events",
                "schema": 1,
                "data": data,
                "received_at": ts,
            }
        )
    return out


def with_schema(url: str, schema: str) -> str:
    parts = urlsplit(url)
    option = "options=" + quote(f"-csearch_path={schema}", safe="")
    return urlunsplit(parts._replace(query=f"{parts.query}&{option}" if parts.query else option))


@contextmanager
def scratch_database(server_url: str) -> Iterator[str]:
    """A uniquely named database, dropped on exit (only the one created here)."""
    name = f"cstore_bench_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(server_url, autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        try:
            yield urlunsplit(urlsplit(server_url)._replace(path="/" + name))
        finally:
            admin.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(name)))


def new_schema(db_url: str, name: str) -> str:
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(name)))
    return with_schema(db_url, name)


@dataclass
class CopyResult:
    events: int
    seconds: float

    @property
    def rate(self) -> float:
        return self.events / self.seconds


def rows_of(envelopes: Sequence[Mapping[str, Any]]) -> list[EventRow]:
    registry = default_registry()
    rows = []
    for envelope in envelopes:
        row, reason = to_row(dict(envelope), registry)
        if row is None:
            raise ValueError(f"invalid envelope {envelope.get('event_id')}: {reason}")
        rows.append(row)
    return rows


async def measure_copy(pg_url: str, envelopes: Sequence[Mapping[str, Any]]) -> CopyResult:
    """Bare COPY of ``envelopes`` into a fresh copy of the store's ``events`` table.

    ``pg_url`` names a database; a scratch schema is made there, migrated, and dropped.
    Only the COPY (and its commit) is timed; turning envelopes into rows is not.
    """
    schema = f"copy_{uuid.uuid4().hex[:10]}"
    url = new_schema(pg_url, schema)
    try:
        backend = await open_backend(url, pool_size=1)  # creates the same table, same indexes
        await backend.close()
        records = event_records(rows_of(envelopes))
        async with await psycopg.AsyncConnection.connect(url) as conn:
            started = time.perf_counter()
            async with conn.cursor() as cur, cur.copy(COPY_SQL) as copy:
                for record in records:
                    await copy.write_row(record)
            await conn.commit()
            seconds = time.perf_counter() - started
    finally:
        with psycopg.connect(pg_url, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP SCHEMA {} CASCADE").format(sql.Identifier(schema)))
    return CopyResult(len(records), seconds)


class StoreProcesses:
    """``customer-store serve`` processes on one database; stopped by their own pids."""

    def __init__(self, db_url: str, count: int, pool_size: int) -> None:
        self.procs: list[subprocess.Popen[bytes]] = []
        self.ports: list[int] = []
        for _ in range(count):
            proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "cloud_sync.store",
                    "--log-level",
                    "WARNING",
                    "serve",
                    "--db",
                    db_url,
                    "--port",
                    "0",
                    "--pool-size",
                    str(pool_size),
                    "--max-events",
                    "20000",
                    "--max-body-bytes",
                    str(64 * 1024 * 1024),
                ],
                stdout=subprocess.PIPE,
            )
            self.procs.append(proc)
            assert proc.stdout is not None
            ready, _, _ = select.select([proc.stdout], [], [], 20)
            line = proc.stdout.readline().decode() if ready else ""
            if not line.startswith("listening"):
                self.stop()
                raise RuntimeError(f"store did not start: {line!r}")
            self.ports.append(int(line.strip().rsplit(":", 1)[1]))

    def stop(self) -> None:
        for proc in self.procs:
            proc.terminate()
        for proc in self.procs:
            proc.wait(timeout=15)
            if proc.stdout is not None:
                proc.stdout.close()


async def make_tokens(db_url: str, stores: Sequence[str]) -> list[str]:
    backend = await open_backend(db_url, pool_size=2)
    try:
        return [
            await auth.create_credential(backend, "agent", name=f"bench-{s}", store_id=s)
            for s in stores
        ]
    finally:
        await backend.close()


async def stats_events(db_url: str) -> int:
    backend = await open_backend(db_url, pool_size=1)
    try:
        return (await backend.stats()).events
    finally:
        await backend.close()


def percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


async def post_all(
    port: int,
    token: str,
    bodies: Sequence[bytes],
    latencies: list[float],
    deadline: float,
    interval_s: float = 0.0,
) -> int:
    """One agent: its batches in order, each retried (bounded) until a 2xx.

    ``interval_s`` > 0 paces the agent (open loop: one batch per interval, random phase);
    0 sends as fast as the store answers (closed loop, saturation).
    """
    next_at = time.monotonic() + random.uniform(0, interval_s)
    headers = {
        "Authorization": f"Bearer {token}",
        "Content-Type": "application/json",
        "Content-Encoding": "gzip",
    }
    url = f"http://127.0.0.1:{port}/v1/events"
    sent = 0
    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        for body in bodies:
            if interval_s > 0:
                await asyncio.sleep(max(0.0, next_at - time.monotonic()))
                next_at += interval_s
            for _attempt in range(5):
                if time.monotonic() > deadline:
                    return sent
                started = time.perf_counter()
                try:
                    async with session.post(url, data=body, headers=headers) as response:
                        answer = await response.json()
                except (aiohttp.ClientError, TimeoutError) as exc:
                    print(f"request failed, retrying: {exc!r}", file=sys.stderr)
                    continue
                latencies.append(time.perf_counter() - started)
                if response.status == 200:
                    sent += answer["accepted"] + answer["duplicates"]
                    break
    return sent


async def fleet(db_url: str, args: argparse.Namespace, figures: Figures) -> None:
    stores = [f"store-{n:03d}" for n in range(args.agents)]
    tokens = await make_tokens(db_url, stores)
    per_agent = args.events // args.agents
    bodies = [
        [
            gzip.compress(json.dumps(chunk).encode())
            for chunk in chunked(make_envelopes(per_agent, store), args.batch)
        ]
        for store in stores
    ]
    store = StoreProcesses(db_url, args.instances, args.pool_size)
    latencies: list[float] = []
    try:
        deadline = time.monotonic() + args.max_seconds
        started = time.perf_counter()
        sent = await asyncio.gather(
            *(
                post_all(
                    store.ports[n % len(store.ports)],
                    tokens[n],
                    bodies[n],
                    latencies,
                    deadline,
                    args.interval_s,
                )
                for n in range(args.agents)
            )
        )
        seconds = time.perf_counter() - started
    finally:
        store.stop()
    stored = await stats_events(db_url)
    print(
        f"fleet: agents={args.agents} instances={args.instances} batch={args.batch}"
        f" interval_s={args.interval_s}"
        f" events={sum(sent)} stored={stored} seconds={seconds:.2f}"
        f" events/s={sum(sent) / seconds:,.0f} requests={len(latencies)}"
        f" p50_ms={percentile(latencies, 0.50) * 1000:.1f}"
        f" p99_ms={percentile(latencies, 0.99) * 1000:.1f}"
        f" max_ms={max(latencies, default=0) * 1000:.1f}"
    )
    figures.add(f"fleet of {args.agents} agents", sum(sent) / seconds)


async def drain(
    db_url: str,
    direct_url: str,
    envelopes: list[dict[str, Any]],
    args: argparse.Namespace,
    figures: Figures,
) -> float:
    """The store's HTTP ingest path with large batches, and the backend alone."""
    (token,) = await make_tokens(db_url, ["store-drain"])
    bodies = [gzip.compress(json.dumps(c).encode()) for c in chunked(envelopes, args.drain_batch)]
    store = StoreProcesses(db_url, args.instances, args.pool_size)
    latencies: list[float] = []
    try:
        deadline = time.monotonic() + args.max_seconds
        started = time.perf_counter()
        lanes = [bodies[i :: args.drain_concurrency] for i in range(args.drain_concurrency)]
        sent = await asyncio.gather(
            *(
                post_all(store.ports[n % len(store.ports)], token, lane, latencies, deadline)
                for n, lane in enumerate(lanes)
            )
        )
        http_seconds = time.perf_counter() - started
    finally:
        store.stop()
    http_rate = sum(sent) / http_seconds
    figures.add("drain over HTTP", http_rate)
    print(
        f"drain/http: events={sum(sent)} batch={args.drain_batch}"
        f" concurrency={args.drain_concurrency} instances={args.instances}"
        f" seconds={http_seconds:.2f}"
        f" events/s={http_rate:,.0f}"
    )

    rows = rows_of(envelopes)
    backend = await open_backend(direct_url, pool_size=2)
    try:
        started = time.perf_counter()
        for chunk in chunked(rows, args.drain_batch):
            await backend.ingest(chunk, datetime.now(UTC))
        direct_seconds = time.perf_counter() - started
    finally:
        await backend.close()
    print(
        f"drain/backend.ingest (no HTTP, no JSON): events={len(rows)}"
        f" seconds={direct_seconds:.2f} events/s={len(rows) / direct_seconds:,.0f}"
    )
    figures.add("backend.ingest, no HTTP", len(rows) / direct_seconds)
    return http_rate


def chunked(items: Sequence[Any], size: int) -> list[Sequence[Any]]:
    return [items[i : i + size] for i in range(0, len(items), size)]


async def run(args: argparse.Namespace) -> None:
    figures = Figures("Central store on PostgreSQL", "events/s")
    with scratch_database(args.pg_url) as db:
        if "fleet" in args.only:
            await fleet(new_schema(db, "fleet"), args, figures)
        if "drain" in args.only:
            envelopes = make_envelopes(args.events, "store-drain")
            http_rate = await drain(
                new_schema(db, "drain"), new_schema(db, "direct"), envelopes, args, figures
            )
            ceiling = await measure_copy(db, envelopes)
            print(
                f"copy: events={ceiling.events} seconds={ceiling.seconds:.2f}"
                f" events/s={ceiling.rate:,.0f}"
            )
            print(f"ratio drain/http to copy: {http_rate / ceiling.rate:.2f}")
            figures.add("bare COPY (ceiling)", ceiling.rate)
    if args.png:
        figures.write_png(args.png)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pg-url", default=DEFAULT_PG, help="a PostgreSQL server (any db)")
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--agents", type=int, default=200)
    parser.add_argument("--batch", type=int, default=100, help="fleet batch size")
    parser.add_argument(
        "--interval-s", type=float, default=0.0, help="fleet: seconds between an agent's batches"
    )
    parser.add_argument("--instances", type=int, default=1, help="store processes, one database")
    parser.add_argument("--pool-size", type=int, default=10)
    parser.add_argument("--drain-batch", type=int, default=5000)
    parser.add_argument("--drain-concurrency", type=int, default=2)
    parser.add_argument("--max-seconds", type=float, default=180.0, help="per measurement")
    parser.add_argument("--only", nargs="+", default=["fleet", "drain"], choices=["fleet", "drain"])
    add_png_argument(parser)
    asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    main()
