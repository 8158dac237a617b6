"""The small interface every source implements (STYLE.md, "Shape")."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from edge_agent.events import Event, Rejected

# emit(items) returns once every item is committed to the buffer (events) or quarantined
# (rejections). Only then may the source acknowledge the input they came from. It waits
# (backpressure) while the buffer is full of what may not be dropped.
Emit = Callable[[Sequence[Event | Rejected]], Coroutine[Any, Any, None]]


@dataclass
class SourceStats:
    """Counters a source keeps for /status and /metrics; plain ints, touched on the loop only."""

    received: int = 0  # messages or frames taken in
    accepted: int = 0  # events committed
    quarantined: int = 0  # inputs quarantined
    connected: bool = False
    sessions_lost: int = 0  # reconnects where the broker had forgotten our session (MQTT)
    drops: Counter[str] = field(default_factory=Counter)  # input lost before decode, by reason
    detail: dict[str, str] = field(default_factory=dict)  # e.g. protocol version notes

    def count(self, items: Sequence[Event | Rejected]) -> None:
        for item in items:
            if isinstance(item, Event):
                self.accepted += 1
            else:
                self.quarantined += 1


class Source(Protocol):
    name: str
    stats: SourceStats

    async def run(self, emit: Emit) -> None:
        """Take input until request_stop(); then finish in-flight emits, acknowledge, return.

        Cancellation is also safe: what was not acknowledged is redelivered by the peer.
        """
        ...

    def request_stop(self) -> None:
        """Stop taking new input; run() returns once what it holds is committed and acked."""
        ...
