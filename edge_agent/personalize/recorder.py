"""What the personalizer writes down and sends after a suggestion went out.

On the event loop: the ``suggestion.shown`` event (and implicit ``suggestion.accepted``
events) are queued and committed in batches through ``pipeline.record``, off the suggestion's
critical path; the COMMAND to a serial display is sent by its own task, because a device
answers in its own time. Both queues are bounded: when the buffer holds back (backpressure)
records beyond the bound are dropped and counted rather than growing memory without end.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Final

from edge_agent.component import DisplaySink
from edge_agent.events import Event
from edge_agent.personalize.feedback import FeedbackBook, Shown
from edge_agent.personalize.ranker import Decision
from edge_agent.personalize.stats import SuggestionStats
from firmware_bridge.messages import ShowSuggestion
from firmware_bridge.serial_source import UnknownDeviceError

log = logging.getLogger(__name__)

MAX_QUEUED_RECORDS: Final = 10_000
MAX_BATCH: Final = 500
MAX_QUEUED_COMMANDS: Final = 64
COMMAND_TTL_S: Final = 5.0  # a suggestion shown later than this is about someone else
FLUSH_ON_STOP_S: Final = 2.0
# Recorded events get ids from their suggestion id, which is itself derived from the trigger's
# (keyed or device-given) id and names nobody: a plain namespace UUID is enough.
_RECORD_NAMESPACE: Final = uuid.UUID("3d1f6a52-7c0b-4f5e-9a8d-2b6e4c1f0a97")

Record = Callable[[Sequence[Event]], Awaitable[None]]  # ``Pipeline.record``


@dataclass(frozen=True, slots=True)
class Served:
    suggestion_id: str
    trigger: Event
    personal: bool
    decision: Decision
    ts: str
    latency_ns: int


class Recorder:
    SOURCE: Final = "personalizer"  # the envelope's source of the events written here

    def __init__(self, feedback: FeedbackBook, stats: SuggestionStats) -> None:
        self.feedback = feedback
        self.stats = stats
        self._records: asyncio.Queue[Event] = asyncio.Queue(MAX_QUEUED_RECORDS)
        self.displays: DisplaySink | None = None  # set from the ports when the component runs
        self._commands: asyncio.Queue[tuple[str, ShowSuggestion]] = asyncio.Queue(
            MAX_QUEUED_COMMANDS
        )

    @staticmethod
    def payload(suggestion_id: str, trigger: Event, decision: Decision, ts: str) -> bytes:
        """The DESIGN.md suggestion message."""
        document = {
            "suggestion_id": suggestion_id,
            "customer_id": trigger.customer_id,
            "trigger_event_id": trigger.event_id,
            "items": _items(decision),
            "source": decision.source,
            "model_version": decision.model_version,
            "ts": ts,
            "history": {"local": decision.history[0], "central": decision.history[1]},
        }
        return json.dumps(document, separators=(",", ":")).encode("utf-8")

    def shown(self, served: Served) -> None:
        decision = served.decision
        self.stats.record_latency(served.latency_ns)
        self.stats.by_source[decision.source] += 1
        skus = tuple(sku for sku, _ in decision.slate.items)
        self.stats.recent.appendleft(
            {
                "suggestion_id": served.suggestion_id,
                "customer": self.stats.display_id(served.trigger.customer_id),
                "device_id": served.trigger.device_id,
                "skus": list(skus),
                "source": decision.source,
                "ts": served.ts,
                "history": {"local": decision.history[0], "central": decision.history[1]},
            }
        )
        customer_id = served.trigger.customer_id or ""
        shown = Shown(
            served.suggestion_id,
            # Without consent nothing personal is kept: no implicit-acceptance tracking.
            customer_id if served.personal else "",
            skus if served.personal else (),
            decision.model_version or decision.source,
            asyncio.get_running_loop().time(),
        )
        self.feedback.record_shown(shown)
        trigger = served.trigger
        data: dict[str, Any] = {
            "suggestion_id": served.suggestion_id,
            "items": _items(decision),
            "source": decision.source,
            "model_version": decision.model_version,
            "trigger_event_id": trigger.event_id,
            "propensities": [round(p, 8) for p in decision.slate.propensities],
            "explored_slot": decision.slate.explored_slot,
        }
        if data["model_version"] is None:
            del data["model_version"]  # the registry types it as a string when present
        if decision.error is not None:
            data["model_error"] = decision.error[:200]
        self.record(self._event("suggestion.shown", "shown", trigger, served.ts, data))

    def implicit_accept(self, pickup: Event, shown: Shown, sku: str) -> Event:
        data = {"suggestion_id": shown.suggestion_id, "sku": sku, "implicit": True}
        return self._event("suggestion.accepted", "implicit", pickup, pickup.ts, data)

    def record(self, event: Event) -> None:
        try:
            self._records.put_nowait(event)
        except asyncio.QueueFull:
            self.stats.dropped["record_queue_full"] += 1

    def command(self, device_id: str, served: Served) -> None:
        items = served.decision.slate.items
        top = max((score for _, score in items), default=0.0)
        scaled = tuple((sku, score / top if top > 0 else 0.0) for sku, score in items)
        message = ShowSuggestion(served.suggestion_id, served.trigger.customer_id or "", scaled)
        try:
            self._commands.put_nowait((device_id, message))
        except asyncio.QueueFull:
            self.stats.dropped["serial_queue_full"] += 1

    async def run(self, emit: Record) -> None:
        async with asyncio.TaskGroup() as group:
            group.create_task(self._record_loop(emit), name="personalize:record-events")
            group.create_task(self._command_loop(), name="personalize:serial-commands")

    async def _record_loop(self, emit: Record) -> None:
        try:
            while True:
                batch = [await self._records.get()]
                while len(batch) < MAX_BATCH and not self._records.empty():
                    batch.append(self._records.get_nowait())
                await emit(batch)
        except asyncio.CancelledError:
            # Stopping (after the sources): commit what is still queued, within a bound.
            rest: list[Event] = []
            while not self._records.empty():
                rest.append(self._records.get_nowait())
            if rest:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(asyncio.shield(emit(rest)), FLUSH_ON_STOP_S)
            raise

    async def _command_loop(self) -> None:
        while True:
            device_id, message = await self._commands.get()
            if self.displays is None:
                continue
            try:
                outcome = await self.displays.show(device_id, message, COMMAND_TTL_S)
            except UnknownDeviceError as exc:
                self.stats.dropped["serial_unknown_device"] += 1
                log.warning("suggestion.serial.unknown_device device=%s error=%s", device_id, exc)
                continue
            log.debug("suggestion.serial.sent device=%s outcome=%s", device_id, outcome)

    def _event(self, kind: str, tag: str, trigger: Event, ts: str, data: dict[str, Any]) -> Event:
        suggestion_id = str(data["suggestion_id"])
        return Event(
            # Deterministic: a redelivered trigger records the same event, stored once.
            event_id=str(uuid.uuid5(_RECORD_NAMESPACE, f"{self.SOURCE}:{tag}:{suggestion_id}")),
            type=kind,
            ts=ts,
            store_id=trigger.store_id,
            device_id=trigger.device_id,
            customer_id=trigger.customer_id,
            source=self.SOURCE,
            data=data,
            received_at=ts,
        )


def _items(decision: Decision) -> list[dict[str, Any]]:
    return [{"sku": sku, "score": round(score, 6)} for sku, score in decision.slate.items]
