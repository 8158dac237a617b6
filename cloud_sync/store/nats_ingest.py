"""Central ingest workers: JetStream to the store's database (``customer-store ingest``).

Agents with ``[sync] transport = "nats"`` publish one envelope per message to
``edge.events.<store_id>`` (docs/contracts.md). The hub maps that subject to one of N shard
streams ``EDGE_EVENTS_<k>`` by a hash of the store id (``nats_shards``). Each worker runs one
pull loop per shard it drains (all N, or the one ``--shard`` pins it to) on the durable pull
consumer ``ingest`` of that stream; any number of worker processes share each consumer:
JetStream hands each message to one of them at a time.

A loop fetches up to ``batch`` messages, reads them in one pass (``nats_envelopes``: msgspec
for the common case, the HTTP ingest's reader for anything unusual), judges every envelope
exactly as the HTTP ingest does (``ingest.check_batch``: limits, schema, storable values),
writes the valid ones with the backend's idempotent ``ingest`` in one transaction (COPY into
staging on PostgreSQL), and only after the commit acknowledges them. A worker killed before
its acknowledgements leaves the messages to be redelivered (after ``ack_wait``) to another
worker; the store counts those as duplicates by ``(store_id, event_id)``, so nothing is lost
and nothing is stored twice.

Trust: the subject names the publishing store, and NATS enforces it (each store's
credentials may publish only to its own subject; deploy/nats-hub.conf). The worker takes the
store id from the subject's last token, never from the message, and refuses an envelope
whose ``store_id`` differs (``store_mismatch``), as the HTTP ingest does with the token's
store.

Poison: a message that can never be stored (bad JSON, bad schema, another store's envelope,
a subject without a store id) is terminated (``term``): counted by reason, logged, never
redelivered. A database that fails is a transient fault: the worker keeps the batch (its
messages marked in progress) and retries the write with backoff until the database takes it;
it never hands the batch back (``nak``), which would spend JetStream's ``max_deliver`` and,
after a long enough database outage, leave acknowledged events in the stream undelivered.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Final

import nats.errors
import nats.js.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from cloud_sync.envelope_schema import default_registry
from cloud_sync.store.backend import Backend
from cloud_sync.store.errors import StoreError
from cloud_sync.store.ingest import Limits, Piece, check_batch
from cloud_sync.store.nats_connect import NatsAccess, connect_options
from cloud_sync.store.nats_envelopes import read_batch
from cloud_sync.store.nats_shards import (
    DEFAULT_SHARDS,
    MAX_SHARDS,
    SHARD_SUBJECT_PREFIX,
    STREAM,
    SUBJECT_PREFIX,
    ShardLayoutError,
    StreamRef,
    check_layout,
    ensure_streams,
    is_probe,
    leftover_streams,
    patiently,
    shard_stream,
    shard_subjects,
)
from cloud_sync.store.records import EventRow, IngestCounts

__all__ = [
    "DURABLE",
    "STREAM",
    "IngestSettings",
    "IngestWorker",
    "ShardLayoutError",
    "WorkerStats",
    "ensure_stream",
    "run_ingest",
]

log = logging.getLogger(__name__)

DURABLE: Final = "ingest"
ACK_WAIT_S: Final = 30.0  # a worker killed with -9: its batch goes to another after this
MAX_DELIVER: Final = 20  # a batch whose workers died this often (crash, -9) stops coming back
_RETRY_DELAY_S: Final = 2.0


@dataclass(frozen=True)
class IngestSettings(NatsAccess):
    stream: str = STREAM  # the unsharded stream's name; shard k's is <stream>_<k>
    subject_prefix: str = SUBJECT_PREFIX
    shard_subject_prefix: str = SHARD_SUBJECT_PREFIX
    shards: int = DEFAULT_SHARDS  # 0: one stream on <subject_prefix>.>, no server mapping
    pinned: tuple[int, ...] = ()  # drain only these shards (empty: all, and leftovers)
    durable: str = DURABLE
    replicas: int = 0  # 0: 3 on a cluster, 1 on a single server
    batch: int = 500
    fetch_timeout_s: float = 1.0
    ack_wait_s: float = ACK_WAIT_S
    max_deliver: int = MAX_DELIVER
    retry_delay_s: float = _RETRY_DELAY_S  # first wait after a database failure
    limits: Limits = field(default_factory=Limits)

    def __post_init__(self) -> None:
        if not 0 <= self.shards <= MAX_SHARDS:
            raise ShardLayoutError(f"--shards {self.shards}: must be 0 to {MAX_SHARDS}")
        wrong = [k for k in self.pinned if not 0 <= k < self.shards]
        if wrong:
            raise ShardLayoutError(
                f"--shard {wrong[0]}: the hub has {self.shards} shards (0 to "
                f"{self.shards - 1})" + (", or none with --shards 0" if not self.shards else "")
            )


@dataclass
class WorkerStats:
    messages: int = 0
    batches: int = 0
    accepted: int = 0
    duplicates: int = 0
    erased: int = 0
    probes: int = 0  # layout probes of starting workers, acknowledged and not stored
    rejected: Counter[str] = field(default_factory=Counter)
    failures: int = 0  # database writes that failed (each retried by the worker)
    by_stream: Counter[str] = field(default_factory=Counter)  # messages per stream


async def ensure_stream(js: JetStreamContext, settings: IngestSettings) -> int:
    """Create the unsharded stream ``settings.stream`` on ``<subject_prefix>.>`` unless it
    exists (a single server without a mapping); return its replica count."""
    return await ensure_streams(
        js,
        base=settings.stream,
        prefix=settings.subject_prefix,
        shard_prefix=settings.shard_subject_prefix,
        shards=0,
        replicas=settings.replicas,
    )


async def prepare(js: JetStreamContext, settings: IngestSettings) -> tuple[int, list[StreamRef]]:
    """Create the layout's streams, check the hub's mapping agrees, and list the streams
    this worker drains; return (replicas, streams)."""
    replicas = await ensure_streams(
        js,
        base=settings.stream,
        prefix=settings.subject_prefix,
        shard_prefix=settings.shard_subject_prefix,
        shards=settings.shards,
        replicas=settings.replicas,
    )
    await check_layout(
        js, base=settings.stream, prefix=settings.subject_prefix, shards=settings.shards
    )
    if not settings.shards:
        refs = [StreamRef(settings.stream, f"{settings.subject_prefix}.>")]
    else:
        refs = [
            StreamRef(
                shard_stream(settings.stream, k), shard_subjects(settings.shard_subject_prefix, k)
            )
            for k in (settings.pinned or range(settings.shards))
        ]
    if not settings.pinned:
        refs += await leftover_streams(
            js,
            base=settings.stream,
            prefix=settings.subject_prefix,
            shard_prefix=settings.shard_subject_prefix,
            shards=settings.shards,
        )
    return replicas, refs


async def subscribe(
    js: JetStreamContext, settings: IngestSettings, ref: StreamRef
) -> JetStreamContext.PullSubscription:
    config = ConsumerConfig(
        durable_name=settings.durable,
        ack_policy=AckPolicy.EXPLICIT,
        deliver_policy=DeliverPolicy.ALL,
        ack_wait=settings.ack_wait_s,
        max_deliver=settings.max_deliver,
        max_ack_pending=max(1000, settings.batch * 8),
    )
    return await patiently(
        f"consumer {ref.name}/{settings.durable}",
        lambda: js.pull_subscribe(ref.subject, settings.durable, stream=ref.name, config=config),
    )


class IngestWorker:
    """One connection and a pull loop per stream it drains: fetch, judge, write,
    acknowledge; runs until cancelled."""

    def __init__(self, settings: IngestSettings, backend: Backend) -> None:
        self.settings = settings
        self.backend = backend
        self.stats = WorkerStats()
        self.streams: list[str] = []  # what this worker drains, once started
        self._registry = default_registry()

    async def run(self, ready: asyncio.Event | None = None) -> None:
        nc = Client()
        await nc.connect(**connect_options(self.settings, "customer-store-ingest"))
        try:
            js = nc.jetstream(timeout=10)
            replicas, refs = await prepare(js, self.settings)
            subs = [(ref, await subscribe(js, self.settings, ref)) for ref in refs]
            self.streams = [ref.name for ref in refs]
            log.info(
                "ingest.worker.started streams=%s durable=%s replicas=%d shards=%d",
                ",".join(self.streams),
                self.settings.durable,
                replicas,
                self.settings.shards,
            )
            if ready is not None:
                ready.set()
            async with asyncio.TaskGroup() as group:
                for ref, sub in subs:
                    group.create_task(self._drain(ref, sub), name=f"ingest:{ref.name}")
        finally:
            await nc.close()

    async def _drain(self, ref: StreamRef, sub: JetStreamContext.PullSubscription) -> None:
        while True:
            try:
                msgs = await sub.fetch(self.settings.batch, timeout=self.settings.fetch_timeout_s)
            except (nats.errors.TimeoutError, TimeoutError):
                _raise_if_cancelled()  # nats-py turns a cancelled fetch into a timeout
                continue  # nothing waiting
            except nats.errors.Error as exc:  # a node gone, a reconnect under way
                _raise_if_cancelled()
                log.warning("ingest.fetch.failed stream=%s detail=%s", ref.name, exc)
                await asyncio.sleep(_RETRY_DELAY_S / 4)
                continue
            if msgs:
                self.stats.by_stream[ref.name] += len(msgs)
                await self.handle(msgs)

    async def handle(self, msgs: Sequence[Msg]) -> None:
        """Judge, write and settle one fetched batch."""
        now = datetime.now(UTC)
        by_store: dict[str, list[tuple[Msg, Piece]]] = {}
        poison: list[tuple[Msg, str]] = []
        probes: list[Msg] = []
        settings = self.settings
        read = read_batch(
            msgs, settings.subject_prefix, settings.shard_subject_prefix, settings.limits
        )
        for msg, (store_id, piece) in zip(msgs, read, strict=True):
            if not store_id:
                poison.append((msg, "bad_subject"))
            elif is_probe(store_id):
                probes.append(msg)  # a starting worker's layout check: nothing to store
            else:  # refused pieces go through check_batch: same reasons, counted once
                by_store.setdefault(store_id, []).append((msg, piece))
        rows = []
        good: list[Msg] = []
        repeated = 0
        for store_id, items in by_store.items():
            checked = check_batch(
                [piece for _, piece in items],
                store_id,
                self._registry,
                now=now,
                max_future_skew_s=self.settings.limits.max_future_skew_s,
            )
            refused = {int(item["index"]): str(item["reason"]) for item in checked.rejected}
            for index, (msg, _) in enumerate(items):
                if index in refused:
                    poison.append((msg, refused[index]))
                else:
                    good.append(msg)
            rows.extend(checked.rows)
            repeated += checked.repeated
        counts = await self._write(rows, now, good)
        # After the commit: acknowledged; and the poison, terminated and counted.
        for msg in good + probes:
            await _settle(msg.ack())
        for msg, reason in poison:
            self.stats.rejected[reason] += 1
            await _settle(msg.term())
        stats = self.stats
        stats.messages += len(msgs) - len(probes)
        stats.probes += len(probes)
        stats.batches += 1
        stats.accepted += counts.accepted
        stats.duplicates += counts.duplicates + repeated
        stats.erased += counts.erased
        if poison:
            log.warning(
                "ingest.batch.rejected rejected=%d reasons=%s",
                len(poison),
                ",".join(f"{k}:{n}" for k, n in Counter(r for _, r in poison).items()),
            )
        log.debug(
            "ingest.batch.complete messages=%d accepted=%d duplicates=%d",
            len(msgs),
            counts.accepted,
            counts.duplicates + repeated,
        )

    async def _write(
        self, rows: list[EventRow], now: datetime, held: Sequence[Msg]
    ) -> IngestCounts:
        """Write the batch, retrying until the database takes it. Handing the batch back
        (nak) would spend one of JetStream's ``max_deliver`` deliveries per failure, and a
        database away longer than those left the batch in the stream, never delivered again:
        acknowledged events never stored. So the worker keeps the messages (``in_progress``
        restarts their ``ack_wait``) and backs off; cancelled or killed meanwhile, it leaves
        them to be redelivered to another worker after ``ack_wait``."""
        delay = self.settings.retry_delay_s
        while True:
            try:
                return await self.backend.ingest(rows, now, None)
            # Whatever the database raised (its drivers differ): a transient fault, retried.
            except Exception as exc:
                self.stats.failures += 1
                log.warning(
                    "ingest.batch.failed messages=%d retry_in_s=%.1f detail=%s",
                    len(held),
                    delay,
                    exc,
                )
            for msg in held:
                await _settle(msg.in_progress())
            await asyncio.sleep(delay)
            # Below ack_wait: the next in_progress comes before the messages would expire.
            delay = min(delay * 2, self.settings.ack_wait_s / 3)


def _raise_if_cancelled() -> None:
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


async def _settle(action: Any) -> None:
    """An ack/nak/term: a lost one only means a redelivery (the store de-dupes it)."""
    try:
        await action
    except (nats.errors.Error, OSError) as exc:
        log.warning("ingest.settle.failed detail=%s", exc)


async def run_ingest(
    db_url: str, settings: IngestSettings, *, pool_size: int = 4, workers: int = 1
) -> WorkerStats:
    """``customer-store ingest``: ``workers`` connections in this process, each with a pull
    loop per stream it drains, until SIGTERM/SIGINT; prints ``ingesting`` on stdout once
    every loop is subscribed. A hub whose layout disagrees raises ``ShardLayoutError``."""
    import signal

    from cloud_sync.store.backend import open_backend

    backend = await open_backend(db_url, pool_size=pool_size)
    loops = [IngestWorker(settings, backend) for _ in range(workers)]
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    try:
        async with asyncio.TaskGroup() as group:
            readies = [asyncio.Event() for _ in loops]
            tasks = [
                group.create_task(worker.run(ready), name=f"ingest:worker-{number}")
                for number, (worker, ready) in enumerate(zip(loops, readies, strict=True))
            ]
            await asyncio.gather(*(ready.wait() for ready in readies))
            print("ingesting", flush=True)
            await stop.wait()
            for task in tasks:
                task.cancel()
    except BaseExceptionGroup as group:
        refused = group.subgroup(ShardLayoutError) or group.subgroup(StoreError)
        if refused is None:
            raise
        raise _first(refused) from None  # one clear message, not a traceback per worker
    finally:
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)
        await backend.close()
    total = WorkerStats()
    for worker in loops:
        total.messages += worker.stats.messages
        total.accepted += worker.stats.accepted
        total.duplicates += worker.stats.duplicates
        total.probes += worker.stats.probes
        total.rejected.update(worker.stats.rejected)
        total.by_stream.update(worker.stats.by_stream)
    log.info(
        "ingest.stopped messages=%d accepted=%d duplicates=%d rejected=%d",
        total.messages,
        total.accepted,
        total.duplicates,
        sum(total.rejected.values()),
    )
    return total


def _first(group: BaseExceptionGroup[StoreError]) -> StoreError:
    leaf: BaseException = group
    while isinstance(leaf, BaseExceptionGroup):
        leaf = leaf.exceptions[0]
    assert isinstance(leaf, StoreError)
    return leaf
