"""Figures about the suggestion path for /status and /metrics: latency, counts, recent."""

from __future__ import annotations

import bisect
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
# Upper bounds (seconds) of the latency histogram's buckets: a model call takes ~0.1 ms,
# trigger to publish a few ms; beyond a second a suggestion is useless.
LATENCY_BUCKETS_S: Final = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)


def percentile(sorted_values: list[float], fraction: float) -> float:
    """Nearest-rank percentile of an already sorted list (0.0 when empty)."""
    if not sorted_values:
        return 0.0
    rank = max(1, math.ceil(fraction * len(sorted_values)))
    return sorted_values[rank - 1]


@dataclass
class LatencyHistogram:
    """Every latency since start, by bucket (for /metrics: a Prometheus histogram)."""

    counts: list[int] = field(default_factory=lambda: [0] * (len(LATENCY_BUCKETS_S) + 1))
    sum_s: float = 0.0

    def observe(self, seconds: float) -> None:
        self.counts[bisect.bisect_left(LATENCY_BUCKETS_S, seconds)] += 1
        self.sum_s += seconds

    def as_status(self) -> dict[str, Any]:
        """Cumulative counts per upper bound, the last one +Inf (the exposition's shape)."""
        cumulative, running = [], 0
        for bound, count in zip((*LATENCY_BUCKETS_S, math.inf), self.counts, strict=True):
            running += count
            cumulative.append(["+Inf" if math.isinf(bound) else bound, running])
        return {"buckets": cumulative, "sum_s": round(self.sum_s, 6), "count": running}


@dataclass
class SuggestionStats:
    """Kept on the event loop."""

    latency_ms: collections.deque[float] = field(
        default_factory=lambda: collections.deque(maxlen=LATENCY_SAMPLES)
    )
    histogram: LatencyHistogram = field(default_factory=LatencyHistogram)
    by_source: collections.Counter[str] = field(default_factory=collections.Counter)
    dropped: collections.Counter[str] = field(default_factory=collections.Counter)
    recent: collections.deque[dict[str, Any]] = field(
        default_factory=lambda: collections.deque(maxlen=RECENT)
    )
    # /status and the live page show a short pseudonym, never a customer id: keyed by a
    # secret that lives only in this process, so it tells customers apart on the page and
    # links to nothing outside it (not across restarts, not to the uploaded pseudonyms).
    _display_key: bytes = field(default_factory=lambda: secrets.token_bytes(16))

    def record_latency(self, latency_ns: int) -> None:
        self.latency_ms.append(latency_ns / 1e6)
        self.histogram.observe(latency_ns / 1e9)

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
