"""A simulated fleet through a 3-node NATS cluster into PostgreSQL, beside HTTP (prints figures).

    .venv/bin/python -m benchmarks.fleet [--stores 1000] [--rate 2] [--seconds 60]
        [--drivers 2] [--workers 2] [--shards 4] [--outage-at-s 20] [--outage-s 60]
        [--phases nats,http,outage]

Not a test. On this machine everything shares the cores: the cluster, the workers, the
HTTP store, PostgreSQL and the simulated stores; each figure comes with the CPU the parts
spent, the drivers' own included, and the load average at the start and the end.

The stores are ``--drivers`` processes (``benchmarks/fleet_driver.py``), each running its
share of the ``--stores`` as asyncio tasks with the real sink and the uploader's loop (one
connection per store, batches of 500, backoff with a readiness probe), each store offering
``--rate`` events/s for ``--seconds``. Phases, each into its own scratch PostgreSQL schema:

1. nats: through a private three-node cluster mapping the events to ``--shards`` R3 streams
   (``EDGE_EVENTS_<k>``; 0: the one stream ``EDGE_EVENTS``) drained by ``--workers``
   ``customer-store ingest --shards N`` processes;
2. http: the same fleet through ``cloud_sync.uploader.HttpEvents`` to one
   ``customer-store serve`` (gzip batches, one token per store);
3. outage: the nats phase with the whole cluster killed (-9) ``--outage-at-s`` after the
   start (which must fall before ``--seconds``) and restarted ``--outage-s`` later; the
   stores keep making events meanwhile. Held by the outage: events made before the restart
   and stored after the kill; catch-up: from the restart until the last of them was stored.

Per phase: events made, acknowledged (PubAck or HTTP 2xx) and stored, after waiting (at most
``--wait-s``) for every event made to be stored; a NATS phase that stored fewer than were
acknowledged also reports what the streams and their consumers still hold (waiting, or gone
from the hub). Then events/s stored (first ``ts`` to last commit), p50/p99 of
device-to-store lag (``ingested_at - ts``, one clock), CPU seconds per 1,000 events of the
drivers, the ingest workers (or the HTTP store), the NATS servers, the PostgreSQL backends of
this run's database, and every ``postgres`` process of the machine (other users included).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import select
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import nats
import psycopg

from benchmarks.fleet_driver import Plan, envelope_row
from benchmarks.store import DEFAULT_PG, make_tokens, new_schema, percentile, scratch_database
from cloud_sync.store.nats_ingest import DURABLE, STREAM
from cloud_sync.store.nats_shards import DEFAULT_SHARDS
from cloud_sync.sync_nats import NatsEvents
from edge_agent.config import SyncSection
from edge_agent.governance import ConsentLedger
from tests.support.nats import NatsCluster, jetstream_ready

CLK_TCK = os.sysconf("SC_CLK_TCK")
PHASES = ("nats", "http", "outage")


def cpu_of(pids: Sequence[int]) -> dict[int, float]:
    """CPU seconds (user + system) of each process still there."""
    found = {}
    for pid in pids:
        with contextlib.suppress(OSError):
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            found[pid] = (int(fields[11]) + int(fields[12])) / CLK_TCK
    return found


def cpu_seconds(pids: Sequence[int]) -> float:
    return sum(cpu_of(pids).values())


def cpu_spent(before: dict[int, float], after: dict[int, float]) -> float:
    """CPU used between two snapshots by the processes alive at the end (a process that
    started meanwhile counts whole; one that ended is lost: an underestimate)."""
    return sum(cpu - before.get(pid, 0.0) for pid, cpu in after.items())


def postgres_pids() -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if (entry / "comm").read_text().strip() == "postgres":
                    pids.append(int(entry.name))
    return pids


def backend_pids(db_url: str) -> list[int]:
    """The PostgreSQL backends serving this run's database (the workers' or store's pools)."""
    with psycopg.connect(db_url) as conn:
        rows = conn.execute(
            "SELECT pid FROM pg_stat_activity WHERE datname = current_database()"
            " AND pid <> pg_backend_pid()"
        ).fetchall()
    return [int(row[0]) for row in rows]


def lag_figures(db_url: str, outage: tuple[float, float] | None) -> dict[str, Any]:
    """Rows, events/s (first ts to last commit), lag p50/p99; with an outage (kill and
    restart epochs), what it held up and the catch-up."""
    with psycopg.connect(db_url) as conn:
        rows = conn.execute(
            "SELECT extract(epoch FROM ingested_at - ts), extract(epoch FROM ts),"
            " extract(epoch FROM ingested_at) FROM events"
        ).fetchall()
    if not rows:
        return {"stored": 0}
    lags = [float(r[0]) for r in rows]
    first_ts = min(float(r[1]) for r in rows)
    last_in = max(float(r[2]) for r in rows)
    found: dict[str, Any] = {
        "stored": len(rows),
        "events_per_s": round(len(rows) / (last_in - first_ts), 1),
        "lag_p50_s": round(percentile(lags, 0.5), 3),
        "lag_p99_s": round(percentile(lags, 0.99), 3),
    }
    if outage is not None:
        killed, restarted = outage
        # Events made before the restart but stored after the kill: what the outage held up.
        held = [float(r[2]) for r in rows if float(r[1]) < restarted and float(r[2]) >= killed]
        found["held_by_outage"] = len(held)
        # None when nothing waited (every event made before the kill was stored before it).
        found["catch_up_s"] = round(max(held) - restarted, 1) if held else None
        # Until the last event (made before or after the restart) was stored.
        found["drained_after_restart_s"] = round(last_in - restarted, 1)
    return found


def stored_rows(db_url: str) -> int:
    with psycopg.connect(db_url) as conn:
        row = conn.execute("SELECT count(*) FROM events").fetchone()
    return int(row[0]) if row else 0


def wait_rows(db_url: str, count: int, within: float) -> tuple[int, float]:
    """Wait (bounded) until ``count`` rows are stored; return the rows and seconds waited."""
    started = time.monotonic()
    seen = stored_rows(db_url)
    while seen < count and time.monotonic() - started < within:
        time.sleep(0.5)
        seen = stored_rows(db_url)
    return seen, round(time.monotonic() - started, 1)


async def left_in_streams(url: str) -> dict[str, int]:
    """What the event streams still hold and their consumers have not settled: after a
    phase that stored fewer events than were acknowledged, whether the rest still waits
    (redelivery, a stalled worker) or is gone from the hub."""
    nc = await nats.connect(url.split(","), connect_timeout=2)
    try:
        js = nc.jetstream(timeout=10)
        infos = [i for i in await js.streams_info() if (i.config.name or "").startswith(STREAM)]
        found = {"messages": 0, "num_pending": 0, "num_ack_pending": 0, "num_redelivered": 0}
        for info in infos:
            found["messages"] += int(info.state.messages)
            consumer = await js.consumer_info(info.config.name or "", DURABLE)
            found["num_pending"] += int(consumer.num_pending or 0)
            found["num_ack_pending"] += int(consumer.num_ack_pending or 0)
            found["num_redelivered"] += int(consumer.num_redelivered or 0)
    finally:
        await nc.close()
    return found


def load_average() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def start_child(command: list[str], log: Path, ready: str) -> tuple[subprocess.Popen[bytes], str]:
    with log.open("ab") as out:
        proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=out)
    assert proc.stdout is not None
    found, _, _ = select.select([proc.stdout], [], [], 60)
    line = proc.stdout.readline().decode() if found else ""
    if not line.startswith(ready):
        proc.kill()
        raise SystemExit(f"{command[3]} did not start: {log.read_text()[-2000:]}")
    return proc, line.strip()


def stop_child(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
    if proc.stdout is not None:
        proc.stdout.close()


@contextlib.contextmanager
def children(procs: list[subprocess.Popen[bytes]]) -> Iterator[None]:
    try:
        yield
    finally:
        for proc in procs:
            stop_child(proc)


def start_drivers(plans: Sequence[Plan], work: Path, label: str) -> list[subprocess.Popen[bytes]]:
    """Start one driver per plan; return once every one printed ``ready`` (bounded)."""
    drivers = []
    for number, plan in enumerate(plans):
        plan_file = work / f"plan-{label}-{number}.json"
        plan_file.write_text(json.dumps(asdict(plan)))
        with (work / f"driver-{label}-{number}.log").open("ab") as log:
            drivers.append(
                subprocess.Popen(
                    [sys.executable, "-m", "benchmarks.fleet_driver", str(plan_file)],
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    stderr=log,
                )
            )
    for number, driver in enumerate(drivers):
        assert driver.stdout is not None
        found, _, _ = select.select([driver.stdout], [], [], 180)
        line = driver.stdout.readline().decode() if found else ""
        if not line.startswith("ready"):
            for other in drivers:
                other.kill()
                other.wait(10)
            log_text = (work / f"driver-{label}-{number}.log").read_text()[-2000:]
            raise SystemExit(f"driver {number} not ready: {line!r} {log_text}")
        print(f"{label}: driver {number} {line.strip()}", file=sys.stderr, flush=True)
    return drivers


def driver_results(drivers: Sequence[subprocess.Popen[bytes]], within: float) -> list[Any]:
    results = []
    deadline = time.monotonic() + within
    for driver in drivers:
        assert driver.stdout is not None
        found, _, _ = select.select([driver.stdout], [], [], max(1.0, deadline - time.monotonic()))
        line = driver.stdout.readline().decode() if found else ""
        results.append(json.loads(line) if line.startswith("{") else {"error": "no result"})
        stop_child(driver)
    return results


class CpuMeter:
    """CPU seconds of groups of processes between ``start`` and ``stop``, including those
    that ended meanwhile if ``bank`` was called before they did (the killed NATS nodes)."""

    def __init__(self) -> None:
        self.before: dict[str, dict[int, float]] = {}
        self.banked: dict[str, float] = {}

    def start(self, groups: dict[str, Sequence[int]]) -> None:
        self.before = {name: cpu_of(pids) for name, pids in groups.items()}
        self.banked = dict.fromkeys(groups, 0.0)

    def bank(self, name: str, pids: Sequence[int]) -> None:
        """Add what ``pids`` spent so far, and count them from zero again (restarted)."""
        self.banked[name] += cpu_spent(self.before.get(name, {}), cpu_of(pids))
        self.before[name] = {}

    def stop(self, groups: dict[str, Sequence[int]]) -> dict[str, float]:
        return {
            name: self.banked.get(name, 0.0) + cpu_spent(self.before.get(name, {}), cpu_of(pids))
            for name, pids in groups.items()
        }


def split_plans(
    args: argparse.Namespace, transport: str, url: str, tokens: dict[str, str]
) -> list[Plan]:
    stores = [f"fs-{n:05d}" for n in range(args.stores)]
    shares = [stores[n :: args.drivers] for n in range(args.drivers)]
    return [
        Plan(
            transport=transport,
            url=url,
            stores=share,
            index_offset=number,
            fleet_size=len(stores),
            rate=args.rate,
            seconds=args.seconds,
            deadline_s=args.seconds + args.wait_s,
            sync_timeout_s=args.sync_timeout_s,
            tokens={store: tokens[store] for store in share} if tokens else {},
        )
        for number, share in enumerate(shares)
        if share
    ]


def run_phase(
    label: str,
    args: argparse.Namespace,
    plans: Sequence[Plan],
    work: Path,
    schema: str,
    sink_pids: Sequence[int],
    cluster: NatsCluster | None,
) -> dict[str, Any]:
    load_start = load_average()
    drivers = start_drivers(plans, work, label)
    groups: dict[str, Sequence[int]] = {
        "drivers": [d.pid for d in drivers],
        "ingest" if cluster is not None else "http_store": sink_pids,
        "pg_backends": backend_pids(schema),
        "pg_all": postgres_pids(),
    }
    if cluster is not None:
        groups["nats"] = cluster.pids()
    meter = CpuMeter()
    meter.start(groups)
    go = time.time() + 1.0
    for driver in drivers:
        assert driver.stdin is not None
        driver.stdin.write(f"go {go}\n".encode())
        driver.stdin.flush()
    outage = None
    if label == "outage" and cluster is not None:
        time.sleep(max(0.0, go + args.outage_at_s - time.time()))
        meter.bank("nats", cluster.pids())
        killed_epoch = time.time()
        for node in cluster.nodes:
            node.kill()
        print(f"{label}: cluster killed (-9)", file=sys.stderr, flush=True)
        time.sleep(args.outage_s)
        for node in cluster.nodes:
            node.start(wait=False)
        outage = (killed_epoch, time.time())
        groups["nats"] = cluster.pids()
        print(f"{label}: cluster restarted", file=sys.stderr, flush=True)
    results = driver_results(drivers, args.seconds + args.wait_s + 60)
    made = sum(r.get("made", 0) for r in results)
    acknowledged = sum(r.get("acknowledged", 0) for r in results)
    # The drivers end once every event is acknowledged (or at their deadline); the workers
    # may still be draining the catch-up: wait for every event made, bounded.
    stored, waited_s = wait_rows(schema, made, args.wait_s)
    groups["pg_backends"] = backend_pids(schema)
    spent = meter.stop(groups)
    spent["drivers"] = sum(r.get("cpu_s", 0.0) for r in results)  # their own, to the end
    figures = lag_figures(schema, outage)
    per_k = 1000.0 / max(figures.get("stored", 0), 1)
    found: dict[str, Any] = {
        "phase": label,
        "stores": args.stores,
        "offered_per_s": round(args.stores * args.rate, 1),
        "made": made,
        "acknowledged": acknowledged,
        "stored_count": stored,
        "waited_for_stored_s": waited_s,
        "complete": stored == made == acknowledged,
    }
    if cluster is not None and stored < acknowledged:
        found["left_in_streams"] = asyncio.run(left_in_streams(cluster.url))
    return {
        **found,
        **figures,
        "cpu_s_per_1k": {name: round(cpu * per_k, 3) for name, cpu in spent.items()},
        "cpu_s": {name: round(cpu, 1) for name, cpu in spent.items()},
        "send_failures": sum(r.get("failure_count", 0) for r in results),
        "failure_kinds": _merge_failures(results),
        "load_start_end": [load_start, load_average()],
        "utc": datetime.now(UTC).strftime("%Y-%m-%d %H:%M"),
    }


def _merge_failures(results: Sequence[Any]) -> dict[str, int]:
    merged: dict[str, int] = {}
    for result in results:
        for kind, count in result.get("failures", {}).items():
            merged[kind] = merged.get(kind, 0) + count
    return dict(sorted(merged.items(), key=lambda item: -item[1])[:4])


def start_workers(
    args: argparse.Namespace, url: str, schema: str, work: Path, label: str
) -> list[subprocess.Popen[bytes]]:
    return [
        start_child(
            [
                sys.executable,
                "-m",
                "cloud_sync.store",
                "ingest",
                "--from",
                url,
                "--db",
                schema,
                "--pool-size",
                "2",
                "--shards",
                str(args.shards),
            ],
            work / f"ingest-{label}-{n}.log",
            "ingesting",
        )[0]
        for n in range(args.workers)
    ]


def main_sync(args: argparse.Namespace) -> None:
    phases = [p.strip() for p in args.phases.split(",") if p.strip()]
    unknown = set(phases) - set(PHASES)
    if unknown:
        raise SystemExit(f"unknown phases {sorted(unknown)}; known: {PHASES}")
    if "outage" in phases and args.outage_at_s >= args.seconds:
        raise SystemExit(
            f"--outage-at-s {args.outage_at_s:g} is not before --seconds {args.seconds:g}: the "
            "hub would go down after the last event was made, and the phase measure no outage"
        )
    with contextlib.ExitStack() as stack:
        work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="fleet-")))
        if args.keep_logs:
            work = Path(tempfile.mkdtemp(prefix="fleet-logs-"))
            print(f"logs in {work}", file=sys.stderr)
        db = stack.enter_context(scratch_database(args.pg_url))
        results = []
        print(
            f"fleet: {args.stores} stores x {args.rate} ev/s for {args.seconds} s, "
            f"{args.drivers} drivers, {args.workers} workers, {args.shards} shards, sync.timeout_s "
            f"{args.sync_timeout_s}; load {load_average()}",
            file=sys.stderr,
            flush=True,
        )
        for label in phases:
            schema = new_schema(db, f"fleet_{label}")
            if label == "http":
                stores = [f"fs-{n:05d}" for n in range(args.stores)]
                tokens = dict(zip(stores, asyncio.run(make_tokens(schema, stores)), strict=True))
                serve, line = start_child(
                    [
                        sys.executable,
                        "-m",
                        "cloud_sync.store",
                        "serve",
                        "--db",
                        schema,
                        "--port",
                        "0",
                        "--pool-size",
                        "4",
                    ],
                    work / "serve.log",
                    "listening http://",
                )
                with children([serve]):
                    url = line.removeprefix("listening ")
                    plans = split_plans(args, "http", url, tokens)
                    results.append(run_phase(label, args, plans, work, schema, [serve.pid], None))
            else:
                cluster = NatsCluster(work / f"cluster-{label}", shards=args.shards)
                cluster.start()
                try:
                    asyncio.run(jetstream_ready(cluster.url, 60))
                    workers = start_workers(args, cluster.url, schema, work, label)
                    with children(workers):
                        plans = split_plans(args, "nats", cluster.url, {})
                        results.append(
                            run_phase(
                                label, args, plans, work, schema, [w.pid for w in workers], cluster
                            )
                        )
                    if label == "nats":  # the workers are gone: what a backlog costs on disk
                        results[-1]["stream_bytes_per_event"] = asyncio.run(
                            stream_bytes_per_event(cluster.url, 5000)
                        )
                finally:
                    cluster.stop()
            print(json.dumps(results[-1]), flush=True)


async def stream_bytes_per_event(url: str, count: int) -> float:
    """Bytes the R3 stream holds per waiting event (on each replica), sent by the real sink
    with no worker draining: what a worker or database outage costs the hub's disks."""
    before = await _stream_state(url)
    settings = SyncSection(transport="nats", url=url)
    async with NatsEvents(settings, "fs-backlog") as sink:
        consent = ConsentLedger(require_consent=False)
        for start in range(0, count, settings.batch_size):
            rows = [
                envelope_row("fs-backlog", n) for n in range(start, start + settings.batch_size)
            ]
            await sink.post_rows(rows, consent, b"k" * 32, False)
    after = await _stream_state(url)
    return round((after[1] - before[1]) / max(after[0] - before[0], 1), 1)


async def _stream_state(url: str) -> tuple[int, int]:
    """Messages and bytes of every event stream (the shards ``EDGE_EVENTS_<k>``, or one)."""
    nc = await nats.connect(url.split(","), connect_timeout=2)
    try:
        infos = await nc.jetstream(timeout=10).streams_info()
    finally:
        await nc.close()
    states = [i.state for i in infos if (i.config.name or "").startswith(STREAM)]
    return sum(int(s.messages) for s in states), sum(int(s.bytes) for s in states)


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--stores", type=int, default=1000)
    parser.add_argument("--rate", type=float, default=2.0, help="events/s offered per store")
    parser.add_argument("--seconds", type=float, default=60.0, help="how long events are made")
    parser.add_argument("--drivers", type=int, default=2, help="processes simulating stores")
    parser.add_argument("--workers", type=int, default=2, help="ingest worker processes")
    parser.add_argument(
        "--shards", type=int, default=DEFAULT_SHARDS, help="hub shard streams (0: one stream)"
    )
    parser.add_argument("--outage-at-s", type=float, default=20.0)
    parser.add_argument("--outage-s", type=float, default=60.0)
    parser.add_argument("--phases", default=",".join(PHASES), help="of nats,http,outage")
    parser.add_argument(
        "--sync-timeout-s", type=float, default=30.0, help="the stores' sync.timeout_s"
    )
    parser.add_argument("--pg-url", default=DEFAULT_PG)
    parser.add_argument("--wait-s", type=float, default=120.0, help="bound on each drain")
    parser.add_argument("--keep-logs", action="store_true", help="keep the processes' logs")
    # SIGTERM (timeout, a person) unwinds like Ctrl-C: the cluster and workers are stopped.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    main_sync(parser.parse_args())


if __name__ == "__main__":
    main()
