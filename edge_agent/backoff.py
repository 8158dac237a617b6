"""Capped exponential backoff with jitter, for every reconnect and retry loop."""

from __future__ import annotations

import random
from dataclasses import dataclass, field


@dataclass
class Backoff:
    """Delays grow ``base * 2**attempt`` up to ``cap``; each is drawn from [delay/2, delay].

    The jitter keeps hundreds of store boxes from reconnecting in lockstep after an outage.
    """

    base: float = 0.5
    cap: float = 30.0
    attempt: int = 0
    rng: random.Random = field(default_factory=random.Random)

    def next_delay(self) -> float:
        delay = min(self.cap, self.base * (2 ** min(self.attempt, 32)))
        self.attempt += 1
        return self.rng.uniform(delay / 2, delay)

    def reset(self) -> None:
        self.attempt = 0
