"""What the agent reports about itself: one snapshot feeds /status, /metrics and the page.

Other parts (sync, the personalizer) register a section provider; until they do, their
sections report neutral figures so the /status contract holds from the start.
"""

from __future__ import annotations

import sqlite3
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from edge_agent import __version__
from edge_agent.buffer import Buffer
from edge_agent.buffer.budget import used_bytes
from edge_agent.sources.base import Source

# A component's sections for /status, e.g. {"sync": {...}}: called once per snapshot.
SectionProvider = Callable[[], dict[str, dict[str, Any]]]
RECOUNT_EVERY_S = 60.0


@dataclass
class StatusBoard:
    buffer: Buffer
    sources: Sequence[Source]
    started_monotonic: float = field(default_factory=time.monotonic)
    providers: list[SectionProvider] = field(default_factory=list)
    store_id: str = ""
    _recounted: float = 0.0

    async def snapshot(self) -> dict[str, Any]:
        if time.monotonic() - self._recounted > RECOUNT_EVERY_S:
            # The page polls every 2 s: a count over a million rows that often would hold
            # up the writer, so the tracked counters are reconciled only now and then.
            await self.buffer.recount()
            self._recounted = time.monotonic()
        disk = await self.buffer.call(_disk_figures)
        counters = self.buffer.counters
        drops: Counter[str] = Counter(counters.drops)
        for source in self.sources:
            drops.update({f"{source.name}.{k}": v for k, v in source.stats.drops.items()})
        oldest = disk["oldest_pending_received_at"]
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
                "bytes": disk["bytes"],
                "file_bytes": disk["file_bytes"],
                "max_bytes": self.buffer.settings.max_bytes,
                "oldest_pending_age_s": round(max(0.0, time.time() - oldest), 3)
                if oldest is not None
                else 0.0,
                "committed": counters.committed,
                "duplicates": counters.duplicates,
                "commits": counters.commits,
                "backpressure": counters.backpressure,
                "damaged_files": self.buffer.damaged_files,
                "recovered_from": str(self.buffer.recovered_from)
                if self.buffer.recovered_from
                else None,
            },
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
        return status

    def readiness(self) -> list[str]:
        """Reasons the agent is not ready; empty when it is."""
        reasons = [
            f"source {source.name} is not connected"
            for source in self.sources
            if not source.stats.connected
        ]
        if self.buffer.counters.backpressure:
            reasons.append(
                "buffer is full of unsynced customer events (backpressure: not acknowledging)"
            )
        return reasons


def _disk_figures(connection: sqlite3.Connection) -> dict[str, Any]:
    oldest: float | None = None
    for customer in (0, 1):  # one indexed lookup per class beats a scan of the pending set
        row = connection.execute(
            "SELECT received_at FROM events WHERE synced_at IS NULL AND customer = ? "
            "ORDER BY seq LIMIT 1",
            (customer,),
        ).fetchone()
        if row is not None:
            oldest = row[0] if oldest is None else min(oldest, row[0])
    page_size = connection.execute("PRAGMA page_size").fetchone()[0]
    pages = connection.execute("PRAGMA page_count").fetchone()[0]
    return {
        "bytes": used_bytes(connection),
        "file_bytes": int(page_size * pages),
        "oldest_pending_received_at": oldest,
    }
