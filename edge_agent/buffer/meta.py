"""The buffer's small key/value table: cursors and tags other parts keep across restarts
(the erasure feed's cursor, the model ETag, the last consent change looked at)."""

from __future__ import annotations

import sqlite3


def read(connection: sqlite3.Connection, key: str) -> str | None:
    row = connection.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
    return None if row is None else str(row[0])


def write(connection: sqlite3.Connection, key: str, value: str) -> None:
    """Inside the caller's transaction, or on its own (autocommit)."""
    connection.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, value))
