"""The agent's NATS downlink: erasures and model announcements for its own store.

``[sync] transport = "nats"`` with ``nats_downlink = true``: instead of polling ``GET
/v1/erasures`` and ``GET /v1/models/latest`` every cycle, the agent reads its store's subjects
``edge.downlink.<store_id>.>`` in the stream ``EDGE_DOWNLINK`` (written by ``customer-store
announce``; ``cloud_sync.downlink_notices``) through a pull consumer named for its store, so
NATS permissions can give each store's user that one consumer and nothing else.

Position: the last stream sequence handled is kept in the buffer's ``meta``
(``sync.nats_downlink_seq``); each connection creates the consumer from the one after it, so
a restart resumes where the agent stopped, and an agent that was down reads what was
published meanwhile. Each message is authenticated with the agent's own key before anything
is done; one that is not (garbled, forged, another store's) is counted by reason, logged and
skipped, never fatal.

Erasures go through the HTTP downlink's own path (``Downlink.apply_erasure_page``: blinded
match, pseudonym report to the store, buffer erase and the erasure cursor in one transaction,
listeners), so both transports share one cursor: a notice at or below it was applied already
and is skipped; a notice whose ``previous`` lies beyond it means notices were missed (the
agent was added after them, or the stream's per-subject limit dropped them), and the gap is
read from ``GET /v1/erasures`` first. Models: the announcement is the answer of ``GET
/v1/models/latest``; one with a new ETag goes through ``Downlink.offer_model`` (signature,
download over HTTP from ``downlink_url``, sha256, listeners). A failed download is retried
every ``sync.interval_s`` until it succeeds or a newer announcement replaces it.

NATS errors end here: the loop logs, backs off with jitter and reconnects; the uploader and
the rest of the agent go on. Withdrawal announcements and heartbeats stay on HTTP.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter
from collections.abc import Sequence
from typing import Final

import nats.errors
import nats.js.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from cloud_sync import downlink_notices as notices
from cloud_sync.sync_client import ErasureNotice, PublishedModel
from cloud_sync.sync_downlink import MODEL_ETAG_KEY, Downlink
from cloud_sync.sync_nats import connect_options, inbox_prefix
from edge_agent.backoff import Backoff
from edge_agent.component import ErasureListener, ModelListener
from edge_agent.config import SyncSection
from edge_agent.errors import SyncError

log = logging.getLogger(__name__)

SEQ_KEY: Final = "sync.nats_downlink_seq"
_FETCH_BATCH: Final = 100
_FOLLOW_UP_S: Final = 0.05  # the wait for more after a first message: its added latency
_INACTIVE_S: Final = 300.0  # a consumer left by a dead agent goes away by itself
_GAP_CATCH_UP_ROUNDS: Final = 50  # each reads up to 20 pages of the HTTP feed


class NatsDownlink:
    """Reads the store's downlink subjects until cancelled; ``status`` shows its counters."""

    def __init__(self, downlink: Downlink, settings: SyncSection, store_id: str) -> None:
        self.downlink = downlink
        self.settings = settings
        self.store_id = store_id
        self.key = downlink.client.blinding_key
        self._nc: Client | None = None
        self.notices = 0  # authenticated messages handled
        self.refused: Counter[str] = Counter()
        self.gaps = 0
        self.last_error: str | None = None
        self._pending_model: PublishedModel | None = None
        # An announcement read before a restart but not yet installed is behind the kept
        # sequence: once per start, the model is asked for over HTTP as well.
        self._http_model_check = True
        self._model_retry_at = 0.0
        first = min(settings.backoff_initial_s, settings.backoff_max_s)
        self._backoff = Backoff(first, settings.backoff_max_s)

    @property
    def connected(self) -> bool:
        return self._nc is not None and self._nc.is_connected

    def status(self) -> dict[str, object]:
        return {
            "connected": self.connected,
            "notices": self.notices,
            "refused": sum(self.refused.values()),
            "refused_by_reason": dict(self.refused),
            "gaps": self.gaps,
            "last_error": self.last_error,
        }

    async def run(
        self, erasure_listeners: Sequence[ErasureListener], model_listeners: Sequence[ModelListener]
    ) -> None:
        while True:
            try:
                await self._session(erasure_listeners, model_listeners)
            except (nats.errors.Error, TimeoutError, OSError, SyncError) as exc:
                self.last_error = f"{type(exc).__name__}: {exc}"[:300]
                wait = self._backoff.next_delay()
                log.warning(
                    "sync.nats_downlink.unavailable retry_s=%.1f detail=%s", wait, self.last_error
                )
                await asyncio.sleep(wait)

    async def _session(
        self, erasure_listeners: Sequence[ErasureListener], model_listeners: Sequence[ModelListener]
    ) -> None:
        nc = self._nc = Client()
        options = connect_options(self.settings)
        options["name"] = "edge-agent-downlink"
        options["inbox_prefix"] = inbox_prefix(self.store_id)
        try:
            await asyncio.wait_for(nc.connect(**options), self.settings.timeout_s)
            domain = self.settings.nats_domain or None
            js = nc.jetstream(timeout=self.settings.timeout_s, domain=domain)
            subscription = await self._subscribe(js)
            self._backoff.reset()
            log.info("sync.nats_downlink.connected server=%s", nc.connected_url)
            reconnects = nc.stats["reconnects"]
            while True:
                messages = await self._fetch(subscription)
                if nc.stats["reconnects"] != reconnects:
                    # The server may have lost the consumer (restarted, another node): a new
                    # one from the kept sequence, on a new connection.
                    log.info("sync.nats_downlink.resubscribe reason=reconnected")
                    return
                await self._handle(messages, erasure_listeners)
                await self._retry_model(model_listeners)
        finally:
            self._nc = None
            await nc.close()

    async def _fetch(self, subscription: JetStreamContext.PullSubscription) -> list[Msg]:
        """The next messages, as soon as there is one. nats-py's fetch of a batch waits out
        its timeout once a first message came, so: one message (waiting up to interval_s),
        then whatever else is already there (a burst, a catch-up) with a short wait."""
        try:
            messages = await subscription.fetch(1, timeout=self.settings.interval_s)
        except (nats.errors.TimeoutError, TimeoutError):
            return []  # nothing new, or the client is reconnecting meanwhile
        with contextlib.suppress(nats.errors.TimeoutError, TimeoutError):
            messages += await subscription.fetch(_FETCH_BATCH - 1, timeout=_FOLLOW_UP_S)
        return messages

    async def _subscribe(self, js: JetStreamContext) -> JetStreamContext.PullSubscription:
        """The store's consumer, created anew from the sequence after the one kept in meta."""
        kept = await self.downlink.buffer.read_meta(SEQ_KEY) or "0"
        start = (int(kept) if kept.isdigit() else 0) + 1
        name = notices.consumer_name(self.store_id)
        # One left from before starts elsewhere, and a consumer's start cannot be changed.
        with contextlib.suppress(nats.js.errors.NotFoundError):
            await js.delete_consumer(notices.STREAM, name)
        config = ConsumerConfig(
            name=name,
            filter_subject=notices.store_filter(self.store_id),
            deliver_policy=DeliverPolicy.BY_START_SEQUENCE,
            opt_start_seq=start,
            ack_policy=AckPolicy.EXPLICIT,
            inactive_threshold=_INACTIVE_S,
        )
        await js.add_consumer(notices.STREAM, config)
        return await js.pull_subscribe_bind(consumer=name, stream=notices.STREAM)

    async def _handle(self, messages: Sequence[Msg], listeners: Sequence[ErasureListener]) -> None:
        """Apply the batch in stream order; of its model announcements only the newest."""
        if not messages:
            return
        erased = 0
        for message in messages:
            notice = self._read(message)
            if isinstance(notice, notices.ErasureMessage):
                erased += await self._apply_erasure(notice, listeners)
            elif isinstance(notice, notices.ModelMessage):
                if notice.manifest is None:  # too large to announce: ask over HTTP
                    self._pending_model, self._http_model_check = None, True
                else:
                    self._pending_model = PublishedModel(notice.manifest, notice.etag)
                self._model_retry_at = 0.0
            await self.downlink.buffer.write_meta(SEQ_KEY, str(message.metadata.sequence.stream))
            await message.ack()
        if erased:
            await self.downlink.buffer.recount()  # erased rows left the counters behind

    def _read(self, message: Msg) -> notices.ErasureMessage | notices.ModelMessage | None:
        try:
            notice = notices.read_notice(message.subject, message.data, self.key)
        except notices.NoticeRefusedError as exc:
            self.refused[exc.reason] += 1
            log.warning(
                "sync.nats_downlink.refused subject=%s seq=%d reason=%s detail=%s",
                message.subject,
                message.metadata.sequence.stream,
                exc.reason,
                exc,
            )
            return None
        self.notices += 1
        return notice

    async def _apply_erasure(
        self, notice: notices.ErasureMessage, listeners: Sequence[ErasureListener]
    ) -> int:
        cursor = await self.downlink.erasure_cursor()
        if notice.cursor <= cursor:
            return 0  # applied already (through HTTP, or before a restart)
        if notice.previous > cursor:
            self.gaps += 1
            log.warning(
                "sync.nats_downlink.gap cursor=%d previous=%d: reading the HTTP feed",
                cursor,
                notice.previous,
            )
            for _ in range(_GAP_CATCH_UP_ROUNDS):
                if not await self.downlink.apply_erasures(listeners):
                    break
            if await self.downlink.erasure_cursor() >= notice.cursor:
                return 0  # the feed had this one too
        page = [ErasureNotice(str(notice.cursor), blinded=item) for item in notice.blinded]
        return await self.downlink.apply_erasure_page(page, str(notice.cursor), listeners)

    async def _retry_model(self, listeners: Sequence[ModelListener]) -> None:
        model = self._pending_model
        if time.monotonic() < self._model_retry_at:
            return
        if model is not None and model.etag == await self.downlink.buffer.read_meta(MODEL_ETAG_KEY):
            self._pending_model = model = None  # handled already (refused ones too)
        if model is None and not self._http_model_check:
            return
        try:
            if model is not None:
                await self.downlink.offer_model(model, listeners)
            else:
                await self.downlink.fetch_model(listeners)
        except SyncError as exc:  # the download failed; the announcement stays pending
            version = model.version[:128] if model is not None else "latest"
            self.downlink.last_model_error = f"{version!r}: {exc}"[:300]
            self._model_retry_at = time.monotonic() + self.settings.interval_s
            log.warning(
                "sync.nats_downlink.model_failed version=%r retry_s=%.1f detail=%s",
                version,
                self.settings.interval_s,
                exc,
            )
            return
        if model is None:
            self._http_model_check = False
        elif self._pending_model is model:
            self._pending_model = None
