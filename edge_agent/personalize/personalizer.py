"""The personalizer component: trigger event in, suggestion out, in about a millisecond.

Path of one trigger (``product.pickup`` ... with a customer id):

1. the pipeline tap (on the loop, before the commit's fsync) updates the session and builds
   a request (history snapshot, masks, context): microseconds;
2. the request goes to a one-thread executor dedicated to inference (nothing else queues
   there: no telemetry, no SQLite), which ranks (``Ranker``) and publishes the suggestion
   straight from that thread (paho's publish is thread-safe), so the answer never waits for
   the busy event loop;
3. back on the loop, bookkeeping: status figures, feedback tracking, the ``suggestion.shown``
   event (committed in batches by the recorder task) and the COMMAND to a serial display.

Suggestions are published with QoS 0 by default (``[model] suggestion_qos``): one is stale
within a second, a redelivery after a reconnect would show an old one, and QoS 1 would add a
PUBACK round trip and a place in paho's in-flight window behind other traffic. What was shown
is recorded durably as the ``suggestion.shown`` event, which is what training reads.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import random
import time
import uuid
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final, cast

from edge_agent.buffer import Buffer
from edge_agent.component import DisplaySink, ModelAnswer, Ports, SuggestionPublisher
from edge_agent.config import Config, public_keys
from edge_agent.errors import ConfigError, StorageError
from edge_agent.events import Event, format_ts
from edge_agent.governance import ConsentLedger
from edge_agent.personalize.fallback import StorePopularity, bestsellers
from edge_agent.personalize.feedback import FeedbackBook
from edge_agent.personalize.model_slot import ModelSlot
from edge_agent.personalize.model_store import ModelStore
from edge_agent.personalize.policy import MaskFiles
from edge_agent.personalize.profile_merge import CentralProfile, merge_history
from edge_agent.personalize.ranker import Masked, Ranker, Request
from edge_agent.personalize.recorder import Recorder, Served
from edge_agent.personalize.session import (
    REBUILD_MAX_ROWS,
    STATE_TYPES,
    TRIGGER_TYPES,
    SessionStore,
    event_seconds,
    parse_recent,
)
from edge_agent.personalize.stats import SuggestionStats
from models import DEFAULT_MODEL_DIR, SuggestionContext
from models.serving import Runtime

log = logging.getLogger(__name__)

SESSION_HISTORY: Final = 32  # entries kept per customer; the model reads its newest H
IMPLICIT_TYPES: Final = frozenset({"product.pickup", "product.scan", "basket.add"})
_NAMESPACE: Final = uuid.UUID("0b5e7d0c-3f7a-4f2e-8a51-6a1f3c9e2d44")


class Personalizer:
    name = "personalizer"

    def __init__(self, config: Config, *, rng: random.Random | None = None) -> None:
        settings = config.model
        self.config = config
        self.settings = settings
        self._topic_template = _check_topic(settings.suggestion_topic, config)
        configured = Path(settings.path) if settings.path else DEFAULT_MODEL_DIR
        self.slot = ModelSlot(
            ModelStore(config.data_dir, configured),
            public_keys(settings),
            runtime=cast("Runtime", settings.runtime),  # checked by the config's validation
        )
        self.sessions = SessionStore(
            settings.session_cap, SESSION_HISTORY, settings.session_max_age_s
        )
        # The agent's ledger once run() is given its ports; until then the strictest reading.
        self.consent = ConsentLedger(config.governance.require_consent)
        self.masks = MaskFiles(
            _path_or(settings.out_of_stock_file, config.data_dir / "out_of_stock.txt"),
            _path_or(settings.blocked_skus_file, config.data_dir / "blocked_skus.txt"),
        )
        self.popularity = StorePopularity(settings.popularity_window_s)
        self.ranker = Ranker(
            self.slot,
            self.popularity,
            bestsellers(),
            k=settings.top_k,
            epsilon=settings.epsilon,
            rng=rng,
        )
        self.feedback = FeedbackBook(settings.implicit_accept_window_s)
        self.stats = SuggestionStats()
        self.recorder = Recorder(self.feedback, self.stats)
        self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="inference")
        self._topics: dict[str, str] = {}
        self._inflight = 0
        self._ready = False
        self._early: list[Event] = []  # triggers that came while the state was loading
        self._loop: asyncio.AbstractEventLoop | None = None
        self._publisher: SuggestionPublisher | None = None
        self._displays: DisplaySink | None = None
        self._ports: Ports | None = None  # for ``profiles``, filled by its component

    # ---- Component ------------------------------------------------------------------

    async def run(self, ports: Ports) -> None:
        self._loop = asyncio.get_running_loop()
        self._ports = ports
        self.consent = ports.consent
        self._publisher = ports.suggestions
        self._displays = ports.displays
        self.recorder.displays = ports.displays
        # First, before any await: miss no input, no model, no erasure.
        ports.pipeline.taps.append(self._on_events)
        ports.model_listeners.append(self.offer_model)
        ports.erasure_listeners.append(self.forget_customer)
        try:
            await self._start(ports.buffer)
            async with asyncio.TaskGroup() as group:
                # Through ``record``: our own suggestion.shown never comes back to our tap.
                record = ports.pipeline.record
                group.create_task(self.recorder.run(record), name="personalize:record")
                group.create_task(self._maintain(ports.buffer), name="personalize:maintain")
        finally:
            ports.pipeline.taps.remove(self._on_events)
            ports.model_listeners.remove(self.offer_model)
            ports.erasure_listeners.remove(self.forget_customer)
            self._executor.shutdown(wait=False, cancel_futures=True)
            self.slot.close()

    def status(self) -> dict[str, dict[str, Any]]:
        totals = self.feedback.totals()
        model = self.slot.status()
        model["source"] = self._active_source()
        model["latency_ms"] = self.stats.latency()
        model["errors"] = self.ranker.model_errors
        return {
            "model": model,
            "suggestions": {
                "shown": totals.shown,
                "accepted": totals.accepted,
                "implicit_accepted": totals.implicit,
                "dismissed": totals.dismissed,
                "acceptance_rate": totals.as_dict()["acceptance_rate"],
                "by_model_version": {k: v.as_dict() for k, v in self.feedback.by_version.items()},
                "by_source": dict(self.stats.by_source),
                "dropped": dict(self.stats.dropped),
                "pending": self._inflight,
                "latency_ms": self.stats.latency(),
                "latency_histogram": self.stats.histogram.as_status(),
                "sessions": len(self.sessions),
                "sessions_evicted": self.sessions.evicted,
                "feedback_evicted": self.feedback.evicted,
                "recent": [
                    {**entry, "accepted": self.feedback.was_accepted(entry["suggestion_id"])}
                    for entry in self.stats.recent
                ],
            },
        }

    @property
    def ready(self) -> bool:
        """True once the model, consent, sessions and popularity are loaded."""
        return self._ready

    def forget_customer(self, customer_id: str) -> None:
        """Drop what is held in memory about a customer (an erasure request); on the loop."""
        self.sessions.forget(customer_id)
        self.feedback.forget_customer(customer_id)
        self.stats.forget(customer_id)

    async def offer_model(self, path: Path) -> ModelAnswer:
        """Verify a downloaded model directory and switch to it (the uploader calls this)."""
        return await self.slot.offer_model(path)

    # ---- start and background work --------------------------------------------------

    async def _start(self, buffer: Buffer) -> None:
        await self.slot.start()
        since = time.time() - self.settings.session_max_age_s
        recent = await buffer.recent_customer_events(STATE_TYPES, since, REBUILD_MAX_ROWS)
        rows = parse_recent(recent)
        used = self.sessions.load(
            row for row in rows if self.consent.allows_personalization(row[0])
        )
        await self.popularity.refresh(buffer)
        await asyncio.to_thread(self.masks.refresh)
        self._ready = True
        log.info(
            "personalizer.ready model=%s sessions=%d rows=%d popular=%d",
            self.slot.version,
            len(self.sessions),
            used,
            len(self.popularity.ranked),
        )
        early, self._early = self._early, []
        if early:
            self._on_events(early)

    async def _maintain(self, buffer: Buffer) -> None:
        """Popularity, mask files, model drops and the rollback pointer, each on its period."""
        settings = self.settings
        next_popularity = time.monotonic() + settings.popularity_refresh_s
        while True:
            await asyncio.sleep(settings.watch_interval_s)
            try:
                await asyncio.to_thread(self.masks.refresh)
                await self.slot.watch_incoming()
                await self.slot.follow_state()
                if time.monotonic() >= next_popularity:
                    next_popularity = time.monotonic() + settings.popularity_refresh_s
                    await self.popularity.refresh(buffer)
            except (OSError, StorageError) as exc:
                # A file that vanished mid-scan, a busy disk: suggestions go on, retry later.
                log.warning("personalizer.maintenance.failed error=%r", exc)

    def _active_source(self) -> str:
        if self.slot.current is not None:
            return "model"
        return self.ranker.fallback(Masked()).source

    # ---- the tap (event loop) -------------------------------------------------------

    def _on_events(self, events: Sequence[Event]) -> None:
        if not self._ready:
            self._early.extend(e for e in events if e.customer_id is not None)
            del self._early[: max(0, len(self._early) - self.settings.max_pending)]
            return
        for event in events:
            customer_id = event.customer_id
            if customer_id is None:
                continue
            kind = event.type
            if kind in STATE_TYPES:
                self._on_state_event(event, customer_id)
            elif kind == "suggestion.accepted":
                implicit = bool(event.data.get("implicit", False))
                self.feedback.accepted(str(event.data.get("suggestion_id")), implicit)
            elif kind == "suggestion.dismissed":
                self.feedback.dismissed(str(event.data.get("suggestion_id")))
            elif kind == "consent.update" and not self.consent.allows_personalization(
                customer_id
            ):  # governed before the tap: the ledger already says so
                self.forget_customer(customer_id)  # nothing about them feeds personal state

    def _central(self, customer_id: str) -> tuple[bool, CentralProfile | None]:
        """Personalization allowed? and the central profile as far as it has arrived. A
        customer without a local consent record who consented elsewhere (the profile carries
        the store's resolved consent) is personalized here too."""
        local = self.consent.allows_personalization(customer_id)
        profiles = self._ports.profiles if self._ports is not None else None
        if profiles is None or (not local and self.consent.has_record(customer_id)):
            return local, None
        profile = profiles.lookup(customer_id)
        if profile is None:
            return local, None
        return local or profile.allows_personalization, profile

    def _on_state_event(self, event: Event, customer_id: str) -> None:
        personal, profile = self._central(customer_id)
        if personal:
            self.sessions.observe_event(event)
            sku = event.data.get("sku")
            if event.type in IMPLICIT_TYPES and isinstance(sku, str):
                shown = self.feedback.implicit_match(customer_id, sku)
                if shown is not None:
                    self.feedback.accepted(shown.suggestion_id, True)
                    self.recorder.record(self.recorder.implicit_accept(event, shown, sku))
        if event.type in TRIGGER_TYPES:
            self._submit(event, customer_id, personal, profile)

    def _submit(
        self,
        event: Event,
        customer_id: str,
        personal: bool,
        profile: CentralProfile | None = None,
    ) -> None:
        device_id = event.device_id
        if device_id is None:
            self.stats.dropped["no_device"] += 1
            return
        if self._inflight >= self.settings.max_pending:
            self.stats.dropped["overload"] += 1  # shed: a late suggestion is a useless one
            return
        now = event_seconds(event.ts)
        sku = event.data.get("sku")
        picked = frozenset((sku,)) if isinstance(sku, str) else frozenset()
        session = self.sessions.get(customer_id) if personal else None
        basket = session.basket.copy() if session is not None else set()
        history = self.sessions.history(customer_id, now) if personal else []
        origin = (len(history), 0)
        if personal and profile is not None and profile.interactions:
            merged = merge_history(
                history,
                profile.interactions,
                own_store_id=self.config.agent.store_id,
                limit=SESSION_HISTORY,
                since=now - self.config.profiles.history_max_age_s,
            )
            history, origin = merged.entries, (merged.local, merged.central)
        request = Request(
            history=history,
            context=SuggestionContext(_utc_hour(event.ts), event.store_id, device_id),
            masked=Masked(self.masks.skus, basket, picked),
            now=now,
            personal=personal,
            origin=origin,
        )
        topic = self._topics.get(device_id)
        if topic is None:
            topic = self._topics[device_id] = self._topic_template.replace("{device_id}", device_id)
        self._inflight += 1
        started = time.perf_counter_ns()
        self._executor.submit(self._serve, event, request, topic, started)

    def busy(self) -> bool:
        """Suggestions being ranked or published (component.Serving)."""
        return self._inflight > 0

    # ---- the inference thread ---------------------------------------------------------

    def _serve(self, trigger: Event, request: Request, topic: str, started_ns: int) -> None:
        try:
            self._rank_and_publish(trigger, request, topic, started_ns)
        except Exception:  # a bug here must not stall the pending count: log, count, go on
            log.exception("suggestion.failed trigger=%s", trigger.event_id)
            self._to_loop(self._serve_failed)

    def _rank_and_publish(
        self, trigger: Event, request: Request, topic: str, started_ns: int
    ) -> None:
        decision = self.ranker.decide(request)
        suggestion_id = str(uuid.uuid5(_NAMESPACE, f"{trigger.event_id}"))
        ts = format_ts(datetime.now(UTC))
        payload = Recorder.payload(suggestion_id, trigger, decision, ts)
        if self._publisher is not None:
            self._publisher.publish(topic, payload, qos=self.settings.suggestion_qos)
        latency_ns = time.perf_counter_ns() - started_ns
        served = Served(suggestion_id, trigger, request.personal, decision, ts, latency_ns)
        self._to_loop(self._after_serve, served)

    def _to_loop(self, callback: Callable[..., None], *args: Any) -> None:
        loop = self._loop
        if loop is None or loop.is_closed():
            return  # shutting down: the suggestion went out, its bookkeeping cannot
        try:
            loop.call_soon_threadsafe(callback, *args)
        except RuntimeError:
            log.debug("suggestion.bookkeeping.skipped loop closed")

    # ---- back on the loop ---------------------------------------------------------------

    def _serve_failed(self) -> None:
        self._inflight -= 1
        self.stats.dropped["error"] += 1

    def _after_serve(self, served: Served) -> None:
        self._inflight -= 1
        self.recorder.shown(served)
        device_id = served.trigger.device_id
        if (
            device_id is not None
            and self._displays is not None
            and self._displays.serves(device_id)
        ):
            self.recorder.command(device_id, served)


def _utc_hour(ts: str) -> int:
    # format_ts writes "YYYY-MM-DDTHH:MM:SS.mmmZ": the hour is at a fixed place.
    try:
        return int(ts[11:13]) % 24
    except ValueError:
        return datetime.now(UTC).hour


def _path_or(value: str, default: Path) -> Path:
    return Path(value) if value else default


def _check_topic(template: str, config: Config) -> str:
    try:
        filled = template.format(
            prefix=config.mqtt.topic_prefix,
            store_id=config.agent.store_id,
            device_id="{device_id}",
        )
    except (KeyError, IndexError, ValueError) as exc:
        raise ConfigError(
            "model.suggestion_topic", f"only {{prefix}}, {{store_id}}, {{device_id}}: {exc!r}"
        ) from exc
    return filled
