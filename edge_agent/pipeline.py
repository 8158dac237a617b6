"""The pipe between sources and everything after the buffer: govern, tap, commit, observe.

Sources hand decoded items to their emitter (``Pipeline.emitter(name)``); it commits them
(events to the buffer, rejections to quarantine) and only then tells the observers
(uploader wake-up, the live page's recent list). Taps see the same events before the
commit, for work that must not wait for the disk (the personalizer answers in about a
millisecond while the commit's fsync runs). Taps and observers are plain callables on the
event loop; they must not block: anything slow schedules its own task.

A component's own records (the personalizer's ``suggestion.shown``) go in through
``record``: committed and observed like any input, but never handed to the taps, so no
component hears its own writing as if a device had sent it.

The pipeline also keeps, per source, when its oldest emit still waiting for a commit began:
input that waits while nothing commits is how health tells a wedged agent from an idle one.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Callable, Sequence

from edge_agent.buffer import Buffer
from edge_agent.events import Event, Rejected
from edge_agent.governance import ConsentLedger
from edge_agent.sources.base import Emit

log = logging.getLogger(__name__)

Observer = Callable[[Sequence[Event]], None]


class Pipeline:
    def __init__(self, buffer: Buffer, consent: ConsentLedger) -> None:
        self.buffer = buffer
        self.consent = consent
        self.taps: list[Observer] = []
        self.observers: list[Observer] = []
        # source name -> emit token -> when that emit began (monotonic)
        self._waiting: dict[str, dict[int, float]] = {}
        self._tokens = itertools.count()

    def emitter(self, source: str) -> Emit:
        """The emit function for one source, so that a stall can be pinned on it."""

        async def emit(items: Sequence[Event | Rejected]) -> None:
            await self.emit(items, source)

        return emit

    async def emit(self, items: Sequence[Event | Rejected], source: str = "") -> None:
        await self._commit(items, source, tapped=True)

    async def record(self, events: Sequence[Event]) -> None:
        """Commit events a component wrote itself: observers see them, taps do not."""
        await self._commit(events, "", tapped=False)

    async def _commit(self, items: Sequence[Event | Rejected], source: str, tapped: bool) -> None:
        events = [item for item in items if isinstance(item, Event)]
        rejects = [item for item in items if isinstance(item, Rejected)]
        for reject in rejects:
            log.info(
                "input.quarantined source=%s reason=%s detail=%r bytes=%d",
                reject.source,
                reject.reason,
                reject.detail[:120],
                len(reject.raw),
            )
        # Govern before anything sees the events: a withdrawal is in force before the taps
        # answer and before the commit lets the uploader read this customer's rows.
        self.consent.observe(events)
        if events and tapped:
            for tap in self.taps:
                tap(events)
        token = next(self._tokens)
        waiting = self._waiting.setdefault(source, {})
        waiting[token] = time.monotonic()
        try:
            await self.buffer.commit(events, rejects)
        finally:
            del waiting[token]
        if events:
            for observer in self.observers:
                observer(events)

    def waiting_since(self) -> dict[str, float]:
        """Per source with input waiting for a commit: when the oldest such emit began."""
        return {source: min(tokens.values()) for source, tokens in self._waiting.items() if tokens}
