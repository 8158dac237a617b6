"""The agent's NATS sink against bare nats-py, on one private server (prints figures).

    .venv/bin/python -m benchmarks.nats_sink [--events 50000] [--batch 500] [--rounds 3]

Not a test. One process, one connection per variant, ``--events`` customer events in
batches of ``--batch`` (the uploader's default), into the stream the workers use (R1 here,
no worker draining it), every variant in each round, in turn:

- ``sink``: ``cloud_sync.sync_nats.NatsEvents.post_rows`` (governance in a thread, one
  ``Nats-Msg-Id`` per event, pipelined publishes, one deadline per batch);
- ``per-message stall``: the same publishes with ``publish_async(wait_stall=...)``, as the
  sink did before (a timer and a task per message), PubAcks gathered;
- ``bare``: nats-py's ``publish_async`` of the same payloads and headers with nothing else,
  the floor for this client.

Figures per variant: events/s and this process's CPU seconds per 1,000 events, medians over
the rounds, each beside the bare floor of the same run.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import nats

from benchmarks.fleet_driver import envelope_row
from cloud_sync.store.nats_ingest import IngestSettings, ensure_stream
from cloud_sync.sync_batches import Row
from cloud_sync.sync_nats import MSG_ID_HEADER, NatsEvents, event_subject
from edge_agent.config import SyncSection
from edge_agent.governance import ConsentLedger
from tests.support.nats import nats_server, wait_jetstream_ready

KEY = b"k" * 32


def _cpu() -> float:
    times = os.times()
    return times.user + times.system


async def _measure(
    send: Callable[[list[Row]], Awaitable[Any]], batches: list[list[Row]]
) -> tuple[float, float]:
    """(events/s, CPU s per 1k) of sending every batch, one after the other."""
    count = sum(len(batch) for batch in batches)
    cpu, started = _cpu(), time.perf_counter()
    for batch in batches:
        await send(batch)
    elapsed, spent = time.perf_counter() - started, _cpu() - cpu
    return count / elapsed, spent * 1000 / count


async def run(url: str, args: argparse.Namespace) -> dict[str, list[tuple[float, float]]]:
    settings = SyncSection(transport="nats", url=url)
    consent = ConsentLedger(require_consent=False)
    nc = await nats.connect(url)
    await ensure_stream(nc.jetstream(), IngestSettings(url=url))
    js = nc.jetstream()
    found: dict[str, list[tuple[float, float]]] = {"sink": [], "per-message stall": [], "bare": []}
    for round_number in range(args.rounds):
        for variant, figures in found.items():
            store = f"bench-{variant[:4]}-{round_number}"
            rows = [envelope_row(store, n) for n in range(args.events)]
            batches = [rows[i : i + args.batch] for i in range(0, len(rows), args.batch)]
            subject = event_subject(settings.nats_subject, store)

            async def old_way(batch: list[Row], subject: str = subject) -> object:
                futures = [
                    await js.publish_async(
                        subject,
                        row.envelope.encode(),
                        wait_stall=settings.timeout_s,
                        headers={MSG_ID_HEADER: f"{subject}:{row.seq}"},
                    )
                    for row in batch
                ]
                return await asyncio.wait_for(asyncio.gather(*futures), settings.timeout_s)

            async def bare(batch: list[Row], subject: str = subject) -> object:
                futures = [
                    await js.publish_async(
                        subject,
                        row.envelope.encode(),
                        headers={MSG_ID_HEADER: f"{subject}:{row.seq}"},
                    )
                    for row in batch
                ]
                return await asyncio.gather(*futures)

            if variant != "sink":
                send = old_way if variant == "per-message stall" else bare
                figures.append(await _measure(send, batches))
                continue
            async with NatsEvents(settings, store) as sink:
                await sink.ready(5.0)  # connected before the clock starts

                async def through_sink(batch: list[Row], sink: NatsEvents = sink) -> object:
                    return await sink.post_rows(batch, consent, KEY, False)

                figures.append(await _measure(through_sink, batches))
    await nc.close()
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--events", type=int, default=50_000)
    parser.add_argument("--batch", type=int, default=500)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    load = " ".join(Path("/proc/loadavg").read_text().split()[:3])
    with tempfile.TemporaryDirectory(prefix="nats-sink-") as tmp, nats_server(Path(tmp)) as node:
        wait_jetstream_ready(node.url)
        found = asyncio.run(run(node.url, args))
    bare_cpu = statistics.median(cpu for _, cpu in found["bare"])
    print(f"{args.events} events x {args.rounds} rounds, batches of {args.batch}; load {load}")
    for variant, figures in found.items():
        rate = statistics.median(r for r, _ in figures)
        cpu = statistics.median(c for _, c in figures)
        print(
            f"{variant:>18}: {rate:8.0f} ev/s, {cpu * 1000:6.1f} ms CPU per 1k events"
            f" (x{cpu / bare_cpu:.2f} the bare client's)"
        )
    print("load at the end " + " ".join(Path("/proc/loadavg").read_text().split()[:3]))


if __name__ == "__main__":
    main()
