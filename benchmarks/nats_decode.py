"""How an ingest worker reads a fetched batch: msgspec against the HTTP reader (prints figures).

    .venv/bin/python -m benchmarks.nats_decode [--batch 500] [--rounds 7]

Not a test. One fetched batch of ``--batch`` messages, each a ~330-byte customer envelope
as the agents' sink publishes it, read (store id from the subject, the envelope parsed) and
judged (``ingest.check_batch``) the worker's way (``nats_envelopes.read_batch``: msgspec,
the HTTP reader for anything unusual) and the old way (``ingest.decode_body`` on a
one-element array per message, as the workers did before), alternated in the same run;
medians of ``--rounds`` of CPU seconds per 1,000 messages, with the load average.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from cloud_sync.envelope_schema import default_registry
from cloud_sync.store.errors import BadRequestError
from cloud_sync.store.ingest import Limits, Piece, check_batch, decode_body
from cloud_sync.store.nats_envelopes import read_batch, store_of_subject

LIMITS = Limits()


@dataclass(frozen=True)
class Message:
    subject: str
    data: bytes


def batch_of(size: int) -> list[Message]:
    now = datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    found = []
    for n in range(size):
        store = f"fs-{n % 250:05d}"
        envelope = {
            "event_id": f"{store}-{n:07d}-a1b2c3",
            "type": "product.pickup",
            "ts": now,
            "store_id": store,
            "device_id": "shelf-1",
            "customer_id": f"c-{n % 500}",
            "source": f"mqtt:edge/{store}/devices/shelf-1/events",
            "schema": 1,
            "data": {"sku": f"SKU-{n % 97}"},
        }
        found.append(Message(f"edge.shard.{n % 4}.{store}", json.dumps(envelope).encode()))
    return found


def read_old_way(msgs: list[Message]) -> list[tuple[str, Piece]]:
    found = []
    for msg in msgs:
        store_id = store_of_subject(msg.subject, "edge.events", "edge.shard")
        try:
            items = decode_body(b"[" + msg.data + b"]", None, LIMITS).items
            piece = items[0] if len(items) == 1 else Piece(refused="not_one_envelope")
        except BadRequestError as exc:
            piece = Piece(refused=exc.reason)
        found.append((store_id, piece))
    return found


def read_new_way(msgs: list[Message]) -> list[tuple[str, Piece]]:
    return read_batch(msgs, "edge.events", "edge.shard", LIMITS)


def judged(read: list[tuple[str, Piece]]) -> int:
    by_store: dict[str, list[Piece]] = {}
    for store_id, piece in read:
        by_store.setdefault(store_id, []).append(piece)
    registry = default_registry()
    return sum(len(check_batch(p, s, registry).rows) for s, p in by_store.items())


def cpu_ms_per_1k(way: Any, msgs: list[Message], judge: bool) -> float:
    started = time.process_time()
    read = way(msgs)
    if judge:
        assert judged(read) == len(msgs)
    return (time.process_time() - started) * 1e6 / len(msgs)


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=500)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--repeat", type=int, default=20, help="batches per round")
    args = parser.parse_args()
    msgs = batch_of(args.batch)
    assert [p.value for _, p in read_old_way(msgs)] == [p.value for _, p in read_new_way(msgs)]
    load_before = os.getloadavg()
    figures: dict[str, list[float]] = {}
    for _ in range(args.rounds):
        for name, way, judge in (
            ("read, old way (decode_body per message)", read_old_way, False),
            ("read, msgspec (read_batch)", read_new_way, False),
            ("read + check_batch, old way", read_old_way, True),
            ("read + check_batch, msgspec", read_new_way, True),
        ):
            spent = [cpu_ms_per_1k(way, msgs, judge) for _ in range(args.repeat)]
            figures.setdefault(name, []).append(statistics.median(spent))
    medians = {name: round(statistics.median(values), 2) for name, values in figures.items()}
    print(
        json.dumps(
            {
                "utc": datetime.now(UTC).strftime("%Y-%m-%d %H:%M"),
                "batch": args.batch,
                "cpu_ms_per_1k_messages": medians,
                "ratio_read": round(
                    medians["read, old way (decode_body per message)"]
                    / medians["read, msgspec (read_batch)"],
                    1,
                ),
                "ratio_with_check": round(
                    medians["read + check_batch, old way"] / medians["read + check_batch, msgspec"],
                    2,
                ),
                "load_before_after": [load_before[0], os.getloadavg()[0]],
            }
        )
    )


if __name__ == "__main__":
    main()
