"""Handing rows to concurrent upload workers, and the drain rate cap.

Several workers post at once (``sync.concurrency``), so reading, posting and marking
overlap. Each claim reads past an in-memory cursor per class (customer events, telemetry),
so two workers never post the same rows. A claimed batch stays with its worker until the
store settles it (the worker retries it through any outage), so no unsynced row is ever
left behind a cursor; the cursors restart from zero at every drain all the same, which
picks up anything a cancelled worker left unsynced.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence

from cloud_sync.sync_batches import Row
from edge_agent.buffer import Buffer, reads

CUSTOMER, TELEMETRY = reads.CUSTOMER, reads.TELEMETRY


class Claims:
    """The cursors of one drain; claims are serialised by a lock."""

    def __init__(self, buffer: Buffer) -> None:
        self.buffer = buffer
        self.cursors = {CUSTOMER: 0, TELEMETRY: 0}
        self._live: set[int] = set()  # taken by the live lane, ahead of the cursor
        self._lock = asyncio.Lock()

    async def claim(self, limit: int) -> list[Row]:
        """The next ``limit`` unclaimed rows: customer events first, each class oldest first."""
        async with self._lock:
            found = await self.buffer.pending(limit + len(self._live), self.cursors)
            rows: list[Row] = []
            for row in found:
                if len(rows) >= limit:
                    break
                kind = CUSTOMER if row.customer else TELEMETRY
                self.cursors[kind] = max(self.cursors[kind], row.seq)
                if row.seq in self._live:
                    self._live.discard(row.seq)  # the live lane has it
                else:
                    rows.append(row)
            return rows

    async def claim_newest(self, limit: int) -> list[Row]:
        """The live lane: the newest unclaimed customer events (oldest first among them)."""
        async with self._lock:
            rows = await self.buffer.newest_pending(limit, self.cursors[CUSTOMER], self._live)
            self._live.update(row.seq for row in rows)
            return rows

    def settled(self, rows: Sequence[Row]) -> None:
        """Live rows the store settled: marked synced, so no read returns them again."""
        self._live.difference_update(row.seq for row in rows)


class RateLimiter:
    """Spaces sends so that on average at most ``rate`` events per second leave (0: no cap)."""

    def __init__(self, rate: float) -> None:
        self.rate = rate
        self._next = time.monotonic()

    async def take(self, events: int) -> None:
        if self.rate <= 0:
            return
        now = time.monotonic()
        start = max(now, self._next)
        self._next = start + events / self.rate
        if start > now:
            await asyncio.sleep(start - now)
