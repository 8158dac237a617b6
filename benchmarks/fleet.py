"""A simulated fleet through a 3-node NATS cluster into PostgreSQL, beside HTTP (prints figures).

    .venv/bin/python -m benchmarks.fleet [--stores 50] [--rate 20] [--seconds 20]
        [--workers 2] [--outage-s 10]

Not a test. On this machine everything shares the cores: the cluster, the workers, the
HTTP store, PostgreSQL and the simulated stores.

1. nats: ``--stores`` asyncio tasks, each with its own connection and the real sink
   (``cloud_sync.sync_nats.NatsEvents.post_rows``: governance, Nats-Msg-Id, PubAck), each
   offering ``--rate`` events/s in one batch a second for ``--seconds``, into a private
   three-node cluster (R3) drained by ``--workers`` ``customer-store ingest`` processes into
   a scratch PostgreSQL schema;
2. http: the same fleet through the real HTTP transport (``cloud_sync.uploader.HttpEvents``:
   gzip batches to ``customer-store serve``) into another schema, in the same run;
3. outage: the nats run again with the whole cluster down (-9) for ``--outage-s`` in the
   middle; each store keeps what was not acknowledged and resends it (as the uploader does):
   the catch-up time is from the cluster's restart until every event is stored.

Per run: events/s stored (from the first send to the last row committed), p50/p99 of
device-to-store lag (``ingested_at - ts``), and CPU seconds of the workers (or the HTTP
store), the NATS servers and PostgreSQL (every ``postgres`` process on this machine:
another user of the same server shows up here too) per 1,000 events.

The stores' send loop is a simplification of the uploader's (a pending list, one batch a
tick, resend on failure); the sink is the real one.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import select
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg

from benchmarks.store import DEFAULT_PG, make_tokens, new_schema, percentile, scratch_database
from cloud_sync.sync_batches import Row
from cloud_sync.sync_client import StoreClient
from cloud_sync.sync_nats import NatsEvents
from cloud_sync.uploader import EventTransport, HttpEvents
from edge_agent.buffer.reads import PendingRow
from edge_agent.config import SyncSection
from edge_agent.errors import SyncError
from edge_agent.governance import ConsentLedger
from tests.support.nats import NatsCluster, jetstream_ready

KEY = b"k" * 32
CLK_TCK = os.sysconf("SC_CLK_TCK")


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


def envelope_row(store_id: str, seq: int) -> Row:
    now = datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    event_id = f"{store_id}-{seq:07d}-{uuid.uuid4().hex[:6]}"
    text = (
        f'{{"event_id":"{event_id}","type":"product.pickup","ts":"{now}",'
        f'"store_id":"{store_id}","device_id":"shelf-1","customer_id":"c-{seq % 500}",'
        f'"source":"mqtt:edge/{store_id}/devices/shelf-1/events","schema":1,'
        f'"data":{{"sku":"SKU-{seq % 97}"}}}}'
    )
    return PendingRow(seq, text, True, f"c-{seq % 500}")


@dataclass
class StoreSim:
    store_id: str
    transport: EventTransport
    sent: int = 0
    failures: int = 0


async def run_store(sim: StoreSim, rate: int, seconds: float, stop_at: float) -> None:
    """Offer ``rate`` events a second; send the pending ones in one batch a tick."""
    consent = ConsentLedger(require_consent=False)
    pending: list[Row] = []
    seq = 0
    loop = asyncio.get_running_loop()
    start = loop.time()
    tick = 0
    while True:
        now = loop.time()
        if now - start < seconds:
            for _ in range(rate):
                pending.append(envelope_row(sim.store_id, seq))
                seq += 1
        elif not pending or now > stop_at:
            return
        if pending:
            batch = pending[:2000]
            try:
                await sim.transport.post_rows(batch, consent, KEY, True)
            except SyncError:
                sim.failures += 1
            else:
                del pending[: len(batch)]
                sim.sent += len(batch)
        tick += 1
        await asyncio.sleep(max(0.0, start + tick - loop.time()))


def lag_figures(db_url: str, since: datetime) -> tuple[int, float, float, float]:
    """(rows, seconds first ts to last ingest, p50 lag s, p99 lag s)."""
    with psycopg.connect(db_url) as conn:
        rows = conn.execute(
            "SELECT extract(epoch FROM ingested_at - ts), extract(epoch FROM ts),"
            " extract(epoch FROM ingested_at) FROM events WHERE ts >= %s",
            (since,),
        ).fetchall()
    lags = [float(r[0]) for r in rows]
    span = max(float(r[2]) for r in rows) - min(float(r[1]) for r in rows) if rows else 0.0
    return len(rows), span, percentile(lags, 0.5), percentile(lags, 0.99)


def wait_rows(db_url: str, count: int, within: float) -> int:
    deadline = time.monotonic() + within
    seen = 0
    while time.monotonic() < deadline:
        with psycopg.connect(db_url) as conn:
            row = conn.execute("SELECT count(*) FROM events").fetchone()
        seen = int(row[0]) if row else 0
        if seen >= count:
            return seen
        time.sleep(0.5)
    return seen


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


async def fleet_run(
    label: str,
    make: Any,
    stores: Sequence[str],
    args: argparse.Namespace,
    db_url: str,
    server_pids: Sequence[int],
    cluster: NatsCluster | None = None,
    outage: bool = False,
) -> dict[str, Any]:
    sims = [StoreSim(store_id, await make(store_id)) for store_id in stores]
    total = len(stores) * args.rate * args.seconds
    since = datetime.now(UTC).replace(microsecond=0)
    pg_before, srv_before = cpu_of(postgres_pids()), cpu_seconds(server_pids)
    nats_pids = cluster.pids() if cluster is not None else []
    nats_before = cpu_seconds(nats_pids)
    stop_at = asyncio.get_running_loop().time() + args.seconds + args.wait_s
    tasks = [asyncio.create_task(run_store(sim, args.rate, args.seconds, stop_at)) for sim in sims]
    restarted = None
    if outage and cluster is not None:
        await asyncio.sleep(args.seconds / 3)
        for node in cluster.nodes:
            node.kill()
        await asyncio.sleep(args.outage_s)
        for node in cluster.nodes:
            node.start(wait=False)
        restarted = time.monotonic()
    await asyncio.gather(*tasks)
    print(f"{label}: sent {sum(s.sent for s in sims)} of {total}", file=sys.stderr, flush=True)
    stored = await asyncio.to_thread(wait_rows, db_url, total, args.wait_s)
    done = time.monotonic()
    for sim in sims:
        with contextlib.suppress(Exception):
            await sim.transport.__aexit__(None, None, None)  # type: ignore[attr-defined]
    rows, span, p50, p99 = lag_figures(db_url, since)
    per_k = 1000.0 / max(rows, 1)
    result = {
        "run": label,
        "stores": len(stores),
        "offered_per_s": len(stores) * args.rate,
        "events": total,
        "stored": stored,
        "events_per_s": round(rows / span, 1) if span else None,
        "lag_p50_s": round(p50, 3),
        "lag_p99_s": round(p99, 3),
        "cpu_s_per_1k_ingest": round((cpu_seconds(server_pids) - srv_before) * per_k, 3),
        # Every postgres process of this machine: other users of the server count too.
        "cpu_s_per_1k_postgres": round(cpu_spent(pg_before, cpu_of(postgres_pids())) * per_k, 3),
        "send_failures": sum(sim.failures for sim in sims),
    }
    if cluster is not None and not outage:  # (an outage restarts the servers: new pids)
        result["cpu_s_per_1k_nats"] = round((cpu_seconds(nats_pids) - nats_before) * per_k, 3)
    if restarted is not None:
        result["catch_up_s"] = round(done - restarted, 1)
    return result


async def main_async(args: argparse.Namespace) -> None:
    stores = [f"fs-{n:04d}" for n in range(args.stores)]
    with tempfile.TemporaryDirectory(prefix="fleet-") as tmp, scratch_database(args.pg_url) as db:
        work = Path(tmp)
        cluster = NatsCluster(work / "cluster")
        cluster.start()
        try:
            await jetstream_ready(cluster.url, 60)
            results = []
            for label, outage in (("nats", False), ("http", None), ("nats+outage", True)):
                schema = new_schema(db, f"fleet_{label.replace('+', '_')}")
                if label == "http":
                    tokens = dict(zip(stores, await make_tokens(schema, stores), strict=True))
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

                        async def make(
                            store_id: str, url: str = url, tokens: dict[str, str] = tokens
                        ) -> EventTransport:
                            client = StoreClient(url, tokens[store_id], 30.0, 2)
                            return _ClosingHttp(client)

                        results.append(
                            await fleet_run(label, make, stores, args, schema, [serve.pid])
                        )
                    continue
                workers = [
                    start_child(
                        [
                            sys.executable,
                            "-m",
                            "cloud_sync.store",
                            "ingest",
                            "--from",
                            cluster.url,
                            "--db",
                            schema,
                            "--pool-size",
                            "2",
                        ],
                        work / f"ingest-{label}-{n}.log",
                        "ingesting",
                    )[0]
                    for n in range(args.workers)
                ]
                with children(workers):

                    async def make(store_id: str) -> EventTransport:
                        sync = SyncSection(transport="nats", url=cluster.url, timeout_s=5.0)
                        return NatsEvents(sync, store_id)

                    results.append(
                        await fleet_run(
                            label,
                            make,
                            stores,
                            args,
                            schema,
                            [w.pid for w in workers],
                            cluster=cluster,
                            outage=bool(outage),
                        )
                    )
            for result in results:
                print(result, flush=True)
        finally:
            cluster.stop()


class _ClosingHttp(HttpEvents):
    async def __aexit__(self, *exc_info: object) -> None:
        await self.client.__aexit__(*exc_info)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--stores", type=int, default=50)
    parser.add_argument("--rate", type=int, default=20, help="events/s offered per store")
    parser.add_argument("--seconds", type=int, default=20)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--outage-s", type=float, default=10.0)
    parser.add_argument("--pg-url", default=DEFAULT_PG)
    parser.add_argument("--wait-s", type=float, default=120.0, help="bound on each drain")
    # SIGTERM (timeout, a person) unwinds like Ctrl-C: the cluster and workers are stopped.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    asyncio.run(main_async(parser.parse_args()))


if __name__ == "__main__":
    main()
