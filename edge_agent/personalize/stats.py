"""Figures about the suggestion path for /status and /metrics: latency, counts, recent."""

from __future__ import annotations

import collections
import hashlib
import hmac
import math
import secrets
from dataclasses import dataclass, field
from typing import Any, Final

LATENCY_SAMPLES: Final = 2048  # a sliding window: the percentiles describe recent traffic
RECENT: Final = 10  # suggestions shown on the live page
DISPLAY_PREFIX: Final = "cu-"
_DISPLAY_HEX_CHARS: Final = 8


def percentile(sorted_values: list[float], fraction: float) -> float:
    """Nearest-rank percentile of an already sorted list (0.0 when empty)."""
    if not sorted_values:
        return 0.0
    rank = max(1, math.ceil(fraction * len(sorted_values)))
    return sorted_values[rank - 1]


@dataclass
class SuggestionStats:
    """Kept on the event loop."""

    latency_ms: collections.deque[float] = field(
        default_factory=lambda: collections.deque(maxlen=LATENCY_SAMPLES)
    )
    by_source: collections.Counter[str] = field(default_factory=collections.Counter)
    dropped: collections.Counter[str] = field(default_factory=collections.Counter)
    recent: collections.deque[dict[str, Any]] = field(
        default_factory=lambda: collections.deque(maxlen=RECENT)
    )
    # /status and the live page show a short pseudonym, never a customer id: keyed by a
    # secret that lives only in this process, so it tells customers apart on the page and
    # links to nothing outside it (not across restarts, not to the uploaded pseudonyms).
    _display_key: bytes = field(default_factory=lambda: secrets.token_bytes(16))

    def display_id(self, customer_id: str | None) -> str | None:
        if not customer_id:
            return None
        digest = hmac.new(self._display_key, customer_id.encode("utf-8"), hashlib.sha256)
        return DISPLAY_PREFIX + digest.hexdigest()[:_DISPLAY_HEX_CHARS]

    def forget(self, customer_id: str) -> None:
        """An erased customer leaves the recent list too."""
        gone = self.display_id(customer_id)
        kept = [entry for entry in self.recent if entry.get("customer") != gone]
        self.recent.clear()
        self.recent.extend(kept)

    def latency(self) -> dict[str, Any]:
        values = sorted(self.latency_ms)
        return {
            "p50": round(percentile(values, 0.50), 3),
            "p99": round(percentile(values, 0.99), 3),
            "max": round(values[-1], 3) if values else 0.0,
            "samples": len(values),
        }
