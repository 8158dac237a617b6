"""The quarantine from outside the running agent: list, show, and replay after a fix.

Replay re-decodes each quarantined input with a decoder the caller passes (the live one,
with the current registry and limits) and, in one ``BEGIN IMMEDIATE`` transaction, commits
what now passes as events and deletes its quarantine row; what still fails stays, with its
new reason. SQLite's write lock serialises that transaction with the running agent's
writer (which waits out a lock and retries), so replay is safe while the agent runs. A
replayed row is gone, and events are inserted by id (``INSERT OR IGNORE``): running replay
again changes nothing.
"""

from __future__ import annotations

import base64
import sqlite3
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from edge_agent.buffer.writes import event_row, record_consent, transaction
from edge_agent.events import Event, Rejected


@dataclass(frozen=True)
class QuarantineRow:
    id: int
    received_at: str
    source: str
    reason: str
    detail: str
    raw: bytes  # truncated to buffer.quarantine_raw_bytes when raw_len is larger
    raw_len: int

    @property
    def truncated(self) -> bool:
        return len(self.raw) < self.raw_len

    def summary(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "received_at": self.received_at,
            "source": self.source,
            "reason": self.reason,
            "detail": self.detail,
            "raw_len": self.raw_len,
        }

    def as_dict(self) -> dict[str, Any]:
        """The summary with the raw bytes: base64 always, as text when they are UTF-8."""
        shown = self.summary()
        shown["raw_base64"] = base64.b64encode(self.raw).decode("ascii")
        try:
            shown["raw_text"] = self.raw.decode("utf-8")
        except UnicodeDecodeError:
            shown["raw_text"] = None
        shown["truncated"] = self.truncated
        return shown


# What a decoder answers for one row: the decoded items, or why it cannot be replayed.
Redecode = Callable[[QuarantineRow], "list[Event | Rejected] | str"]

_COLUMNS = "id, received_at, source, reason, detail, raw, raw_len"


def _row(values: Sequence[Any]) -> QuarantineRow:
    ident, received_at, source, reason, detail, raw, raw_len = values
    return QuarantineRow(
        int(ident),
        str(received_at),
        str(source),
        str(reason),
        str(detail or ""),
        bytes(raw or b""),
        int(raw_len if raw_len is not None else len(raw or b"")),
    )


def list_rows(
    connection: sqlite3.Connection,
    reason: str | None = None,
    source: str | None = None,
    limit: int | None = None,
) -> list[QuarantineRow]:
    """Oldest first; ``source`` matches a prefix (``mqtt:edge/store-1/``)."""
    clauses, params = _filters(reason, source)
    sql = f"SELECT {_COLUMNS} FROM quarantine{clauses} ORDER BY id"
    if limit is not None:
        sql += " LIMIT ?"
        params.append(limit)
    return [_row(values) for values in connection.execute(sql, params)]


def get_row(connection: sqlite3.Connection, ident: int) -> QuarantineRow | None:
    found = connection.execute(f"SELECT {_COLUMNS} FROM quarantine WHERE id = ?", (ident,))
    values = found.fetchone()
    return _row(values) if values is not None else None


def _filters(reason: str | None, source: str | None) -> tuple[str, list[Any]]:
    clauses: list[str] = []
    params: list[Any] = []
    if reason is not None:
        clauses.append("reason = ?")
        params.append(reason)
    if source is not None:
        clauses.append("substr(source, 1, ?) = ?")  # a prefix, without LIKE's wildcards
        params.extend([len(source), source])
    return (" WHERE " + " AND ".join(clauses) if clauses else ""), params


@dataclass
class ReplayResult:
    committed: list[int] = field(default_factory=list)  # quarantine ids now in the buffer
    events: int = 0  # events inserted (a replay of an already held id inserts none)
    still_failing: Counter[str] = field(default_factory=Counter)  # by new reason
    skipped: Counter[str] = field(default_factory=Counter)  # by why it cannot be replayed
    dry_run: bool = False

    def as_dict(self) -> dict[str, Any]:
        return {
            "dry_run": self.dry_run,
            "committed_rows": len(self.committed),
            "committed_ids": self.committed,
            "events_inserted": self.events,
            "still_failing": dict(self.still_failing),
            "skipped": dict(self.skipped),
        }


def replay(
    connection: sqlite3.Connection,
    redecode: Redecode,
    *,
    reason: str | None = None,
    ids: Sequence[int] = (),
    dry_run: bool = False,
) -> ReplayResult:
    """Re-decode the chosen rows (all, by reason, or by id) in one transaction."""
    result = ReplayResult(dry_run=dry_run)
    with transaction(connection):
        rows = list_rows(connection, reason)
        if ids:
            wanted = set(ids)
            rows = [row for row in rows if row.id in wanted]
        for row in rows:
            _replay_row(connection, row, redecode, result)
        if dry_run:
            connection.execute("ROLLBACK")
    return result


def _replay_row(
    connection: sqlite3.Connection, row: QuarantineRow, redecode: Redecode, result: ReplayResult
) -> None:
    if row.truncated:  # only the first bytes were kept: decoding them proves nothing
        result.skipped["truncated"] += 1
        return
    items = redecode(row)
    if isinstance(items, str):
        result.skipped[items] += 1
        return
    failures = [item for item in items if isinstance(item, Rejected)]
    if failures:
        # All of the input or none: what passes now is committed with the rest once fixed.
        first = failures[0]
        connection.execute(
            "UPDATE quarantine SET reason = ?, detail = ? WHERE id = ?",
            (first.reason, first.detail[:500], row.id),
        )
        result.still_failing[first.reason] += 1
        return
    events = [item for item in items if isinstance(item, Event)]
    now = time.time()
    before = connection.total_changes
    connection.executemany(
        "INSERT OR IGNORE INTO events (event_id, type, customer, customer_id, ts, "
        "received_at, envelope) VALUES (?, ?, ?, ?, ?, ?, ?)",
        [event_row(event, now) for event in events],
    )
    result.events += connection.total_changes - before
    record_consent(connection, events)
    connection.execute("DELETE FROM quarantine WHERE id = ?", (row.id,))
    result.committed.append(row.id)
