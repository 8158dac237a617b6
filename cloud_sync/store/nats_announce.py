"""The NATS downlink's publisher: erasures and model rollouts to each store's subjects.

``customer-store announce --from-db URL --to nats://...`` runs one loop beside the HTTP
servers. It reads the database, never a request: the erasures table and the rollout state
are the outbox, so whatever wrote them (an admin's ``DELETE`` on any ``serve`` instance, a
``model publish|promote|rollback`` on the command line, the automatic canary check) is
announced, only after its commit, and a restart or an outage of NATS is caught up.

Every ``interval_s``:

- Erasures after the cursor (kept in the KV bucket ``EDGE_DOWNLINK_STATE``, key
  ``erasure_cursor``), as agents read them over HTTP (agents' own pseudonym reports left out):
  one notice per erasure per store, blinded with each valid credential of that store
  (``cloud_sync.downlink_notices``), ``Nats-Msg-Id: erasure:<store_id>:<seq>``. The cursor
  moves only once JetStream acknowledged every notice up to it; a crash in between publishes
  them again, and JetStream (duplicate window) or the agent (its cursor) drops the copies.
  Each notice names the previous one's cursor, so an agent sees a gap (it joined late, or the
  stream's limits dropped what it had not read) and catches up over HTTP.
- Models: for each store, the version the rollout serves it (``rollout.version_for``), with
  the manifest and ETag of ``GET /v1/models/latest``, announced when it or the store's keys
  changed since this process last announced it (at start: once per store).

nats-py's errors are handled here: the loop logs, backs off and goes on, as it does when the
database is away.
"""

from __future__ import annotations

import asyncio
import logging
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Final

import nats.errors
import nats.js.errors
from nats.aio.client import Client
from nats.js import JetStreamContext
from nats.js.api import DiscardPolicy, KeyValueConfig, StorageType, StreamConfig
from nats.js.kv import KeyValue

from cloud_sync import downlink_notices as notices
from cloud_sync.store import rollout
from cloud_sync.store.backend import Backend
from cloud_sync.store.errors import BackendError
from cloud_sync.store.nats_connect import NatsAccess, connect_options
from cloud_sync.store.records import ModelRecord, format_ts

log = logging.getLogger(__name__)

STATE_BUCKET: Final = "EDGE_DOWNLINK_STATE"
CURSOR_KEY: Final = "erasure_cursor"
DUPLICATE_WINDOW_S: Final = 600.0
_NOT_CLUSTERED: Final = 10074
_ERASURES_PER_PAGE: Final = 500
_PAGES_PER_ROUND: Final = 20  # bounded: the rest waits for the next round
_BACKOFF_MAX_S: Final = 30.0


@dataclass(frozen=True)
class AnnounceSettings(NatsAccess):
    replicas: int = 0  # 0: 3 on a cluster, 1 on a single server
    interval_s: float = 1.0
    # Per store and kind: an agent away longer than this many erasures catches up over HTTP.
    max_msgs_per_subject: int = 10_000
    timeout_s: float = 10.0


@dataclass
class AnnounceStats:
    erasures: int = 0  # erasures announced (each to every store)
    notices: int = 0  # messages published
    models: int = 0  # model announcements
    failures: int = 0  # rounds that did not finish (NATS or the database away)
    by_store: dict[str, str] = field(default_factory=dict)  # the ETag last announced


async def ensure_stream(js: JetStreamContext, settings: AnnounceSettings) -> int:
    """Create the downlink stream unless it exists; return its replica count."""
    try:
        info = await js.stream_info(notices.STREAM)
    except nats.js.errors.NotFoundError:
        pass
    else:
        return int(info.config.num_replicas or 1)
    for replicas in [settings.replicas] if settings.replicas else [3, 1]:
        config = StreamConfig(
            name=notices.STREAM,
            subjects=[f"{notices.SUBJECT_PREFIX}.>"],
            storage=StorageType.FILE,
            num_replicas=replicas,
            duplicate_window=DUPLICATE_WINDOW_S,
            max_msgs_per_subject=settings.max_msgs_per_subject,
            discard=DiscardPolicy.OLD,
        )
        try:
            await js.add_stream(config)
        except nats.js.errors.APIError as exc:
            if exc.err_code == _NOT_CLUSTERED and replicas > 1 and not settings.replicas:
                continue
            raise
        log.info("announce.stream.created stream=%s replicas=%d", notices.STREAM, replicas)
        return replicas
    raise RuntimeError("unreachable: R1 is always tried last")


async def ensure_state(js: JetStreamContext, replicas: int) -> KeyValue:
    try:
        return await js.key_value(STATE_BUCKET)
    except nats.js.errors.BucketNotFoundError:
        config = KeyValueConfig(bucket=STATE_BUCKET, history=1, replicas=replicas)
        return await js.create_key_value(config)


def store_keys(pairs: Sequence[tuple[str, str]]) -> dict[str, list[bytes]]:
    """Each store's blinding keys (sha256 of its valid tokens), stores a subject can name."""
    keys: dict[str, list[bytes]] = defaultdict(list)
    for store_id, token_hash in pairs:
        if not notices.subject_store_id(store_id):
            log.warning("announce.store.skipped store=%r reason=not_a_subject_token", store_id)
            continue
        try:
            key = bytes.fromhex(token_hash)
        except ValueError:
            continue
        if len(keys[store_id]) < notices.MAX_KEYS_PER_STORE:
            keys[store_id].append(key)
    return dict(keys)


class Announcer:
    """One publishing loop; ``round`` is one pass (the tests call it directly)."""

    def __init__(self, backend: Backend, settings: AnnounceSettings) -> None:
        self.backend = backend
        self.settings = settings
        self.stats = AnnounceStats()
        self._announced: dict[str, tuple[str, tuple[bytes, ...]]] = {}

    async def run(self, ready: asyncio.Event | None = None) -> None:
        nc = await self._connect()
        try:
            js = nc.jetstream(timeout=self.settings.timeout_s)
            replicas = await ensure_stream(js, self.settings)
            state = await ensure_state(js, replicas)
            log.info("announce.started stream=%s replicas=%d", notices.STREAM, replicas)
            if ready is not None:
                ready.set()
            wait = self.settings.interval_s
            while True:
                try:
                    await self.round(js, state)
                except (BackendError, nats.errors.Error, TimeoutError, OSError) as exc:
                    self.stats.failures += 1
                    wait = min(max(wait * 2, self.settings.interval_s), _BACKOFF_MAX_S)
                    log.warning("announce.round.failed retry_s=%.1f detail=%s", wait, exc)
                else:
                    wait = self.settings.interval_s
                await asyncio.sleep(wait)
        finally:
            await nc.close()

    async def _connect(self) -> Client:
        """Connected once (nats-py reconnects by itself after that); a hub that is not up
        yet is waited for, with a capped backoff, rather than ending the service."""
        wait = self.settings.interval_s
        while True:
            nc = Client()
            try:
                await nc.connect(**connect_options(self.settings, "customer-store-announce"))
            except (nats.errors.Error, TimeoutError, OSError) as exc:
                await nc.close()
                wait = min(wait * 2, _BACKOFF_MAX_S)
                log.warning("announce.connect.failed retry_s=%.1f detail=%s", wait, exc)
                await asyncio.sleep(wait)
            else:
                return nc

    async def round(self, js: JetStreamContext, state: KeyValue) -> None:
        keys = store_keys(await self.backend.agent_keys())
        await self._erasures(js, state, keys)
        await self._models(js, keys)

    async def _erasures(
        self, js: JetStreamContext, state: KeyValue, keys: dict[str, list[bytes]]
    ) -> None:
        cursor = await _read_cursor(state)
        for _ in range(_PAGES_PER_ROUND):
            rows = await self.backend.erasures(cursor, _ERASURES_PER_PAGE, agent_reports=False)
            if not rows:
                return
            acks = []
            for erasure in rows:
                requested_at = format_ts(erasure.requested_at)
                for store_id, store_keys_ in keys.items():
                    name = notices.subject(store_id, notices.ERASURE)
                    body = notices.erasure_notice(
                        name,
                        erasure.customer_id,
                        store_keys_,
                        cursor=erasure.seq,
                        previous=cursor,
                        requested_at=requested_at,
                    )
                    msg_id = f"erasure:{store_id}:{erasure.seq}"
                    acks.append(await self._publish(js, name, body, msg_id))
                cursor = erasure.seq
            await asyncio.wait_for(asyncio.gather(*acks), self.settings.timeout_s)
            # Only now: every notice up to the cursor is in the stream.
            await state.put(CURSOR_KEY, str(cursor).encode())
            self.stats.erasures += len(rows)
            self.stats.notices += len(acks)
            log.info(
                "announce.erasures.published erasures=%d stores=%d cursor=%d",
                len(rows),
                len(keys),
                cursor,
            )

    async def _models(self, js: JetStreamContext, keys: dict[str, list[bytes]]) -> None:
        state = await self.backend.rollout()
        records: dict[str, ModelRecord | None] = {}
        for store_id, store_keys_ in keys.items():
            version = rollout.version_for(state, store_id)
            if version is None:
                continue
            if version not in records:
                records[version] = await self.backend.model_record(version)
            record = records[version]
            if record is None:
                continue
            wanted = (record.etag, tuple(store_keys_))
            if self._announced.get(store_id) == wanted:
                continue
            name = notices.subject(store_id, notices.MODEL)
            body = notices.model_notice(name, record.etag, record.manifest, store_keys_)
            ack = await self._publish(js, name, body, f"model:{store_id}:{record.etag}")
            await asyncio.wait_for(ack, self.settings.timeout_s)
            self._announced[store_id] = wanted
            self.stats.models += 1
            self.stats.by_store[store_id] = record.etag
            log.info("announce.model.published store=%s version=%s", store_id, record.version)

    async def _publish(
        self, js: JetStreamContext, name: str, body: bytes, msg_id: str
    ) -> asyncio.Future[Any]:
        return await js.publish_async(
            name, body, wait_stall=self.settings.timeout_s, headers={"Nats-Msg-Id": msg_id}
        )


async def _read_cursor(state: KeyValue) -> int:
    try:
        entry = await state.get(CURSOR_KEY)
    except nats.js.errors.KeyNotFoundError:
        return 0
    text = (entry.value or b"0").decode("ascii", "replace")
    return int(text) if text.isdigit() else 0


async def run_announce(
    db_url: str, settings: AnnounceSettings, *, pool_size: int = 2
) -> AnnounceStats:
    """``customer-store announce``: until SIGTERM/SIGINT; prints ``announcing`` on stdout once
    the stream exists."""
    import signal

    from cloud_sync.store.backend import open_backend

    backend = await open_backend(db_url, pool_size=pool_size)
    announcer = Announcer(backend, settings)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    try:
        async with asyncio.TaskGroup() as group:
            ready = asyncio.Event()
            task = group.create_task(announcer.run(ready), name="announce:loop")
            waiting = group.create_task(ready.wait(), name="announce:ready")
            await asyncio.wait([task, waiting], return_when=asyncio.FIRST_COMPLETED)
            if ready.is_set():
                print("announcing", flush=True)
                await stop.wait()
            task.cancel()
            waiting.cancel()
    finally:
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)
        await backend.close()
    stats = announcer.stats
    log.info(
        "announce.stopped erasures=%d notices=%d models=%d failures=%d",
        stats.erasures,
        stats.notices,
        stats.models,
        stats.failures,
    )
    return stats
