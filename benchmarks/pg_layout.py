"""Benchmark the PostgreSQL layouts of ``events`` side by side (not a test; prints figures).

    .venv/bin/python -m benchmarks.pg_layout [--rows 1000000] [--grow-to 2000000]
        [--days 30] [--batches 20] [--reads 300] [--hash 4]

One scratch database (dropped at the end), three schemas filled the same way:
- ``old``: migrations 1-5, one unpartitioned table, unique (store_id, event_id);
- ``week``: every migration (6: partitioned by ingest time, keys claimed in ``event_keys``),
  7-day partitions (the store's default) over the ``--days`` holding the rows;
- ``day``: the same with one partition a day;
- ``day+hash``: the same with each day sub-partitioned by hash(store_id) into ``--hash``.

Ingest: batches of 100 and 500 events (the agent's ``sync.batch_size`` is 500) through the
store's own transaction (erasure lookup, COPY into the staging table, the move statement),
layouts interleaved batch by batch: rows/s and the PostgreSQL backend's CPU per 1k events
(from /proc of the server process serving the connection; the server runs on this machine).
Reads, at ``--rows`` and again at ``--grow-to`` rows (new customers, 20 events each, spread
over the same days): ``GET /v1/profiles`` (PROFILE_FACTS), a customer's first events page,
a feed page (seq cursor) and the feed's high-water mark, p50/p99 over ``--reads`` calls.
Last, migration 6 converts an old-layout store of ``--migrate-rows`` events: seconds, rows kept.
Ratios are against ``old`` in the same run; the machine is shared, so read ratios.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import statistics
import time
import uuid
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
from psycopg import sql

from benchmarks.figures import Figures, add_png_argument
from benchmarks.store import DEFAULT_PG, new_schema, percentile, scratch_database
from cloud_sync.store import migrations, partitions
from cloud_sync.store.backend import open_backend
from cloud_sync.store.db_postgres import (
    COLUMNS,
    COPY_STAGING,
    CREATE_STAGING,
    FEED_LOCK,
    MOVE_STAGED,
    PROFILE_FACTS,
    event_records,
)
from cloud_sync.store.profiles import INTERACTION_TYPES
from cloud_sync.store.records import PSEUDONYM_REGEX, EventRow
from cloud_sync.store.sql_shared import MAX_IDENTITIES

# The move before migration 6 (one table holding the unique key).
OLD_MOVE = (
    f"INSERT INTO events ({COLUMNS}) SELECT {COLUMNS} FROM ingest_staging"
    " ORDER BY store_id, event_id ON CONFLICT (store_id, event_id) DO NOTHING"
)
LAYOUTS = ("old", "week", "day", "day+hash")
PER_CUSTOMER = 20
STORES = 1000
TICK = os.sysconf("SC_CLK_TCK")
# The store's reads, as db_postgres issues them.
CUSTOMER_PAGE = (
    "SELECT seq, event_id, type, ts, store_id, device_id, customer_id, source, schema, data"
    " FROM events WHERE customer_id = ANY(%s) ORDER BY ts, seq LIMIT 100"
)
FEED_PAGE = (
    "SELECT seq, event_id, type, ts, store_id, device_id, customer_id, source, schema, data"
    " FROM events WHERE seq > %s AND customer_id IS NOT NULL ORDER BY seq LIMIT 500"
)
HIGH_WATER = "SELECT coalesce(max(seq), 0) FROM events"


def fill_sql(lo: int, hi: int, customers_from: int, days: int) -> tuple[str, tuple[Any, ...]]:
    """Rows lo..hi-1: customers customers_from.. (PER_CUSTOMER events each, spread over the
    ``days`` before now), 1000 stores, a sku in data."""
    count = (hi - lo) // PER_CUSTOMER
    return (
        "INSERT INTO events (event_id, type, ts, store_id, device_id, customer_id, source,"
        " schema, data, ingested_at) SELECT 'e-' || i, (%s::text[])[1 + i %% 5],"
        " at - interval '1 minute',"
        " 's-' || (i %% %s), 'shelf-1', 'c-' || (%s + i %% %s), 'mqtt:t', 1,"
        " jsonb_build_object('sku', 'SKU-' || (i %% 400)), at FROM generate_series(%s, %s - 1) i,"
        # A spread that depends on i (an uncorrelated random() would be computed once).
        " LATERAL (SELECT now() - ((i::bigint * 7919) %% (%s * 86400))"
        " * interval '1 second' AS at) t",
        (list(INTERACTION_TYPES)[:5], STORES, customers_from, count, lo, hi, days),
    )


def keys_sql(lo: int, hi: int) -> tuple[str, tuple[Any, ...]]:
    return (
        "INSERT INTO event_keys SELECT 's-' || (i %% %s), 'e-' || i"
        " FROM generate_series(%s, %s - 1) i",
        (STORES, lo, hi),
    )


async def make_layout(db_url: str, layout: str, days: int, hash_parts: int) -> str:
    url = new_schema(db_url, f"l_{layout.replace('+', '_')}_{uuid.uuid4().hex[:6]}")
    if layout == "old":
        with psycopg.connect(url) as conn:
            conn.execute(migrations.POSTGRES_LEDGER)
            for migration in migrations.MIGRATIONS:
                if migration.version <= 5:  # the last version of the old layout
                    for statement in migration.postgres:
                        conn.execute(statement)
        return url
    backend = await open_backend(url, pool_size=1)  # every migration, partitions ahead
    await backend.close()
    now = datetime.now(UTC)
    with psycopg.connect(url, autocommit=True) as conn:  # empty: replaced below
        for name in conn.execute(
            "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid"
            " WHERE i.inhparent = to_regclass('events') AND c.relname <> 'events_default'"
        ).fetchall():
            conn.execute(sql.SQL("DROP TABLE {}").format(sql.Identifier(name[0])))
    if layout != "day+hash":
        async with await psycopg.AsyncConnection.connect(url, autocommit=True) as aconn:
            span = 7 if layout == "week" else 1
            await partitions.create_ahead(aconn, now - timedelta(days=days), days + 8, span)
        return url
    with psycopg.connect(url, autocommit=True) as conn:
        for offset in range(-days, 8):
            day = (now + timedelta(days=offset)).date()
            partition = sql.Identifier(partitions.day_name(day))
            lo, hi = partitions.midnight(day), partitions.midnight(day + timedelta(days=1))
            conn.execute(
                sql.SQL(
                    "CREATE TABLE {} PARTITION OF events FOR VALUES FROM ({}) TO ({})"
                    " PARTITION BY HASH (store_id)"
                ).format(partition, sql.Literal(lo), sql.Literal(hi))
            )
            for h in range(hash_parts):
                conn.execute(
                    sql.SQL(
                        "CREATE TABLE {} PARTITION OF {} FOR VALUES WITH (MODULUS {}, REMAINDER {})"
                    ).format(
                        sql.Identifier(f"{partitions.day_name(day)}_h{h}"),
                        name,
                        sql.Literal(hash_parts),
                        sql.Literal(h),
                    )
                )
    return url


def fill(url: str, layout: str, lo: int, hi: int, customers_from: int, days: int) -> float:
    started = time.perf_counter()
    with psycopg.connect(url, autocommit=True) as conn:
        step = 250_000
        for start in range(lo, hi, step):
            end = min(hi, start + step)
            query, params = fill_sql(
                start, end, customers_from + (start - lo) // PER_CUSTOMER, days
            )
            conn.execute(query, params)
            if layout != "old":
                conn.execute(*keys_sql(start, end))
        conn.execute("VACUUM ANALYZE events")
        if layout != "old":
            conn.execute("VACUUM ANALYZE event_keys")
    return time.perf_counter() - started


def batch_rows(prefix: str, size: int, rng: random.Random) -> list[EventRow]:
    now = datetime.now(UTC)
    return [
        EventRow(
            event_id=f"{prefix}-{i}",
            type="product.picked_up",
            ts=now,
            store_id=f"s-{rng.randrange(STORES)}",
            device_id="shelf-1",
            customer_id=f"c-new-{rng.randrange(100_000)}",
            source="mqtt:t",
            schema=1,
            data_json='{"sku": "SKU-1"}',
            received_at=None,
            alias=None,
        )
        for i in range(size)
    ]


def server_cpu_s(pid: int) -> float:
    with open(f"/proc/{pid}/stat", encoding="ascii") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK  # utime + stime


async def ingest_once(conn: psycopg.AsyncConnection[Any], move: str, rows: list[EventRow]) -> int:
    """The store's ingest transaction (db_postgres.PostgresBackend.ingest, without links)."""
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock_shared(%s)", (FEED_LOCK,))
        customers = sorted({r.customer_id for r in rows if r.customer_id})
        await conn.execute(
            "SELECT customer_id, max(requested_at) FROM erasures WHERE customer_id = ANY(%s)"
            " GROUP BY customer_id",
            (customers,),
        )
        async with conn.cursor() as cur:
            async with cur.copy(COPY_STAGING) as copy:
                for record in event_records(rows):
                    await copy.write_row(record)
            await cur.execute(move)
            return cur.rowcount


async def ingest_phase(urls: dict[str, str], sizes: Sequence[int], batches: int) -> dict[str, Any]:
    conns: dict[str, psycopg.AsyncConnection[Any]] = {}
    pids: dict[str, int] = {}
    for layout, url in urls.items():
        conn = await psycopg.AsyncConnection.connect(url, autocommit=True)
        await conn.execute(CREATE_STAGING)
        row = await (await conn.execute("SELECT pg_backend_pid()")).fetchone()
        assert row is not None
        conns[layout], pids[layout] = conn, int(row[0])
    rng = random.Random(7)
    out: dict[str, Any] = {}
    try:
        for size in sizes:
            seconds: dict[str, list[float]] = {k: [] for k in urls}
            # Each layout has its own connection, so its server process's CPU over the
            # phase is that layout's alone (/proc counts in ticks: summed, not per batch).
            cpu0 = {layout: server_cpu_s(pid) for layout, pid in pids.items()}
            last: dict[str, list[EventRow]] = {}
            for n in range(batches):
                for layout in urls:
                    rows = batch_rows(f"b{size}-{n}", size, rng)
                    move = OLD_MOVE if layout == "old" else MOVE_STAGED
                    t0 = time.perf_counter()
                    stored = await ingest_once(conns[layout], move, rows)
                    seconds[layout].append(time.perf_counter() - t0)
                    assert stored == size, (layout, stored)
                    last[layout] = rows
            cpu = {layout: server_cpu_s(pid) - cpu0[layout] for layout, pid in pids.items()}
            for layout in urls:  # a resend stores nothing (outside the figures)
                move = OLD_MOVE if layout == "old" else MOVE_STAGED
                again = await ingest_once(conns[layout], move, last[layout])
                assert again == 0, (layout, again)
            for layout in urls:
                med = statistics.median(seconds[layout])
                out[f"{layout} {size}"] = {
                    "rows_s": size / med,
                    "p99_ms": percentile(seconds[layout], 0.99) * 1000,
                    "cpu_ms_per_1k": cpu[layout] / (size * batches) * 1e6,
                }
    finally:
        for conn in conns.values():
            await conn.close()
    return out


async def measure_migration(db_url: str, rows: int, days: int) -> tuple[float, int]:
    """Migration 6 on a store of the old layout holding ``rows`` events: seconds, rows kept."""
    url = await make_layout(db_url, "old", days, 0)
    fill(url, "old", 0, rows, 0, days)
    with psycopg.connect(url) as conn:
        conn.execute(
            "INSERT INTO schema_migrations (version, name) SELECT v, 'old' FROM"
            " generate_series(1, 5) v"
        )
    started = time.perf_counter()
    backend = await open_backend(url, pool_size=1)  # migration 6, then partitions ahead
    seconds = time.perf_counter() - started
    await backend.close()
    with psycopg.connect(url) as conn:
        found = conn.execute("SELECT count(*) FROM events").fetchone()
    return seconds, int(found[0]) if found else 0


def bytes_per_row(url: str, rows: int) -> float:
    """Heap, TOAST and indexes of events (all partitions) and event_keys, per stored row."""
    with psycopg.connect(url) as conn:
        found = conn.execute(
            "SELECT coalesce(sum(pg_total_relation_size(c.oid)), 0) FROM pg_class c"
            " JOIN pg_namespace n ON n.oid = c.relnamespace"
            " WHERE n.nspname = current_schema() AND c.relkind = 'r'"
            " AND (c.relname LIKE 'events%' OR c.relname = 'event_keys')"
        ).fetchone()
    return int(found[0]) / rows if found else 0.0


def timed(work: Callable[[], object], count: int) -> tuple[float, float]:
    spent = []
    for _ in range(count):
        t0 = time.perf_counter()
        work()
        spent.append(time.perf_counter() - t0)
    return statistics.median(spent) * 1000, percentile(spent, 0.99) * 1000


def read_phase(url: str, customers: int, reads: int) -> dict[str, tuple[float, float]]:
    rng = random.Random(11)
    with psycopg.connect(url, autocommit=True) as conn:
        top_row = conn.execute(HIGH_WATER).fetchone()
        top = int(top_row[0]) if top_row else 0

        def profile() -> None:
            params = {
                "customer_id": f"c-{rng.randrange(customers)}",
                "max_ids": MAX_IDENTITIES,
                "pseudonym": PSEUDONYM_REGEX,
                "types": list(INTERACTION_TYPES),
                "limit": 200,
            }
            conn.execute(PROFILE_FACTS, params).fetchall()

        def page() -> None:
            conn.execute(CUSTOMER_PAGE, ([f"c-{rng.randrange(customers)}"],)).fetchall()

        def feed() -> None:
            conn.execute(FEED_PAGE, (rng.randrange(max(1, top - 1000)),)).fetchall()

        def high_water() -> None:
            conn.execute(HIGH_WATER).fetchall()

        for _ in range(20):  # warm the caches
            profile()
        return {
            "profile": timed(profile, reads),
            "customer page": timed(page, reads),
            "feed page": timed(feed, reads),
            "high water": timed(high_water, reads),
        }


def profile_plan(url: str) -> str:
    with psycopg.connect(url) as conn:
        params = {
            "customer_id": "c-1",
            "max_ids": MAX_IDENTITIES,
            "pseudonym": PSEUDONYM_REGEX,
            "types": list(INTERACTION_TYPES),
            "limit": 200,
        }
        plan = conn.execute("EXPLAIN (ANALYZE, BUFFERS, COSTS OFF) " + PROFILE_FACTS, params)
        lines = [str(r[0]) for r in plan.fetchall()]
    picked = [line for line in lines if "Scan" in line or "Execution" in line or "Planning" in line]
    return "\n".join([*picked[:12], "   ...", *picked[-2:]])


async def run(args: argparse.Namespace) -> None:
    figures = Figures("PostgreSQL layouts: profile read p50 at the larger size", "ms")
    with scratch_database(args.db) as db_url:
        urls = {
            layout: await make_layout(db_url, layout, args.days, args.hash) for layout in LAYOUTS
        }
        sizes = [args.rows, args.grow_to] if args.grow_to > args.rows else [args.rows]
        filled = 0
        reads: dict[int, dict[str, dict[str, tuple[float, float]]]] = {}
        for size in sizes:
            for layout, url in urls.items():
                spent = fill(url, layout, filled, size, filled // PER_CUSTOMER, args.days)
                print(f"fill {layout}: {size - filled:,} rows in {spent:.1f} s", flush=True)
            for layout, url in urls.items():
                print(f"size {layout} at {size:,} rows: {bytes_per_row(url, size):.0f} bytes/row")
            reads[size] = {
                layout: read_phase(url, args.rows // PER_CUSTOMER, args.reads)
                for layout, url in urls.items()
            }
            filled = size
        print(f"\n== reads (ms, p50 / p99 over {args.reads}; customers of the first fill)")
        for size, by_layout in reads.items():
            for layout, figures_of in by_layout.items():
                cells = "  ".join(f"{k} {v[0]:.2f}/{v[1]:.2f}" for k, v in figures_of.items())
                ratio = figures_of["profile"][0] / by_layout["old"]["profile"][0]
                print(f"{size:>10,} rows  {layout:<9} {cells}  profile x{ratio:.2f} of old")
        for layout in urls:
            figures.add(layout, reads[sizes[-1]][layout]["profile"][0])
        print("\n== ingest (the store's transaction, layouts interleaved batch by batch)")
        ingest = await ingest_phase(urls, (100, 500), args.batches)
        for key, value in ingest.items():
            layout, size = key.rsplit(" ", 1)
            base = ingest[f"old {size}"]
            print(
                f"batch {size:>4} {layout:<9} {value['rows_s']:>9,.0f} rows/s (x"
                f"{value['rows_s'] / base['rows_s']:.2f} of old)  p99 {value['p99_ms']:.1f} ms"
                f"  PostgreSQL CPU {value['cpu_ms_per_1k']:.0f} ms/1k events"
            )
        if args.migrate_rows:
            seconds, kept = await measure_migration(db_url, args.migrate_rows, args.days)
            print(
                f"\n== migration 6 on an old store of {args.migrate_rows:,} events: {seconds:.1f} s"
                f" ({args.migrate_rows / seconds:,.0f} rows/s), {kept:,} rows kept"
            )
        print("\n== EXPLAIN ANALYZE of GET /v1/profiles on week (scans only)")
        print(profile_plan(urls["week"]))
    if args.png:
        figures.write_png(args.png)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--db", default=DEFAULT_PG, help="a PostgreSQL server (scratch database)")
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--grow-to", type=int, default=2_000_000)
    parser.add_argument("--days", type=int, default=30, help="day partitions holding the rows")
    parser.add_argument("--hash", type=int, default=4, help="store-hash parts per day")
    parser.add_argument("--batches", type=int, default=20, help="ingest batches per size")
    parser.add_argument("--reads", type=int, default=300, help="calls per read kind")
    parser.add_argument(
        "--migrate-rows", type=int, default=1_000_000, help="time migration 6 on this many (0: no)"
    )
    add_png_argument(parser)
    args = parser.parse_args()
    if not (0 < args.rows <= args.grow_to <= 20_000_000 and 1 <= args.days <= 400):
        parser.error("expected 0 < --rows <= --grow-to <= 20,000,000 and 1 <= --days <= 400")
    asyncio.run(run(args))


if __name__ == "__main__":
    main()
