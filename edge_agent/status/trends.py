"""The live page's last hour: bounded in-memory rings of sampled figures, and the devices seen.

Nothing here touches the disk: after a restart the trends start empty, which the page shows
as "collecting". Each ring holds at most ``TREND_POINTS`` samples, one per
``TREND_INTERVAL_S``; the device list keeps at most ``MAX_DEVICES`` entries, forgetting the
one seen longest ago, so a flood of made-up device ids costs bounded memory.
"""

from __future__ import annotations

import time
from collections import OrderedDict, deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Final

from edge_agent.events import Event

TREND_INTERVAL_S: Final = 10.0
TREND_POINTS: Final = 360  # one hour at one sample per 10 s
MAX_DEVICES: Final = 256
DEVICE_SOURCES: Final = frozenset({"mqtt", "serial"})

# The figures sampled, in the order the page draws them.
SERIES: Final = ("ingest_per_s", "sync_lag_s", "suggestion_p50_ms", "acceptance")


def _utc_now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


@dataclass
class Trends:
    """One ring per series; a point is (UTC time, value or None when the figure is unknown)."""

    points: int = TREND_POINTS
    rings: dict[str, deque[tuple[str, float | None]]] = field(default_factory=dict)
    _last_accepted: int | None = None
    _last_monotonic: float | None = None

    def __post_init__(self) -> None:
        for name in SERIES:
            self.rings[name] = deque(maxlen=self.points)

    def sample(self, status: dict[str, Any], now: float | None = None) -> None:
        """Take one point of each series from a /status snapshot."""
        now = time.monotonic() if now is None else now
        at = _utc_now()
        accepted = sum(int(s.get("accepted", 0)) for s in status.get("sources", {}).values())
        rate: float | None = None
        if self._last_accepted is not None and self._last_monotonic is not None:
            elapsed = now - self._last_monotonic
            if elapsed > 0:
                # A restarted source resets its counter: never draw a negative rate.
                rate = round(max(0, accepted - self._last_accepted) / elapsed, 3)
        self._last_accepted, self._last_monotonic = accepted, now
        lag = status.get("sync", {}).get("lag_s")
        latency = status.get("model", {}).get("latency_ms") or {}
        p50 = latency.get("p50") if latency.get("samples") else None
        suggestions = status.get("suggestions", {})
        shown = int(suggestions.get("shown", 0))
        acceptance = round(int(suggestions.get("accepted", 0)) / shown, 4) if shown else None
        values: dict[str, float | None] = {
            "ingest_per_s": rate,
            "sync_lag_s": None if lag is None else float(lag),
            "suggestion_p50_ms": None if p50 is None else float(p50),
            "acceptance": acceptance,
        }
        for name in SERIES:
            self.rings[name].append((at, values[name]))

    def as_status(self) -> dict[str, Any]:
        return {
            "interval_s": TREND_INTERVAL_S,
            "points": self.points,
            "series": {name: [list(point) for point in ring] for name, ring in self.rings.items()},
        }


@dataclass
class DeviceSeen:
    source: str  # "mqtt" or "serial"
    last_seen: str  # UTC, ISO 8601
    events: int = 0


@dataclass
class Devices:
    """Devices that sent events, most recently seen last; a pipeline observer feeds it."""

    limit: int = MAX_DEVICES
    seen: OrderedDict[str, DeviceSeen] = field(default_factory=OrderedDict)
    forgotten: int = 0  # entries evicted to stay within the limit

    def observe(self, events: Sequence[Event]) -> None:
        at = _utc_now()
        for event in events:
            kind = event.source.split(":", 1)[0]
            # Only devices in the store: the agent's own events (suggestions) are not devices.
            if not event.device_id or kind not in DEVICE_SOURCES:
                continue
            entry = self.seen.pop(event.device_id, None) or DeviceSeen(kind, at)
            entry.source, entry.last_seen = kind, at
            entry.events += 1
            self.seen[event.device_id] = entry
        while len(self.seen) > self.limit:
            self.seen.popitem(last=False)
            self.forgotten += 1

    def as_status(self) -> dict[str, Any]:
        return {
            "forgotten": self.forgotten,
            "list": [
                {"device_id": device_id, **vars(entry)}
                for device_id, entry in reversed(self.seen.items())
            ],
        }
