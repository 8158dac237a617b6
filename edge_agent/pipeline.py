"""The pipe between sources and everything after the buffer.

Sources hand decoded items to ``Pipeline.emit``; it commits them (events to the buffer,
rejections to quarantine) and only then tells the observers (uploader wake-up, the live
page's recent list). Taps see the same events before the commit, for work that must not
wait for the disk (the personalizer answers in about a millisecond while the commit's fsync
runs). Taps and observers are plain callables on the event loop; they must not block:
anything slow schedules its own task.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence

from edge_agent.buffer import Buffer
from edge_agent.events import Event, Rejected

log = logging.getLogger(__name__)

Observer = Callable[[Sequence[Event]], None]


class Pipeline:
    def __init__(self, buffer: Buffer) -> None:
        self.buffer = buffer
        self.taps: list[Observer] = []
        self.observers: list[Observer] = []
        self.last_progress = time.monotonic()

    async def emit(self, items: Sequence[Event | Rejected]) -> None:
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
        if events:
            for tap in self.taps:
                tap(events)
        await self.buffer.commit(events, rejects)
        self.last_progress = time.monotonic()
        if events:
            for observer in self.observers:
                observer(events)
