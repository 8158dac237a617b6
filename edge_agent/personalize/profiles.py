"""The customer's central profile at the edge: fetched in the background, cached, dropped.

``CentralProfiles`` is a component. It taps the pipeline: a ``customer.identified`` or any
trigger of a customer it holds nothing fresh about queues a fetch of
``GET /v1/profiles/{customer_id}`` from the central store (sync url and token). Workers
(``[profiles] concurrency``) fetch; one customer is fetched once at a time (single flight);
the queue is bounded (a full queue skips, counted). The personalizer asks ``lookup`` on its
request path: a dictionary read, never a wait; the first suggestion may be local only, the
profile improves the next ones.

Who gets one: not a pseudonymised id, and not a customer whose local consent record says no
personalization or no profile sharing (a customer without a local record may have consented
elsewhere: the store answers 404 unless its resolved consent allows sharing). A consent
withdrawal seen here, or an erasure, drops the cached profile and discards a fetch in flight.

Cache: least recently used first out beyond ``max_customers`` or ``max_cache_bytes`` (the
bodies' sizes), each entry fresh for ``ttl_s`` (a stale one is still served while it is
fetched again); a 404 is cached the same way as "no profile". Store down: fetches back off
exponentially with jitter (``backoff_max_s``) and the cache serves what it holds; with none,
suggestions use local state only.
"""

from __future__ import annotations

import asyncio
import bisect
import collections
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Final

from cloud_sync.sync_client import (
    ProfileTooLargeError,
    StoreClient,
    StoreForbiddenError,
    StoreUnavailableError,
)
from edge_agent.backoff import Backoff
from edge_agent.component import Ports
from edge_agent.config import Config, ProfilesSection
from edge_agent.errors import SyncError
from edge_agent.events import Event
from edge_agent.governance import PSEUDONYM_PREFIX, ConsentLedger
from edge_agent.personalize.profile_merge import (
    CentralProfile,
    ProfileRejectedError,
    parse_profile,
)
from edge_agent.personalize.session import TRIGGER_TYPES

if TYPE_CHECKING:
    from edge_agent.buffer import Buffer

log = logging.getLogger(__name__)

OUTCOMES: Final = (
    "found",  # a profile arrived and was cached
    "not_found",  # 404: no profile, or no consent to share it
    "rejected",  # a body that is not a profile (by reason: ``rejected``)
    "too_large",
    "unavailable",  # network error, timeout, 5xx, 429
    "forbidden",  # 401/403 or another 4xx: the token or config
    "discarded",  # arrived after an erasure or a consent withdrawal
    "queue_full",  # not fetched: too many waiting
)
REJECT_REASONS: Final = ("not_json", "too_deep", "bad_type", "wrong_customer", "too_many")
# Fetch latency buckets (seconds): loopback answers in about a millisecond, a WAN in tens.
FETCH_BUCKETS_S: Final = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
_NEGATIVE_BYTES: Final = 64  # what a cached "no profile" is charged in the byte budget


@dataclass
class _Histogram:
    counts: list[int] = field(default_factory=lambda: [0] * (len(FETCH_BUCKETS_S) + 1))
    sum_s: float = 0.0

    def observe(self, seconds: float) -> None:
        self.counts[bisect.bisect_left(FETCH_BUCKETS_S, seconds)] += 1
        self.sum_s += seconds

    def as_status(self) -> dict[str, Any]:
        cumulative, running = [], 0
        for bound, count in zip((*FETCH_BUCKETS_S, math.inf), self.counts, strict=True):
            running += count
            cumulative.append(["+Inf" if math.isinf(bound) else bound, running])
        return {"buckets": cumulative, "sum_s": round(self.sum_s, 6), "count": running}


@dataclass(slots=True)
class _Entry:
    profile: CentralProfile | None  # None: the store has none for us (404)
    fetched_at: float  # monotonic
    size: int


class CentralProfiles:
    """The profile component (see the module's docstring); ``lookup`` is its port."""

    name = "profiles"

    def __init__(
        self,
        config: Config,
        *,
        client_factory: Callable[[], StoreClient] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settings: ProfilesSection = config.profiles
        self._client_factory = client_factory or (
            lambda: StoreClient(
                config.sync.url,
                config.sync.token,
                self.settings.timeout_s,
                connections=self.settings.concurrency,
            )
        )
        self._clock = clock
        self.consent = ConsentLedger(config.governance.require_consent)
        self._cache: collections.OrderedDict[str, _Entry] = collections.OrderedDict()
        self._bytes = 0
        self._queue: asyncio.Queue[str] = asyncio.Queue(self.settings.max_queue)
        self._pending: set[str] = set()  # queued or in flight: one fetch per customer
        self._discard: set[str] = set()  # in flight, then forgotten: drop what arrives
        self._backoff = Backoff(base=0.5, cap=self.settings.backoff_max_s)
        self._resume_at = 0.0  # monotonic: no fetch before this (the store is down)
        self.fetches: collections.Counter[str] = collections.Counter(dict.fromkeys(OUTCOMES, 0))
        self.rejected: collections.Counter[str] = collections.Counter(
            dict.fromkeys(REJECT_REASONS, 0)
        )
        self.evicted = 0
        self.latency = _Histogram()
        self._buffer: Buffer | None = None  # keeps the central grants (set by ``run``)
        self.central_consent: collections.Counter[str] = collections.Counter(granted=0, revoked=0)

    # ---- the port ---------------------------------------------------------------------

    def lookup(self, customer_id: str) -> CentralProfile | None:
        """The cached profile (perhaps stale), on the loop, no I/O; queues a fetch when
        there is none fresh and the customer may have one."""
        if not self.may_fetch(customer_id):
            return None
        entry = self._cache.get(customer_id)
        if entry is None or self._clock() - entry.fetched_at >= self.settings.ttl_s:
            self._request(customer_id)
        if entry is None:
            return None
        self._cache.move_to_end(customer_id)
        return entry.profile

    def may_fetch(self, customer_id: str) -> bool:
        if customer_id.startswith(PSEUDONYM_PREFIX):
            return False  # a pseudonymised customer's history stays where it was recorded
        return self.consent.profile_fetch_allowed(customer_id)

    def forget(self, customer_id: str) -> None:
        """Erasure or consent withdrawal: drop the profile and whatever is on its way."""
        entry = self._cache.pop(customer_id, None)
        if entry is not None:
            self._bytes -= entry.size
        if customer_id in self._pending:
            self._discard.add(customer_id)

    # ---- Component --------------------------------------------------------------------

    async def run(self, ports: Ports) -> None:
        self.consent = ports.consent
        self._buffer = ports.buffer
        ports.profiles = self
        ports.pipeline.taps.append(self._on_events)
        ports.erasure_listeners.append(self.forget)
        try:
            async with self._client_factory() as client, asyncio.TaskGroup() as group:
                for number in range(self.settings.concurrency):
                    group.create_task(self._worker(client), name=f"profiles:fetch-{number}")
        finally:
            ports.pipeline.taps.remove(self._on_events)
            ports.erasure_listeners.remove(self.forget)
            if ports.profiles is self:
                ports.profiles = None

    def status(self) -> dict[str, dict[str, Any]]:
        return {
            "profiles": {
                "cached": len(self._cache),
                "cache_bytes": self._bytes,
                "evicted": self.evicted,
                "queued": self._queue.qsize(),
                "in_flight": len(self._pending) - self._queue.qsize(),
                "fetches": dict(self.fetches),
                "rejected": dict(self.rejected),
                "fetch_latency_histogram": self.latency.as_status(),
                "central_consent": {
                    "held": self.consent.central_grants,
                    **self.central_consent,
                },
            }
        }

    # ---- on the loop ------------------------------------------------------------------

    def _on_events(self, events: Sequence[Event]) -> None:
        for event in events:
            customer_id = event.customer_id
            if customer_id is None:
                continue
            if event.type == "consent.update":
                if not self.may_fetch(customer_id):  # governed before the tap
                    self.forget(customer_id)
            elif event.type in TRIGGER_TYPES:
                self.lookup(customer_id)

    def _request(self, customer_id: str) -> None:
        if customer_id in self._pending:
            return
        try:
            self._queue.put_nowait(customer_id)
        except asyncio.QueueFull:
            self.fetches["queue_full"] += 1
            return
        self._pending.add(customer_id)

    def _store(self, customer_id: str, profile: CentralProfile | None, size: int) -> None:
        old = self._cache.pop(customer_id, None)
        if old is not None:
            self._bytes -= old.size
        self._cache[customer_id] = _Entry(profile, self._clock(), size)
        self._bytes += size
        settings = self.settings
        while len(self._cache) > settings.max_customers or (
            self._bytes > settings.max_cache_bytes and len(self._cache) > 1
        ):
            _, dropped = self._cache.popitem(last=False)
            self._bytes -= dropped.size
            self.evicted += 1

    # ---- the fetch workers -----------------------------------------------------------

    async def _worker(self, client: StoreClient) -> None:
        while True:
            customer_id = await self._queue.get()
            try:
                wait = self._resume_at - self._clock()
                if wait > 0:
                    await asyncio.sleep(wait)
                await self._fetch(client, customer_id)
            finally:
                self._pending.discard(customer_id)
                self._discard.discard(customer_id)

    async def _fetch(self, client: StoreClient, customer_id: str) -> None:
        if customer_id in self._discard or not self.may_fetch(customer_id):
            self.fetches["discarded"] += 1
            return
        started = time.perf_counter()
        try:
            body = await client.profile(customer_id, self.settings.max_body_bytes)
        except ProfileTooLargeError as exc:
            self._outcome("too_large", started)
            log.warning("profiles.fetch.too_large error=%s", exc)
            self._store(customer_id, None, _NEGATIVE_BYTES)  # do not fetch it again at once
            return
        except StoreUnavailableError as exc:
            self._outcome("unavailable", started)
            delay = max(self._backoff.next_delay(), exc.retry_after_s or 0.0)
            self._resume_at = self._clock() + delay
            log.info("profiles.fetch.unavailable retry_in_s=%.1f error=%s", delay, exc)
            return
        except StoreForbiddenError as exc:  # the token: a person must look; do not hammer
            self._outcome("forbidden", started)
            self._resume_at = self._clock() + self.settings.backoff_max_s
            log.error("profiles.fetch.forbidden error=%s", exc)  # noqa: TRY400 - no traceback
            return
        except SyncError as exc:  # a 400 or 413: this customer's id, not the store
            self._outcome("forbidden", started)
            log.warning("profiles.fetch.refused error=%s", exc)
            return
        self._backoff.reset()
        if customer_id in self._discard or not self.may_fetch(customer_id):
            self._outcome("discarded", started)
            return
        if body is None:
            self._outcome("not_found", started)
            self._store(customer_id, None, _NEGATIVE_BYTES)
            await self._revoke_central(customer_id)  # no profile, or no consent to share it
            return
        try:  # up to max_body_bytes of JSON: parsed off the loop, which serves triggers
            profile = await asyncio.to_thread(parse_profile, body, customer_id)
        except ProfileRejectedError as exc:
            self._outcome("rejected", started)
            self.rejected[exc.reason] += 1
            log.warning("profiles.rejected reason=%s", exc.reason)
            self._store(customer_id, None, _NEGATIVE_BYTES)
            return
        if customer_id in self._discard or not self.may_fetch(customer_id):
            self._outcome("discarded", started)  # forgotten while it was being parsed
            return
        self._outcome("found", started)
        self._store(customer_id, profile, len(body))
        if profile.allows_personalization:
            await self._grant_central(customer_id)
        else:
            await self._revoke_central(customer_id)

    # ---- the store's consent, for the upload rule -------------------------------------

    async def _grant_central(self, customer_id: str) -> None:
        """The store resolved consent to share (given at another store or channel): without a
        local record, this customer's events committed from now on leave the store with the
        clear id (``governance.CentralGrant``), kept in the buffer across restarts."""
        if self._buffer is None or self.consent.has_record(customer_id):
            return
        if self.consent.central_grant(customer_id) is not None:
            return  # kept already, with its first ``after_seq``
        ts = datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
        grant = await self._buffer.grant_central(customer_id, ts)
        if grant is None:
            return  # a local record was committed meanwhile: it wins
        if customer_id in self._discard or not self.may_fetch(customer_id):
            await self._buffer.revoke_central(customer_id)  # erased or withdrawn meanwhile
            return
        if self.consent.grant_central(grant):
            self.central_consent["granted"] += 1
            log.info("profiles.central_consent.granted after_seq=%d", grant.after_seq)

    async def _revoke_central(self, customer_id: str) -> None:
        """The store no longer shares this customer: in force at once (the ledger), then in
        the buffer."""
        if not self.consent.revoke_central(customer_id):
            return
        self.central_consent["revoked"] += 1
        log.info("profiles.central_consent.revoked")
        if self._buffer is not None:
            await self._buffer.revoke_central(customer_id)

    def _outcome(self, outcome: str, started: float) -> None:
        self.fetches[outcome] += 1
        self.latency.observe(time.perf_counter() - started)
