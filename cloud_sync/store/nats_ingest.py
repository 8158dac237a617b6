"""Central ingest workers: JetStream to the store's database (``customer-store ingest``).

Agents with ``[sync] transport = "nats"`` publish one envelope per message to
``edge.events.<store_id>`` (docs/contracts.md). Each worker is a durable pull consumer on the
stream ``EDGE_EVENTS``; any number of worker processes share the one consumer (``ingest``):
JetStream hands each message to one of them at a time.

A worker fetches up to ``batch`` messages, judges every envelope exactly as the HTTP ingest
does (``ingest.decode_body`` and ``ingest.check_batch``: limits, schema, storable values),
writes the valid ones with the backend's idempotent ``ingest`` in one transaction, and only
after the commit acknowledges them. A worker killed before its acknowledgements leaves the
messages to be redelivered (after ``ack_wait``) to another worker; the store counts those as
duplicates by ``(store_id, event_id)``, so nothing is lost and nothing is stored twice.

Trust: the subject names the publishing store, and NATS enforces it (each store's
credentials may publish only to ``edge.events.<its store_id>``; docs/operations.md). The
worker takes the store id from the subject, never from the message, and refuses an envelope
whose ``store_id`` differs (``store_mismatch``), as the HTTP ingest does with the token's
store.

Poison: a message that can never be stored (bad JSON, bad schema, another store's envelope,
a subject without a store id) is terminated (``term``): counted by reason, logged, never
redelivered. A database that fails is a transient fault: the batch is not acknowledged
(``nak`` with a delay) and comes back; ``max_deliver`` bounds even that.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
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
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DeliverPolicy,
    RetentionPolicy,
    StorageType,
    StreamConfig,
)

from cloud_sync.envelope_schema import default_registry
from cloud_sync.store.backend import Backend
from cloud_sync.store.errors import BadRequestError
from cloud_sync.store.ingest import Limits, Piece, check_batch, decode_body

log = logging.getLogger(__name__)

STREAM: Final = "EDGE_EVENTS"
SUBJECT_PREFIX: Final = "edge.events"
DURABLE: Final = "ingest"
# Resends inside this window are dropped by JetStream itself (Nats-Msg-Id); later ones by
# the store's (store_id, event_id) key. Ten minutes covers an agent's retries of a batch
# whose PubAcks were lost, and keeps the server's id index small.
DUPLICATE_WINDOW_S: Final = 600.0
ACK_WAIT_S: Final = 30.0  # a worker killed with -9: its batch goes to another after this
MAX_DELIVER: Final = 20  # even a batch the database keeps failing stops coming back
_RETRY_DELAY_S: Final = 2.0
_NOT_CLUSTERED: Final = 10074  # JetStream: "replicas > 1 not supported in non-clustered mode"


@dataclass(frozen=True)
class IngestSettings:
    url: str  # nats://HOST:PORT, several separated by commas
    creds: str = ""
    user: str = ""
    password: str = ""
    token: str = ""
    tls_ca: str = ""
    stream: str = STREAM
    subject_prefix: str = SUBJECT_PREFIX
    durable: str = DURABLE
    replicas: int = 0  # 0: 3 on a cluster, 1 on a single server
    batch: int = 500
    fetch_timeout_s: float = 1.0
    ack_wait_s: float = ACK_WAIT_S
    limits: Limits = field(default_factory=Limits)


@dataclass
class WorkerStats:
    messages: int = 0
    batches: int = 0
    accepted: int = 0
    duplicates: int = 0
    erased: int = 0
    rejected: Counter[str] = field(default_factory=Counter)
    failures: int = 0  # batches the database did not take (redelivered)


def connect_options(settings: IngestSettings) -> dict[str, Any]:
    options: dict[str, Any] = {
        "servers": [part.strip() for part in settings.url.split(",") if part.strip()],
        "allow_reconnect": True,
        "max_reconnect_attempts": -1,
        "reconnect_time_wait": 0.5,
        "connect_timeout": 2,
        "name": "customer-store-ingest",
        "error_cb": _log_error,  # one line, not nats-py's default traceback per retry
    }
    if settings.creds:
        options["user_credentials"] = settings.creds
    elif settings.user:
        options["user"], options["password"] = settings.user, settings.password
    elif settings.token:
        options["token"] = settings.token
    if settings.tls_ca:
        options["tls"] = ssl.create_default_context(cafile=settings.tls_ca)
    return options


async def ensure_stream(js: JetStreamContext, settings: IngestSettings) -> int:
    """Create the events stream unless it exists; return its replica count."""
    try:
        info = await js.stream_info(settings.stream)
    except nats.js.errors.NotFoundError:
        pass
    else:
        return int(info.config.num_replicas or 1)
    wanted = [settings.replicas] if settings.replicas else [3, 1]
    for replicas in wanted:
        config = StreamConfig(
            name=settings.stream,
            subjects=[f"{settings.subject_prefix}.>"],
            retention=RetentionPolicy.WORK_QUEUE,  # a message leaves once a worker acked it
            storage=StorageType.FILE,
            num_replicas=replicas,
            duplicate_window=DUPLICATE_WINDOW_S,
        )
        try:
            await js.add_stream(config)
        except nats.js.errors.APIError as exc:
            if exc.err_code == _NOT_CLUSTERED and replicas > 1 and not settings.replicas:
                continue  # a single server: R1
            raise
        log.info("ingest.stream.created stream=%s replicas=%d", settings.stream, replicas)
        return replicas
    raise RuntimeError("unreachable: R1 is always tried last")


async def subscribe(
    js: JetStreamContext, settings: IngestSettings
) -> JetStreamContext.PullSubscription:
    config = ConsumerConfig(
        durable_name=settings.durable,
        ack_policy=AckPolicy.EXPLICIT,
        deliver_policy=DeliverPolicy.ALL,
        ack_wait=settings.ack_wait_s,
        max_deliver=MAX_DELIVER,
        max_ack_pending=max(1000, settings.batch * 8),
    )
    return await js.pull_subscribe(
        f"{settings.subject_prefix}.>", settings.durable, stream=settings.stream, config=config
    )


class IngestWorker:
    """One pull loop: fetch, judge, write, acknowledge; runs until cancelled."""

    def __init__(self, settings: IngestSettings, backend: Backend) -> None:
        self.settings = settings
        self.backend = backend
        self.stats = WorkerStats()
        self._registry = default_registry()

    async def run(self, ready: asyncio.Event | None = None) -> None:
        nc = Client()
        await nc.connect(**connect_options(self.settings))
        try:
            js = nc.jetstream(timeout=10)
            replicas = await ensure_stream(js, self.settings)
            sub = await subscribe(js, self.settings)
            log.info(
                "ingest.worker.started stream=%s durable=%s replicas=%d",
                self.settings.stream,
                self.settings.durable,
                replicas,
            )
            if ready is not None:
                ready.set()
            while True:
                try:
                    msgs = await sub.fetch(
                        self.settings.batch, timeout=self.settings.fetch_timeout_s
                    )
                except (nats.errors.TimeoutError, TimeoutError):
                    continue  # nothing waiting
                except nats.errors.Error as exc:  # a node gone, a reconnect under way
                    log.warning("ingest.fetch.failed detail=%s", exc)
                    await asyncio.sleep(_RETRY_DELAY_S / 4)
                    continue
                await self.handle(msgs)
        finally:
            await nc.close()

    async def handle(self, msgs: Sequence[Msg]) -> None:
        """Judge, write and settle one fetched batch."""
        now = datetime.now(UTC)
        by_store: dict[str, list[tuple[Msg, Piece]]] = {}
        poison: list[tuple[Msg, str]] = []
        for msg in msgs:
            store_id, piece = self._read(msg)
            if store_id is None:  # refused pieces go through check_batch: same reasons
                poison.append((msg, "bad_subject"))
            else:
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
        try:
            counts = await self.backend.ingest(rows, now, None)
        # Whatever the database raised (its drivers differ): not acknowledged, so redelivered,
        # at most MAX_DELIVER times; the worker goes on with the next batch.
        except Exception as exc:
            self.stats.failures += 1
            log.warning("ingest.batch.failed messages=%d detail=%s", len(msgs), exc)
            for msg in good:
                await _settle(msg.nak(delay=_RETRY_DELAY_S))
            return
        # After the commit: acknowledged; and the poison, terminated and counted.
        for msg in good:
            await _settle(msg.ack())
        for msg, reason in poison:
            self.stats.rejected[reason] += 1
            await _settle(msg.term())
        stats = self.stats
        stats.messages += len(msgs)
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

    def _read(self, msg: Msg) -> tuple[str | None, Piece]:
        """The store id the subject names, and the message's one envelope (parsed)."""
        prefix = self.settings.subject_prefix + "."
        store_id = msg.subject[len(prefix) :] if msg.subject.startswith(prefix) else ""
        if not store_id:
            return None, Piece(refused="bad_subject")
        try:
            items = decode_body(b"[" + msg.data + b"]", None, self.settings.limits).items
        except BadRequestError as exc:
            return store_id, Piece(refused=exc.reason)
        except ValueError:
            return store_id, Piece(refused="malformed_json")
        if len(items) != 1:
            return store_id, Piece(refused="not_one_envelope")
        return store_id, items[0]


async def _log_error(exc: Exception) -> None:
    log.warning("ingest.nats.error kind=%s detail=%s", type(exc).__name__, exc)


async def _settle(action: Any) -> None:
    """An ack/nak/term: a lost one only means a redelivery (the store de-dupes it)."""
    try:
        await action
    except (nats.errors.Error, OSError) as exc:
        log.warning("ingest.settle.failed detail=%s", exc)


async def run_ingest(
    db_url: str, settings: IngestSettings, *, pool_size: int = 4, workers: int = 1
) -> WorkerStats:
    """``customer-store ingest``: ``workers`` pull loops in this process until SIGTERM/SIGINT;
    prints ``ingesting`` on stdout once every loop is subscribed."""
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
    finally:
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)
        await backend.close()
    total = WorkerStats()
    for worker in loops:
        total.messages += worker.stats.messages
        total.accepted += worker.stats.accepted
        total.duplicates += worker.stats.duplicates
        total.rejected.update(worker.stats.rejected)
    log.info(
        "ingest.stopped messages=%d accepted=%d duplicates=%d rejected=%d",
        total.messages,
        total.accepted,
        total.duplicates,
        sum(total.rejected.values()),
    )
    return total
