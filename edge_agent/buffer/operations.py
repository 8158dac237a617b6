"""The buffer's typed operations for the parts beside the pipeline.

The personalizer, the uploader and the status board never see a connection: each need is a
method here that runs a query of ``reads``, ``meta``, ``erasure`` or ``writes`` on the owner
thread, and the writes that change what the buffer holds keep its counters right there
(only the buffer writes its counters).
"""

from __future__ import annotations

import sqlite3
from collections import Counter
from collections.abc import Callable, Collection, Sequence
from typing import TypeVar

from edge_agent.buffer import erasure, meta, reads, writes
from edge_agent.buffer.counters import BufferCounters
from edge_agent.buffer.reads import PendingRow, PopularRow, StateRow, Withdrawals
from edge_agent.buffer.writes import persist_counters, quarantine, transaction
from edge_agent.config import BufferSection
from edge_agent.events import Rejected
from edge_agent.governance import CentralGrant, ConsentRecord

T = TypeVar("T")


class BufferOperations:
    """Mixed into ``Buffer``, which provides the owner thread (``_call``) and the counters."""

    counters: BufferCounters
    settings: BufferSection

    async def _call(self, function: Callable[[sqlite3.Connection], T]) -> T:
        raise NotImplementedError

    # ---- the uploader -----------------------------------------------------------------

    async def pending(self, limit: int, cursors: dict[int, int]) -> list[PendingRow]:
        """Unsynced rows past the per-class cursors (``reads.CUSTOMER``/``TELEMETRY``)."""
        wanted = dict(cursors)
        return await self._call(lambda connection: reads.pending(connection, limit, wanted))

    async def newest_pending(
        self, limit: int, after: int, taken: Collection[int]
    ) -> list[PendingRow]:
        held = frozenset(taken)
        return await self._call(
            lambda connection: reads.newest_pending(connection, limit, after, held)
        )

    async def oldest_pending_received_at(self) -> float | None:
        return await self._call(reads.oldest_pending)

    async def quarantine(self, rejects: Sequence[Rejected]) -> None:
        """Quarantine input found bad after its commit (the store refused it for good)."""
        if not rejects:
            return
        kept = list(rejects)

        def write(connection: sqlite3.Connection) -> None:
            with transaction(connection):
                quarantine(connection, kept, self.settings)
                persist_counters(connection, Counter(), kept)
            self.counters.quarantined.update(reject.reason for reject in kept)

        await self._call(write)

    # ---- the downlink (erasure, withdrawals, model tag) -------------------------------

    async def read_meta(self, key: str) -> str | None:
        return await self._call(lambda connection: meta.read(connection, key))

    async def write_meta(self, key: str, value: str) -> None:
        await self._call(lambda connection: meta.write(connection, key, value))

    async def held_customers(self) -> list[str]:
        return await self._call(reads.held_customers)

    async def erase(
        self, customer_ids: Sequence[str], cursor: tuple[str, str] | None = None
    ) -> Counter[str]:
        """Erase these customers (and keep ``cursor``, a meta key and value) in one
        transaction; the totals by table."""
        targets = list(customer_ids)

        def apply(connection: sqlite3.Connection) -> Counter[str]:
            totals = erasure.erase_customers(connection, targets, cursor)
            self.counters.pending -= totals["pending"]
            self.counters.total -= totals["events"]
            return totals

        return await self._call(apply)

    async def withdrawals_since(self, after: int, limit: int) -> Withdrawals:
        return await self._call(
            lambda connection: reads.withdrawals_since(connection, after, limit)
        )

    # ---- the personalizer -------------------------------------------------------------

    async def consent(self) -> list[ConsentRecord]:
        return await self._call(reads.consent)

    async def central_grants(self) -> list[CentralGrant]:
        return await self._call(reads.central_grants)

    async def grant_central(self, customer_id: str, ts: str) -> CentralGrant | None:
        """Keep the central store's consent (``writes.grant_central``)."""
        return await self._call(
            lambda connection: writes.grant_central(connection, customer_id, ts)
        )

    async def revoke_central(self, customer_id: str) -> bool:
        return await self._call(lambda connection: writes.revoke_central(connection, customer_id))

    async def recent_customer_events(
        self, types: Collection[str], since: float, max_rows: int
    ) -> list[StateRow]:
        kinds = frozenset(types)
        return await self._call(
            lambda connection: reads.recent_customer_events(connection, kinds, since, max_rows)
        )

    async def newest_seq(self) -> int:
        return await self._call(reads.newest_seq)

    async def items_taken(
        self, types: Collection[str], after_seq: int, since: float
    ) -> list[PopularRow]:
        kinds = tuple(types)
        return await self._call(
            lambda connection: reads.items_taken(connection, kinds, after_seq, since)
        )
