"""The disk budget: what is deleted, in which order, when the buffer reaches buffer.max_bytes.

Policy (DESIGN.md): synced rows first (oldest first), then the oldest unsynced telemetry.
Unsynced customer events are never evicted while sync is on: when only they are left, the
writer stops committing and the sources stop acknowledging (backpressure) until sync makes
room. A collect-only store (no sync.url) has nothing that would ever make room, so there the
oldest customer events go last (``retention_evicted``), and ``expire`` deletes those older
than ``buffer.retention_days``.
Eviction runs down to a low-water mark so it does not run again on every commit.
"""

from __future__ import annotations

import sqlite3
from collections import Counter
from dataclasses import dataclass
from typing import Final

LOW_WATER: Final = 0.9  # evict down to 90% of the budget
_CHUNK: Final = 500  # rows per delete statement: short statements, bounded work per step
_MAX_STEPS: Final = 100_000


@dataclass(frozen=True)
class Eviction:
    dropped: Counter[str]  # rows deleted, by reason
    pending_dropped: int  # unsynced rows among them (pending counter must follow)
    fits: bool  # the incoming rows fit after eviction


def used_bytes(connection: sqlite3.Connection) -> int:
    """Bytes the database file holds in live pages (freed pages are reused, not counted)."""
    page_size = connection.execute("PRAGMA page_size").fetchone()[0]
    pages = connection.execute("PRAGMA page_count").fetchone()[0]
    free = connection.execute("PRAGMA freelist_count").fetchone()[0]
    return int((pages - free) * page_size)


def estimate_bytes(envelope_bytes: int, rows: int) -> int:
    # Each row is stored once in the table and its id again in two indexes.
    return envelope_bytes + rows * 160


RETENTION: Final = "retention_evicted"
_RETENTION_STEP: Final = (
    RETENTION,
    "DELETE FROM events WHERE seq IN (SELECT seq FROM events "
    "WHERE synced_at IS NULL AND customer = 1 ORDER BY seq LIMIT ?)",
    True,
)


def make_room(
    connection: sqlite3.Connection, incoming: int, max_bytes: int, *, collect_only: bool = False
) -> Eviction:
    """Delete by policy until ``incoming`` bytes fit; call inside the writer's transaction.

    ``collect_only``: no sync will ever make room, so the oldest customer events go last.
    """
    dropped: Counter[str] = Counter()
    pending_dropped = 0
    if used_bytes(connection) + incoming <= max_bytes:
        return Eviction(dropped, 0, fits=True)
    target = max(0, int(max_bytes * LOW_WATER) - incoming)
    steps: tuple[tuple[str, str, bool], ...] = (
        (
            "synced_evicted",
            "DELETE FROM events WHERE seq IN (SELECT seq FROM events "
            "WHERE synced_at IS NOT NULL ORDER BY seq LIMIT ?)",
            False,
        ),
        (
            "quarantine_evicted",
            "DELETE FROM quarantine WHERE id IN (SELECT id FROM quarantine ORDER BY id LIMIT ?)",
            False,
        ),
        (
            "telemetry_evicted_unsynced",
            "DELETE FROM events WHERE seq IN (SELECT seq FROM events "
            "WHERE synced_at IS NULL AND customer = 0 ORDER BY seq LIMIT ?)",
            True,
        ),
    )
    if collect_only:
        steps = (*steps, _RETENTION_STEP)
    for reason, statement, pending in steps:
        for _ in range(_MAX_STEPS):
            if used_bytes(connection) <= target:
                break
            deleted = connection.execute(statement, (_CHUNK,)).rowcount
            if deleted <= 0:
                break
            dropped[reason] += deleted
            if pending:
                pending_dropped += deleted
        if used_bytes(connection) <= target:
            break
    fits = used_bytes(connection) + incoming <= max_bytes
    return Eviction(dropped, pending_dropped, fits)


def oldest_customer_pending(connection: sqlite3.Connection) -> float | None:
    """received_at of the oldest unsynced customer event (the pending index: one seek)."""
    row = connection.execute(
        "SELECT received_at FROM events WHERE synced_at IS NULL AND customer = 1 "
        "ORDER BY seq LIMIT 1"
    ).fetchone()
    return float(row[0]) if row is not None else None


def expire(connection: sqlite3.Connection, before: float) -> int:
    """Delete unsynced customer events received before ``before`` (unix seconds), oldest
    first, in bounded chunks; call inside the writer's transaction. Rows deleted."""
    deleted = 0
    for _ in range(_MAX_STEPS):
        # The pending index gives arrival order; received_at grows with it.
        step = connection.execute(
            "DELETE FROM events WHERE seq IN (SELECT seq FROM events "
            "WHERE synced_at IS NULL AND customer = 1 AND received_at < ? ORDER BY seq LIMIT ?)",
            (before, _CHUNK),
        ).rowcount
        deleted += max(step, 0)
        if step < _CHUNK:
            break
    return deleted
