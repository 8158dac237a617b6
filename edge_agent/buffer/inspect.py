"""Read the buffer from outside the running agent: stats and export (erasure: ``erasure``).

These functions take a plain connection so the CLI can use them on a config's buffer while
the agent runs (WAL lets readers work beside the writer) and the agent can use them too.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from edge_agent.buffer.budget import used_bytes
from edge_agent.errors import StorageError


def open_read_only(path: Path) -> sqlite3.Connection:
    if not path.exists():
        raise StorageError(f"no buffer at {path} (check agent.data_dir or buffer.path)")
    connection = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10.0)
    connection.execute("PRAGMA query_only=ON")
    return connection


def open_for_writing(path: Path) -> sqlite3.Connection:
    if not path.exists():
        raise StorageError(f"no buffer at {path} (check agent.data_dir or buffer.path)")
    connection = sqlite3.connect(path, timeout=10.0, isolation_level=None)
    connection.execute("PRAGMA busy_timeout=10000")
    return connection


def stats(connection: sqlite3.Connection) -> dict[str, Any]:
    def scalar(sql: str) -> Any:
        return connection.execute(sql).fetchone()[0]

    oldest = scalar("SELECT min(received_at) FROM events WHERE synced_at IS NULL")
    by_type = dict(connection.execute("SELECT type, count(*) FROM events GROUP BY type").fetchall())
    counters = dict(connection.execute("SELECT name, value FROM counters").fetchall())
    return {
        "total": scalar("SELECT count(*) FROM events"),
        "pending": scalar("SELECT count(*) FROM events WHERE synced_at IS NULL"),
        "pending_customer_events": scalar(
            "SELECT count(*) FROM events WHERE synced_at IS NULL AND customer = 1"
        ),
        "by_type": by_type,
        "bytes": used_bytes(connection),
        "oldest_pending_age_s": round(time.time() - oldest, 3) if oldest else 0.0,
        "quarantine_rows": scalar("SELECT count(*) FROM quarantine"),
        "quarantine_by_reason": {
            k.removeprefix("quarantine."): v
            for k, v in counters.items()
            if k.startswith("quarantine.")
        },
        "drops_by_reason": {
            k.removeprefix("drop."): v for k, v in counters.items() if k.startswith("drop.")
        },
        "consent_records": scalar("SELECT count(*) FROM consent"),
    }


def iter_envelopes(connection: sqlite3.Connection, batch: int = 5000) -> Iterator[str]:
    """Every buffered envelope as JSON text, in arrival order, synced or not."""
    last = 0
    while True:
        rows = connection.execute(
            "SELECT seq, envelope FROM events WHERE seq > ? ORDER BY seq LIMIT ?", (last, batch)
        ).fetchall()
        if not rows:
            return
        last = rows[-1][0]
        for _, envelope in rows:
            yield envelope
