"""What the agent reports about itself: one snapshot feeds /status, /metrics and the page.

Other parts (sync, the personalizer) register a section provider; until they do, their
sections report neutral figures so the /status contract holds from the start. Every figure
comes from memory (the buffer's writer keeps its own up to date): /status never waits on
the writer, so it answers during a burst and even when the writer is wedged.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from edge_agent import __version__
from edge_agent.buffer import Buffer
from edge_agent.pipeline import Pipeline
from edge_agent.sources.base import Source
from edge_agent.status.health import Health
from edge_agent.status.trends import Devices, Trends

# A component's sections for /status, e.g. {"sync": {...}}: called once per snapshot.
SectionProvider = Callable[[], dict[str, dict[str, Any]]]


@dataclass
class StatusBoard:
    buffer: Buffer
    sources: Sequence[Source]
    started_monotonic: float = field(default_factory=time.monotonic)
    providers: list[SectionProvider] = field(default_factory=list)
    store_id: str = ""
    pipeline: Pipeline | None = None
    stall_after_s: float = 30.0
    # The live page's last hour and device list: memory only, bounded (trends.py).
    trends: Trends = field(default_factory=Trends)
    devices: Devices = field(default_factory=Devices)

    def __post_init__(self) -> None:
        if self.pipeline is not None:
            self.pipeline.observers.append(self.devices.observe)

    @property
    def health(self) -> Health:
        return Health(self.buffer, self.pipeline, self.stall_after_s)

    def not_ready(self) -> list[str]:
        return self.health.not_ready()

    async def snapshot(self) -> dict[str, Any]:
        counters = self.buffer.counters
        drops: Counter[str] = Counter(counters.drops)
        for source in self.sources:
            drops.update({f"{source.name}.{k}": v for k, v in source.stats.drops.items()})
        oldest = counters.oldest_pending_at
        salvage = counters.salvage
        recovered_from = self.buffer.recovered_from
        problems = self.health.problems()
        status: dict[str, Any] = {
            "version": __version__,
            "store_id": self.store_id,
            "uptime_s": round(time.monotonic() - self.started_monotonic, 3),
            "sources": {
                source.name: {
                    "received": source.stats.received,
                    "accepted": source.stats.accepted,
                    "quarantined": source.stats.quarantined,
                    "connected": source.stats.connected,
                    "sessions_lost": source.stats.sessions_lost,
                    **({"detail": dict(source.stats.detail)} if source.stats.detail else {}),
                }
                for source in self.sources
            },
            "buffer": {
                "pending": counters.pending,
                "total": counters.total,
                "bytes": counters.bytes,
                "file_bytes": counters.file_bytes,
                "max_bytes": self.buffer.settings.max_bytes,
                # Both on the buffer's run clock: a wall-clock step does not move the age.
                "oldest_pending_age_s": round(max(0.0, self.buffer.clock() - oldest), 3)
                if oldest is not None
                else 0.0,
                "committed": counters.committed,
                "duplicates": counters.duplicates,
                "commits": counters.commits,
                "backpressure": counters.backpressure,
                "disk_full": counters.disk_full,
                "held": counters.held,
                "holds": dict(counters.holds),
                "writer_alive": self.buffer.writer_alive,
                "damaged_files": self.buffer.damaged_files,
                "recovered_from": str(recovered_from)
                if recovered_from
                else (max(salvage.files) if salvage else None),
                # Kept (across restarts) until `edge-agent buffer clear-salvage`.
                "salvage": salvage.as_status() if salvage else None,
            },
            "health": {"ok": not problems, "problems": problems},
            "quarantine": {
                "total": sum(counters.quarantined.values()),
                "by_reason": dict(counters.quarantined),
            },
            "drops": {"total": sum(drops.values()), "by_reason": dict(drops)},
            "sync": {"lag_s": None, "sent": 0, "last_success": None, "enabled": False},
            "model": {"version": None, "source": "none"},
            "suggestions": {"shown": 0, "accepted": 0},
        }
        for provider in self.providers:
            status.update(provider())
        if status["sync"].get("lag_s") is None and oldest is not None:
            # Without sync, the lag is how long the oldest unsynced event has waited.
            status["sync"]["lag_s"] = status["buffer"]["oldest_pending_age_s"]
        status["trends"] = self.trends.as_status()
        status["devices"] = self.devices.as_status()
        return status

    async def sample_trends(self) -> None:
        """Add one point to each trend ring (the status server calls this every 10 s)."""
        self.trends.sample(await self.snapshot())

    def readiness(self) -> list[str]:
        """Reasons the agent is not ready; empty when it is."""
        reasons = [
            f"source {source.name} is not connected"
            for source in self.sources
            if not source.stats.connected
        ]
        health = self.health
        return [*reasons, *health.not_ready(), *health.problems()]
