"""The agent's uploader: buffered events to the central store, exactly once in effect.

A drain runs ``sync.concurrency`` workers; each claims unsynced rows (customer events first,
oldest first; ``sync_claims``), applies the upload rule (``edge_agent.governance``), posts
them as one gzip batch and marks them synced, in one transaction, only after the store's
2xx. A crash anywhere before the mark resends the batch; the store counts the resent events
as duplicates, so nothing is stored twice and nothing acknowledged by a device is lost.
The transport is ``sync.transport``: HTTP (``HttpEvents``: a gzip batch per POST) or NATS
JetStream (``cloud_sync.sync_nats``: a message per event, marked after every PubAck); the
claims, lanes, backoff and upload rule are the same for both.

- Store down, slow or 5xx: a worker retries the same rows with capped exponential backoff
  and jitter (``sync.backoff_initial_s`` doubling up to ``sync.backoff_max_s``); every request
  has ``sync.timeout_s``. During a long wait after the store stopped answering (or answered
  502/503/504 without ``Retry-After``) the uploader asks its ``/readyz`` every second and
  resumes as soon as it is ready, instead of sleeping out the backoff. The agent keeps
  collecting meanwhile; the buffer holds the backlog within its disk budget.
- 413 splits a batch in halves; a 400 does too, down to the one event the store cannot read,
  which is then settled like an event the store ``rejected``: invalid for good, marked
  synced (it must not block the queue), counted, logged and copied to the quarantine.
- Live lane: while a large backlog drains, the first worker alternates a batch of the newest
  ``sync.live_lane_size`` customer events with each backlog batch, so fresh interactions
  reach the store in seconds even after days offline. ``sync.max_events_per_s`` caps the
  drain for metered links (batches are spaced, and at most a second's worth each).
- A backlog of ``_PROGRESS_FROM_EVENTS`` or more shows its drain progress, also when it
  builds up during a round (an outage in the middle of a drain).
- ``sync.lag_s`` is how long the oldest unsynced event may have waited, on the monotonic
  clock: a step of the wall clock neither hides nor fakes a lag. It is read from the wall
  clock once, at start, for what the buffer held from before.
- New customer events wake the loop early (a pipeline observer); telemetry waits for
  ``sync.interval_s``. Erasures and model updates are fetched every ``sync.interval_s`` by
  their own task, also while a long drain runs; with ``sync.nats_downlink`` they arrive on
  the store's NATS subjects instead (``cloud_sync.sync_nats_downlink``), and that task keeps
  only the withdrawal announcements (HTTP either way).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Final, Protocol

from tqdm import tqdm

from cloud_sync.sync_batches import Row, build_batch, split
from cloud_sync.sync_claims import Claims, RateLimiter
from cloud_sync.sync_client import (
    BatchRefusedError,
    BatchTooLargeError,
    PostResult,
    StoreClient,
    StoreForbiddenError,
    StoreUnavailableError,
)
from cloud_sync.sync_downlink import Downlink
from edge_agent.backoff import Backoff
from edge_agent.buffer import Buffer
from edge_agent.component import Ports
from edge_agent.config import Config
from edge_agent.errors import SyncError
from edge_agent.events import Event, Rejected, format_ts
from edge_agent.governance import ConsentLedger, pseudonym_key

if TYPE_CHECKING:
    from cloud_sync.sync_nats_downlink import NatsDownlink

log = logging.getLogger(__name__)

_WAKE_LINGER_S: Final = 0.2  # gather the events of a burst into one request
_REJECTED: Final = "store_rejected"
_PROGRESS_FROM_EVENTS: Final = 20_000  # a backlog this large is worth a progress display
_PROGRESS_LOG_EVERY_S: Final = 10.0
_PROBE_EVERY_S: Final = 1.0  # during a long backoff, ask whether the store is back this often
_PROBE_TIMEOUT_S: Final = 2.0
# Answers that mean "not there right now" rather than "something is wrong with the request":
# the readiness probe can end their backoff early. A 500 or a 429 is waited out in full.
_AWAY_STATUSES: Final = frozenset({502, 503, 504})


class DrainProgress:
    """Progress of one large drain: a tqdm bar when stderr is a terminal, else log lines."""

    def __init__(self, backlog: int, log_every_s: float = _PROGRESS_LOG_EVERY_S) -> None:
        self._log_every_s = log_every_s
        self._bar = tqdm(
            total=backlog,
            unit="ev",
            desc="sync backlog",
            file=sys.stderr,
            disable=not sys.stderr.isatty(),
        )
        self._started = self._logged = time.monotonic()
        self._sent = 0
        log.info("sync.drain.start backlog=%d", backlog)

    def advance(self, events: int, remaining: int) -> None:
        self._sent += events
        self._bar.update(events)
        now = time.monotonic()
        if now - self._logged >= self._log_every_s:
            self._logged = now
            log.info(
                "sync.drain.progress sent=%d remaining=%d rate_per_s=%.0f",
                self._sent,
                remaining,
                self._sent / max(now - self._started, 1e-6),
            )

    def close(self) -> None:
        self._bar.close()


@dataclass
class SyncStats:
    sent: int = 0  # events the store acknowledged since start (stored, duplicate or erased)
    duplicates: int = 0
    rejected: int = 0  # settled as invalid for good
    batches: int = 0
    errors: int = 0
    last_error: str | None = None
    last_success: str | None = None


class EventTransport(Protocol):
    """Where settled rows go: the store's HTTP API or NATS JetStream (``sync.transport``).

    ``post_rows`` governs the rows through ``sync_batches`` and returns once the far side
    acknowledged them; it raises ``StoreUnavailableError`` (retry the same rows later),
    ``BatchTooLargeError``/``BatchRefusedError`` (split) or ``StoreForbiddenError``.
    """

    async def post_rows(
        self, rows: Sequence[Row], consent: ConsentLedger, key: bytes, compress: bool
    ) -> PostResult: ...

    async def ready(self, timeout_s: float) -> bool: ...


class HttpEvents:
    """The HTTP transport: one gzip JSON array per batch, ``POST /v1/events``."""

    def __init__(self, client: StoreClient) -> None:
        self.client = client

    async def post_rows(
        self, rows: Sequence[Row], consent: ConsentLedger, key: bytes, compress: bool
    ) -> PostResult:
        batch = await asyncio.to_thread(build_batch, rows, consent, key, compress)
        return await self.client.post_events(batch.body, batch.gzipped)

    async def ready(self, timeout_s: float) -> bool:
        return await self.client.ready(timeout_s)


class Uploader:
    """The sync component (``name = "sync"``); runs while the agent runs."""

    name = "sync"

    def __init__(self, config: Config) -> None:
        self.config = config
        self.settings = config.sync
        self.stats = SyncStats()
        self.downlink: Downlink | None = None
        self.nats_downlink: NatsDownlink | None = None
        self._buffer: Buffer | None = None
        self._wake = asyncio.Event()
        self._key = b""
        # Until run() is given the agent's ledger: the strictest reading (nothing in clear).
        self._consent = ConsentLedger(require_consent=True)
        # Shared by the workers: one outage, one backoff.
        first = min(config.sync.backoff_initial_s, config.sync.backoff_max_s)
        self._backoff = Backoff(first, config.sync.backoff_max_s)
        self._limiter = RateLimiter(config.sync.max_events_per_s)
        self._progress: DrainProgress | None = None
        self.progress_from_events = _PROGRESS_FROM_EVENTS  # a backlog worth a progress display
        self.progress_log_every_s = _PROGRESS_LOG_EVERY_S
        # Monotonic time before which every committed event is synced; None until started.
        self._synced_through: float | None = None
        self._probe_lock = asyncio.Lock()
        self._probed_at = -math.inf
        self._probe_ready = False

    # ---- the Component protocol -------------------------------------------------------

    def status(self) -> dict[str, dict[str, Any]]:
        stats = self.stats
        pending = self._buffer.counters.pending if self._buffer is not None else 0
        return {
            "sync": {
                "enabled": True,
                "url": self.settings.url,
                "lag_s": self._lag_s(pending),
                "sent": stats.sent,
                "last_success": stats.last_success,
                "backlog": pending,
                "batches": stats.batches,
                "duplicates": stats.duplicates,
                "rejected": stats.rejected,
                "errors": stats.errors,
                "last_error": stats.last_error,
                "erasures_applied": self.downlink.erasures_applied if self.downlink else 0,
                "model_version": self.downlink.model_version if self.downlink else None,
                "models_refused": self.downlink.models_refused if self.downlink else 0,
                "model_last_error": self.downlink.last_model_error if self.downlink else None,
                "nats_downlink": self.nats_downlink.status() if self.nats_downlink else None,
            }
        }

    def _lag_s(self, pending: int) -> float | None:
        """Seconds the oldest unsynced event may have waited (monotonic); 0 when none waits.

        None before the uploader started: the status board then fills in its own figure.
        """
        if pending == 0:
            return 0.0
        if self._synced_through is None:
            return None
        return round(max(0.0, time.monotonic() - self._synced_through), 3)

    async def run(self, ports: Ports) -> None:
        buffer = self._buffer = ports.buffer
        self._consent = ports.consent
        self._key = await asyncio.to_thread(pseudonym_key, self.config)
        # The wall clock is read once, for what waited before this start; the rest of the
        # run measures on the monotonic clock.
        oldest = await buffer.oldest_pending_received_at()
        waited = max(0.0, time.time() - oldest) if oldest is not None else 0.0
        self._synced_through = time.monotonic() - waited
        ports.pipeline.observers.append(self._on_commit)
        try:
            async with contextlib.AsyncExitStack() as stack:
                events = await self._open(stack)
                await self._loop(events, ports)
        finally:
            ports.pipeline.observers.remove(self._on_commit)

    async def _open(self, stack: contextlib.AsyncExitStack) -> EventTransport:
        """The events' transport, and the downlink's HTTP client when there is a store URL."""
        settings = self.settings
        client: StoreClient | None = None
        if settings.http_url:
            connections = max(4, settings.concurrency + 2)
            client = await stack.enter_async_context(
                StoreClient(settings.http_url, settings.token, settings.timeout_s, connections)
            )
            assert self._buffer is not None
            self.downlink = Downlink(client, self._buffer, self.config, self._key)
        if settings.nats_downlink and self.downlink is not None:
            from cloud_sync.sync_nats_downlink import NatsDownlink  # the [nats] extra

            self.nats_downlink = NatsDownlink(self.downlink, settings, self.config.agent.store_id)
        if settings.transport == "nats":
            from cloud_sync.sync_nats import NatsEvents  # nats-py: the [nats] extra

            return await stack.enter_async_context(NatsEvents(settings, self.config.agent.store_id))
        assert client is not None  # the config requires sync.url for HTTP
        return HttpEvents(client)

    # ---- the loop ---------------------------------------------------------------------

    def _on_commit(self, events: Sequence[Event]) -> None:
        if any(event.customer for event in events):
            self._wake.set()

    async def _loop(self, client: EventTransport, ports: Ports) -> None:
        async with asyncio.TaskGroup() as group:
            group.create_task(self._downlink_loop(ports), name="sync:downlink")
            if self.nats_downlink is not None:
                group.create_task(
                    self.nats_downlink.run(ports.erasure_listeners, ports.model_listeners),
                    name="sync:nats-downlink",
                )
            while True:
                self._wake.clear()  # events committed from here on wake the next wait
                await self._drain(client, ports.buffer)
                await self._wait(self.settings.interval_s)

    async def _wait(self, within_s: float) -> None:
        try:
            await asyncio.wait_for(self._wake.wait(), within_s)
        except TimeoutError:
            return
        await asyncio.sleep(_WAKE_LINGER_S)

    async def _downlink_loop(self, ports: Ports) -> None:
        while True:
            await self._run_downlink(ports)
            await asyncio.sleep(self.settings.interval_s)

    async def _run_downlink(self, ports: Ports) -> None:
        if self.downlink is None:
            return
        try:
            if self.nats_downlink is None:  # else they arrive over NATS
                await self.downlink.apply_erasures(ports.erasure_listeners)
                await self.downlink.fetch_model(ports.model_listeners)
            await self.downlink.announce_withdrawals()
        except SyncError as exc:  # the uplink goes on; the downlink retries next cycle
            self._record_error(exc, self.settings.interval_s)

    async def _drain(self, client: EventTransport, buffer: Buffer) -> None:
        """Upload until nothing unsynced is left: ``sync.concurrency`` workers in parallel."""
        claims = Claims(buffer)
        sent_before, started = self.stats.sent, time.monotonic()
        # A large backlog (days offline) shows its progress: a bar on a terminal, a log
        # line every few seconds for journald. One that builds during the round starts
        # showing it then (``_settle``).
        self._progress = None
        self._show_progress(buffer.counters.pending)
        try:
            async with asyncio.TaskGroup() as group:
                for number in range(self.settings.concurrency):
                    group.create_task(
                        self._worker(client, buffer, claims, live=number == 0),
                        name=f"sync:worker-{number}",
                    )
        finally:
            if self._progress is not None:
                self._progress.close()
                self._progress = None
        # The round read until nothing was left: whatever was committed before it started
        # is synced now (settled, in the case of events the store refused for good).
        self._synced_through = started
        sent = self.stats.sent - sent_before
        if sent:
            # A backlog drained is news; the steady trickle of a busy store is not.
            log.log(
                logging.INFO if sent >= self.settings.batch_size else logging.DEBUG,
                "sync.drain.complete events=%d seconds=%.2f backlog=%d",
                sent,
                time.monotonic() - started,
                buffer.counters.pending,
            )

    async def _worker(
        self, client: EventTransport, buffer: Buffer, claims: Claims, live: bool
    ) -> None:
        """Claim, post, settle, until the claims run dry; the first worker runs the live lane."""
        settings = self.settings
        size = settings.batch_size
        if settings.max_events_per_s > 0:  # a batch is at most about a second's worth
            size = min(size, max(1, math.ceil(settings.max_events_per_s)))
        backlog_large = size * settings.concurrency
        while True:
            if live and settings.live_lane_size and buffer.counters.pending > backlog_large:
                # Alternate: the newest customer events, then a backlog batch.
                fresh = await claims.claim_newest(min(settings.live_lane_size, size))
                if fresh:
                    await self._deliver(client, buffer, fresh)
                    claims.settled(fresh)
            rows = await claims.claim(size)
            if not rows:
                return
            await self._deliver(client, buffer, rows)

    async def _deliver(self, client: EventTransport, buffer: Buffer, rows: Sequence[Row]) -> None:
        """Post ``rows`` until the store settles them, through any outage."""
        await self._limiter.take(len(rows))
        while True:
            try:
                await self._send(client, buffer, rows)
            except StoreUnavailableError as exc:
                delay = max(self._backoff.next_delay(), exc.retry_after_s or 0.0)
                self._record_error(exc, delay)
                away = exc.retry_after_s is None and (
                    exc.status is None or exc.status in _AWAY_STATUSES
                )
                await self._pause(client, delay, probe=away)
            except StoreForbiddenError as exc:
                # A token or config problem: keep collecting, retry rarely, say so loudly.
                self._record_error(exc, self.settings.backoff_max_s, level=logging.ERROR)
                await asyncio.sleep(self.settings.backoff_max_s)
            else:
                self._backoff.reset()
                return

    async def _pause(self, client: EventTransport, delay: float, probe: bool) -> None:
        """Wait ``delay``; with ``probe``, return early once the store is ready again."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + delay
        while (left := deadline - loop.time()) > 0:
            if not probe or left <= _PROBE_EVERY_S:
                await asyncio.sleep(left)
                return
            await asyncio.sleep(_PROBE_EVERY_S)
            if await self._store_ready(client):
                log.info("sync.store.back waited_s=%.1f of=%.1f", delay - left, delay)
                return

    async def _store_ready(self, client: EventTransport) -> bool:
        """One readiness probe per second at most, shared by every waiting worker."""
        async with self._probe_lock:
            if time.monotonic() - self._probed_at >= _PROBE_EVERY_S:
                timeout = min(_PROBE_TIMEOUT_S, self.settings.timeout_s)
                self._probe_ready = await client.ready(timeout)
                self._probed_at = time.monotonic()
            return self._probe_ready

    def _show_progress(self, pending: int) -> None:
        if self._progress is None and pending >= self.progress_from_events:
            self._progress = DrainProgress(pending, self.progress_log_every_s)

    async def _send(self, client: EventTransport, buffer: Buffer, rows: Sequence[Row]) -> None:
        """Post ``rows`` until settled; split on 413/400 to isolate what the store refuses."""
        try:
            result = await client.post_rows(rows, self._consent, self._key, self.settings.gzip)
        except (BatchTooLargeError, BatchRefusedError) as exc:
            if len(rows) > 1:
                log.warning("sync.batch.split rows=%d reason=%s", len(rows), exc)
                first, second = split(rows)
                await self._send(client, buffer, first)
                await self._send(client, buffer, second)
                return
            reason = "too_large" if isinstance(exc, BatchTooLargeError) else "unreadable"
            result = PostResult(0, 0, 0, [{"index": 0, "reason": reason}])
        await self._settle(buffer, rows, result)

    async def _settle(self, buffer: Buffer, rows: Sequence[Row], result: PostResult) -> None:
        # The refusals first: once a row is marked synced its refusal is already on record
        # (a crash in between quarantines it twice at worst, never not at all).
        await buffer.quarantine(_refusals(rows, result.rejected))
        await buffer.mark_synced([row.seq for row in rows])
        self._show_progress(buffer.counters.pending)  # a backlog that built during the round
        if self._progress is not None:
            self._progress.advance(len(rows), buffer.counters.pending)
        stats = self.stats
        stats.batches += 1
        stats.sent += result.accepted + result.duplicates + result.erased
        stats.duplicates += result.duplicates
        stats.last_success = format_ts(datetime.now(UTC))
        if result.rejected:
            stats.rejected += len(result.rejected)
            log.warning(
                "sync.batch.rejected rows=%d rejected=%d first_reason=%s",
                len(rows),
                len(result.rejected),
                result.rejected[0].get("reason"),
            )
        log.debug(
            "sync.batch.complete rows=%d accepted=%d duplicates=%d erased=%d",
            len(rows),
            result.accepted,
            result.duplicates,
            result.erased,
        )

    def _record_error(
        self, exc: SyncError, retry_in_s: float, level: int = logging.WARNING
    ) -> None:
        self.stats.errors += 1
        self.stats.last_error = str(exc)[:500]
        log.log(
            level,
            "sync.error kind=%s retry_in_s=%.1f detail=%s",
            type(exc).__name__,
            retry_in_s,
            exc,
        )


def _refusals(rows: Sequence[Row], rejected: Sequence[dict[str, Any]]) -> list[Rejected]:
    """What the store refused for good, for the agent's quarantine (a person looks there)."""
    now = format_ts(datetime.now(UTC))
    records = []
    for item in rejected:
        index = item.get("index")
        if isinstance(index, int) and 0 <= index < len(rows):
            raw = rows[index].envelope.encode("utf-8")
            detail = f"store refused: {item.get('reason')}"
            records.append(Rejected("sync", _REJECTED, raw, detail, now))
    return records
