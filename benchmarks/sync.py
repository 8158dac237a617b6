"""Benchmark the agent's drain to the central store on PostgreSQL (not a test; prints figures).

    .venv/bin/python -m benchmarks.sync [--events 1000000] [--instances 2] [--concurrency 4]

1. fill: an agent buffer (a real SQLite file) with ``--events`` envelopes (not timed);
2. drain: the real agent (``run_agent``, no sources, the ``Uploader`` component) uploads
   them to ``--instances`` ``customer-store serve`` processes sharing one port
   (``--reuse-port``) on one scratch PostgreSQL database; timed from the agent being ready
   until the buffer holds nothing unsynced; ``customer-store stats`` must count every event;
3. copy: a bare ``COPY`` of the same rows into the same ``events`` table (the ceiling,
   ``benchmarks.store.measure_copy``), and the ratio drain / copy.

``--consent shared`` (default) records profile_sharing for every customer, so ids leave in
clear (the agent forwards the stored JSON); ``none`` makes every customer event leave as a
pseudonym (each envelope parsed and rewritten: the governance cost).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import select
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from benchmarks.figures import Figures, add_png_argument
from benchmarks.local_broker import free_port
from benchmarks.store import (
    DEFAULT_PG,
    make_envelopes,
    make_tokens,
    measure_copy,
    new_schema,
    scratch_database,
    stats_events,
)
from cloud_sync.uploader import Uploader
from edge_agent.app import RunningAgent, run_agent
from edge_agent.buffer import Buffer
from edge_agent.config import Config, config_from_dict
from edge_agent.events import Event

STORE_ID = "store-drain"
FILL_CHUNK = 10_000


@contextlib.contextmanager
def store_instances(db_url: str, count: int, pool_size: int) -> Iterator[int]:
    """``count`` store processes on one port (SO_REUSEPORT); stopped by their own pids."""
    port = free_port()
    procs: list[subprocess.Popen[bytes]] = []
    try:
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
                    str(port),
                    "--reuse-port",
                    "--pool-size",
                    str(pool_size),
                ],
                stdout=subprocess.PIPE,
            )
            procs.append(proc)
            assert proc.stdout is not None
            ready, _, _ = select.select([proc.stdout], [], [], 30)
            line = proc.stdout.readline().decode() if ready else ""
            if not line.startswith("listening"):
                raise RuntimeError(f"store did not start: {line!r}")
        yield port
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait(timeout=15)
            if proc.stdout is not None:
                proc.stdout.close()


def agent_config(data_dir: Path, port: int, token: str, args: argparse.Namespace) -> Config:
    return config_from_dict(
        {
            "agent": {"store_id": STORE_ID, "data_dir": str(data_dir)},
            "http": {"host": "127.0.0.1", "port": 0},
            "buffer": {"max_bytes": 8 * 1024**3, "max_batch": FILL_CHUNK, "synchronous": "normal"},
            "sync": {
                "url": f"http://127.0.0.1:{port}",
                "token": token,
                "batch_size": args.batch_size,
                "concurrency": args.concurrency,
                "interval_s": 30.0,
                "timeout_s": 120.0,
            },
            "governance": {"pseudonym_key": "benchmark-pseudonym-key-0123456789"},
        }
    )


async def fill(config: Config, envelopes: list[dict[str, Any]], consent: str) -> None:
    buffer = await Buffer.open(config.buffer_path, config.buffer)
    try:
        for start in range(0, len(envelopes), FILL_CHUNK):
            chunk = envelopes[start : start + FILL_CHUNK]
            await buffer.commit(
                [Event(customer=item["type"] != "telemetry", **item) for item in chunk]
            )
    finally:
        await buffer.aclose()
    if consent == "shared":
        customers = {item["customer_id"] for item in envelopes if item["customer_id"]}
        with contextlib.closing(sqlite3.connect(config.buffer_path)) as db, db:
            db.executemany(
                "INSERT OR REPLACE INTO consent VALUES (?, 1, 1, 0, '2026-11-01T00:00:00.000Z', ?)",
                [(customer, f"consent-{customer}") for customer in customers],
            )


async def drain(config: Config, total: int, max_seconds: float) -> tuple[float, dict[str, Any]]:
    """Run the agent until its buffer holds nothing unsynced; return seconds and sync status."""
    stop = asyncio.Event()
    ready: asyncio.Future[RunningAgent] = asyncio.get_running_loop().create_future()
    uploader = Uploader(config)
    task = asyncio.create_task(
        run_agent(config, stop, on_ready=ready.set_result, sources=[], components=[uploader])
    )
    agent = await asyncio.wait_for(ready, 60)
    started = time.perf_counter()
    deadline = time.monotonic() + max_seconds
    last_report = 0.0
    while agent.buffer.counters.pending > 0 and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
        if time.monotonic() - last_report > 10:
            last_report = time.monotonic()
            done = total - agent.buffer.counters.pending
            print(f"  ... {done}/{total} after {time.perf_counter() - started:.1f}s", flush=True)
    seconds = time.perf_counter() - started
    status = uploader.status()["sync"]
    stop.set()
    await asyncio.wait_for(task, 60)
    return seconds, status


async def run(args: argparse.Namespace) -> None:
    envelopes = make_envelopes(args.events, STORE_ID)
    with (
        tempfile.TemporaryDirectory(prefix="sync-bench-") as tmp,
        scratch_database(args.pg_url) as db,
    ):
        url = new_schema(db, "drain")
        (token,) = await make_tokens(url, [STORE_ID])
        with store_instances(url, args.instances, args.pool_size) as port:
            config = agent_config(Path(tmp), port, token, args)
            started = time.perf_counter()
            await fill(config, envelopes, args.consent)
            print(f"fill: events={args.events} seconds={time.perf_counter() - started:.1f}")
            seconds, status = await drain(config, args.events, args.max_seconds)
        stored = await stats_events(url)
        rate = status["sent"] / seconds
        print(
            f"drain/agent->store: events={status['sent']} stored={stored}"
            f" duplicates={status['duplicates']} rejected={status['rejected']}"
            f" errors={status['errors']} batch={args.batch_size}"
            f" concurrency={args.concurrency} instances={args.instances}"
            f" consent={args.consent} seconds={seconds:.2f} events/s={rate:,.0f}"
        )
        if stored != args.events:
            print(f"WARNING: the store holds {stored} events, expected {args.events}")
        ceiling = await measure_copy(db, envelopes)
        print(
            f"copy: events={ceiling.events} seconds={ceiling.seconds:.2f}"
            f" events/s={ceiling.rate:,.0f}"
        )
        print(f"ratio drain/copy: {rate / ceiling.rate:.2f}")
        if args.png:
            figures = Figures(f"Sync drain of {args.events:,} events", "events/s")
            figures.add("agent -> store, end to end", rate)
            figures.add("bare COPY (ceiling)", ceiling.rate)
            figures.write_png(args.png)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pg-url", default=DEFAULT_PG, help="a PostgreSQL server (any db)")
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--instances", type=int, default=2, help="store processes, one port")
    parser.add_argument("--pool-size", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=5000, help="sync.batch_size")
    parser.add_argument("--concurrency", type=int, default=4, help="sync.concurrency")
    parser.add_argument("--consent", choices=["shared", "none"], default="shared")
    parser.add_argument("--max-seconds", type=float, default=900.0)
    add_png_argument(parser)
    asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    main()
