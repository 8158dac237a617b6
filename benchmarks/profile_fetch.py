"""Benchmark ``GET /v1/profiles/{id}`` on PostgreSQL (not a test; prints figures).

    .venv/bin/python benchmarks/profile_fetch.py [--customers 5000] [--events-per-customer 40]
        [--agents 200] [--fetches 4000] [--instances 1]

A scratch database (dropped at the end) is filled through the backend's ingest: customers
with a consent record (nine in ten granting personalization and profile sharing) and their
events across 20 stores. Then, against ``--instances`` real ``customer-store serve``
processes:
- loopback: one agent fetching profiles one after another: latency p50/p99;
- fleet: ``--agents`` agents (each its own token and connection), first paced (one fetch
  per agent every ``--interval-s``, as stores identifying customers), then saturated (each
  asks again as soon as answered): latency p50/p99 and fetches/s;
and the plan PostgreSQL chooses for the interactions query (EXPLAIN ANALYZE).
"""

from __future__ import annotations

import argparse
import asyncio
import random
import time
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp
import psycopg

from benchmarks.figures import Figures, add_png_argument
from benchmarks.store import (
    DEFAULT_PG,
    StoreProcesses,
    make_tokens,
    new_schema,
    percentile,
    rows_of,
    scratch_database,
)
from cloud_sync.store.backend import open_backend
from cloud_sync.store.db_postgres import PROFILE_FACTS
from cloud_sync.store.profiles import INTERACTION_TYPES
from cloud_sync.store.records import PSEUDONYM_REGEX

STORES = [f"store-{n:03d}" for n in range(20)]
TYPES = ("product.pickup", "kiosk.view", "basket.add", "product.scan", "suggestion.shown")


def customer_events(customer: str, count: int, rng: random.Random) -> dict[str, list[Any]]:
    """One customer's envelopes, grouped by the store that uploads them."""
    base = datetime(2026, 11, 1, tzinfo=UTC)
    granted = rng.random() < 0.9
    by_store: dict[str, list[Any]] = {}
    home = rng.choice(STORES)
    flags = {"personalization": granted, "profile_sharing": granted, "partner_sharing": False}
    for n in range(count + 1):
        store = home if rng.random() < 0.6 else rng.choice(STORES)
        moment = base + timedelta(minutes=rng.randrange(60 * 24 * 25))
        event_type = "consent.update" if n == 0 else rng.choice(TYPES)
        if event_type == "consent.update":
            data: dict[str, Any] = flags
            moment = base
        elif event_type == "suggestion.shown":
            data = {"suggestion_id": str(uuid.uuid4()), "items": ["SKU-1"], "source": "model"}
        else:
            data = {"sku": f"SKU-{rng.randrange(2000):05d}"}
        by_store.setdefault(store, []).append(
            {
                "event_id": str(uuid.uuid4()),
                "type": event_type,
                "ts": moment.strftime("%Y-%m-%dT%H:%M:%S.000Z"),
                "store_id": store,
                "device_id": "dev-1",
                "customer_id": customer,
                "source": f"mqtt:edge/{store}/devices/dev-1/events",
                "schema": 1,
                "data": data,
            }
        )
    return by_store


async def seed(db_url: str, customers: int, per_customer: int) -> list[str]:
    rng = random.Random(7)
    ids = [f"c-{n:07d}" for n in range(customers)]
    backend = await open_backend(db_url, pool_size=2)
    try:
        pending: dict[str, list[Any]] = {}
        started = time.perf_counter()
        for customer in ids:
            for store, events in customer_events(customer, per_customer, rng).items():
                pending.setdefault(store, []).extend(events)
                if len(pending[store]) >= 5000:
                    await backend.ingest(rows_of(pending.pop(store)), datetime.now(UTC))
        for events in pending.values():
            await backend.ingest(rows_of(events), datetime.now(UTC))
        total = (await backend.stats()).events
        print(
            f"seeded {total:,} events of {customers:,} customers in"
            f" {time.perf_counter() - started:.1f} s"
        )
    finally:
        await backend.close()
    return ids


async def fetch_loop(
    url: str,
    token: str,
    customers: Sequence[str],
    count: int,
    latencies: list[float],
    statuses: dict[int, int],
    interval_s: float = 0.0,
) -> None:
    """``count`` fetches, back to back, or one every ``interval_s`` (random phase)."""
    rng = random.Random(token)
    headers = {"Authorization": f"Bearer {token}"}
    async with aiohttp.ClientSession(base_url=url, headers=headers) as session:
        # An agent keeps its connection: the first fetch opens it and is not counted.
        async with session.get(f"/v1/profiles/{rng.choice(customers)}") as response:
            await response.read()
        next_at = time.perf_counter() + rng.random() * interval_s
        for _ in range(count):
            if interval_s:
                await asyncio.sleep(max(0.0, next_at - time.perf_counter()))
                next_at += interval_s
            customer = rng.choice(customers)
            started = time.perf_counter()
            async with session.get(f"/v1/profiles/{customer}") as response:
                await response.read()
                statuses[response.status] = statuses.get(response.status, 0) + 1
            latencies.append((time.perf_counter() - started) * 1000)


def report(label: str, latencies: list[float], seconds: float, statuses: dict[int, int]) -> None:
    rate = len(latencies) / seconds
    print(
        f"{label}: {len(latencies):,} fetches in {seconds:.1f} s = {rate:,.0f}/s;"
        f" p50 {percentile(latencies, 0.5):.1f} ms, p99 {percentile(latencies, 0.99):.1f} ms;"
        f" statuses {dict(sorted(statuses.items()))}"
    )


def explain(db_url: str, customer: str) -> None:
    with psycopg.connect(db_url) as conn:
        plan = conn.execute(
            "EXPLAIN (ANALYZE, COSTS OFF) " + PROFILE_FACTS,
            {
                "customer_id": customer,
                "max_ids": 256,
                "pseudonym": PSEUDONYM_REGEX,
                "types": list(INTERACTION_TYPES),
                "limit": 200,
            },
        ).fetchall()
    print("profile query plan:")
    for (line,) in plan:
        print("   ", line)


async def run(args: argparse.Namespace) -> None:
    figures = Figures("GET /v1/profiles latency", "ms")
    with scratch_database(args.pg) as database:
        db_url = new_schema(database, "bench")
        customers = await seed(db_url, args.customers, args.events_per_customer)
        explain(db_url, customers[len(customers) // 2])
        agent_stores = [f"agent-{n:04d}" for n in range(args.agents)]
        tokens = await make_tokens(db_url, agent_stores)
        stores = StoreProcesses(db_url, args.instances, args.pool_size)
        try:
            url = f"http://127.0.0.1:{stores.ports[0]}"
            latencies: list[float] = []
            statuses: dict[int, int] = {}
            await fetch_loop(url, tokens[0], customers, 100, [], {})  # warm up
            started = time.perf_counter()
            await fetch_loop(url, tokens[0], customers, args.fetches, latencies, statuses)
            report("loopback, 1 agent", latencies, time.perf_counter() - started, statuses)
            figures.add("1 agent p50", percentile(latencies, 0.5))
            figures.add("1 agent p99", percentile(latencies, 0.99))

            # Paced: each agent asks once per --interval-s (customers being identified), then
            # saturated: each agent asks again as soon as it has its answer.
            for interval, name in ((args.interval_s, "paced"), (0.0, "saturated")):
                latencies, statuses = [], {}
                per_agent = max(1, args.fetches // args.agents)
                started = time.perf_counter()
                await asyncio.gather(
                    *(
                        fetch_loop(
                            f"http://127.0.0.1:{stores.ports[n % len(stores.ports)]}",
                            token,
                            customers,
                            per_agent,
                            latencies,
                            statuses,
                            interval,
                        )
                        for n, token in enumerate(tokens)
                    )
                )
                label = f"{args.agents} agents {name}, {args.instances} instance(s)"
                report(label, latencies, time.perf_counter() - started, statuses)
                figures.add(f"{args.agents} agents {name} p50", percentile(latencies, 0.5))
                figures.add(f"{args.agents} agents {name} p99", percentile(latencies, 0.99))
        finally:
            stores.stop()
    if args.png is not None:
        figures.write_png(args.png)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--pg", default=DEFAULT_PG, help="a PostgreSQL server (scratch db)")
    parser.add_argument("--customers", type=int, default=5000)
    parser.add_argument("--events-per-customer", type=int, default=40)
    parser.add_argument("--agents", type=int, default=200)
    parser.add_argument("--fetches", type=int, default=4000)
    parser.add_argument("--instances", type=int, default=1)
    parser.add_argument(
        "--interval-s", type=float, default=1.0, help="paced phase: one fetch per agent this often"
    )
    parser.add_argument("--pool-size", type=int, default=10)
    add_png_argument(parser)
    asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    main()
