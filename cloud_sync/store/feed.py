"""The partners' live feed: consented events as Server-Sent Events (``GET /v1/feed``).

Each event is one SSE message, ``id:`` its store-wide sequence number (the cursor), ``event:
envelope``, ``data:`` the envelope as one line of JSON. A client resumes with ``?after=N`` or
the ``Last-Event-ID`` header (which wins: it is what an SSE client sends when it reconnects).

Only events of identified customers whose profile's consent, resolved by the trust model when
the event is sent, has ``partner_sharing``; pseudonymised customers never. The feed reads at
most ``page`` events at a time up to the database's high-water mark (no ingest in progress
can still add a row below it, so resuming from a cursor skips nothing), writes them with
backpressure, and otherwise sleeps ``poll_s``; a comment line every ``heartbeat_s`` keeps
proxies from closing an idle connection. Memory per connection is one page.

The SSE framing is a few lines of text, written here rather than with a server library.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

from aiohttp import web

from cloud_sync.store import profiles
from cloud_sync.store.backend import Backend
from cloud_sync.store.errors import BackendError
from cloud_sync.store.records import StoredEvent

log = logging.getLogger(__name__)
MAX_CURSOR: Final = 2**62


@dataclass(frozen=True, slots=True)
class FeedSettings:
    poll_s: float = 0.5
    heartbeat_s: float = 15.0
    page: int = 200


class HighWater:
    """The feed's high-water mark, asked of the database at most once per ``every_s`` for all
    the connections of this instance: on PostgreSQL each ask briefly waits out the ingests in
    flight (and holds new ones back meanwhile), so it must not multiply with the partners."""

    def __init__(self, backend: Backend, every_s: float) -> None:
        self._backend = backend
        self._every_s = every_s
        self._value = 0
        self._asked_at = -math.inf
        self._lock = asyncio.Lock()

    async def get(self) -> int:
        async with self._lock:
            if time.monotonic() - self._asked_at >= self._every_s:
                self._value = await self._backend.feed_high_water()
                self._asked_at = time.monotonic()
            return self._value


class ConsentCache:
    """Resolved partner consent of each customer met in one page: resolved at send time."""

    def __init__(self, backend: Backend) -> None:
        self._backend = backend
        self._shares: dict[str, bool] = {}

    async def shares(self, customer_id: str) -> bool:
        if profiles.is_pseudonym(customer_id):
            return False
        known = self._shares.get(customer_id)
        if known is None:
            ids = [
                i
                for i in await self._backend.identities(customer_id)
                if not profiles.is_pseudonym(i)
            ]
            flags = profiles.resolved_flags(await self._backend.consent_facts(ids))
            known = flags is not None and flags["partner_sharing"]
            self._shares[customer_id] = known
        return known


async def consented(backend: Backend, events: Sequence[StoredEvent]) -> list[StoredEvent]:
    cache = ConsentCache(backend)
    kept: list[StoredEvent] = []
    for event in events:
        customer_id = event.envelope.get("customer_id")
        if isinstance(customer_id, str) and await cache.shares(customer_id):
            kept.append(event)
    return kept


def message(event: StoredEvent) -> bytes:
    data = json.dumps(event.envelope, separators=(",", ":"), ensure_ascii=False)
    return f"id: {event.seq}\nevent: envelope\ndata: {data}\n\n".encode()


def start_cursor(after: str | None, last_event_id: str | None) -> int | None:
    """The cursor to resume from; None when a given one is not a cursor."""
    text = last_event_id if last_event_id else after
    if text is None or text == "":
        return 0
    if not text.isdigit() or len(text) > 19 or int(text) > MAX_CURSOR:
        return None
    return int(text)


async def stream(
    request: web.Request,
    *,
    backend: Backend,
    high_water: HighWater,
    cursor: int,
    settings: FeedSettings,
    who: str,
    closing: asyncio.Event,
) -> web.StreamResponse:
    """Stream until the client goes or the server shuts down (``closing``: the response
    ends at once instead of holding the shutdown for its whole timeout)."""
    response = web.StreamResponse(
        headers={
            "Content-Type": "text/event-stream",
            "Cache-Control": "no-cache",
            "X-Accel-Buffering": "no",  # a buffering proxy would hold the feed back
        }
    )
    await response.prepare(request)
    await response.write(b": feed open\n\n")
    log.info("store.feed.open who=%s after=%d", who, cursor)
    sent = 0
    last_write = time.monotonic()
    try:
        while not closing.is_set():
            try:
                upto = await high_water.get()
                events = (
                    await backend.events_after(cursor, upto, settings.page) if upto > cursor else []
                )
                kept = await consented(backend, events)
            except BackendError as exc:
                # Transient: the connection stays; the client keeps its cursor either way.
                log.warning("store.feed.backend_unavailable who=%s error=%s", who, exc)
                events, kept = [], []
            for event in kept:
                await response.write(message(event))
            sent += len(kept)
            if kept:
                last_write = time.monotonic()
            if events:
                cursor = events[-1].seq
                if len(events) == settings.page:
                    continue  # more to read: no sleep
            if time.monotonic() - last_write >= settings.heartbeat_s:
                await response.write(b": heartbeat\n\n")
                last_write = time.monotonic()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(closing.wait(), settings.poll_s)
    except (ConnectionResetError, asyncio.CancelledError):
        log.info("store.feed.closed who=%s sent=%d cursor=%d", who, sent, cursor)
        raise
    log.info("store.feed.closed who=%s sent=%d cursor=%d reason=shutdown", who, sent, cursor)
    return response
