"""Read the buffer from outside the running agent: stats, export, erase a customer.

These functions take a plain connection so the CLI can use them on a config's buffer while
the agent runs (WAL lets readers work beside the writer) and the agent can use them too.
"""

from __future__ import annotations

import functools
import re
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Final

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


# Characters that may continue an id: an occurrence next to one is part of another id.
_ID_CHAR: Final = rb"[A-Za-z0-9._:@+-]"


@functools.lru_cache(maxsize=64)
def _whole_id(customer_id: str) -> re.Pattern[bytes]:
    escaped = re.escape(customer_id.encode("utf-8"))
    return re.compile(rb"(?<!" + _ID_CHAR + rb")" + escaped + rb"(?!" + _ID_CHAR + rb")")


def names_id(raw: bytes | None, customer_id: str) -> bool:
    """Whether raw bytes (JSON, a serial frame, noise) hold ``customer_id`` as a whole id:
    erasing ``c-erase`` must not touch a payload about ``c-erase0``."""
    if raw is None or not customer_id:
        return False
    return _whole_id(customer_id).search(bytes(raw)) is not None


def erase_customer(connection: sqlite3.Connection, customer_id: str) -> dict[str, int]:
    """Delete every trace of a customer in one transaction; return what was deleted."""
    connection.execute("BEGIN IMMEDIATE")
    try:
        events = connection.execute(
            "DELETE FROM events WHERE customer_id = ?", (customer_id,)
        ).rowcount
        consent = connection.execute(
            "DELETE FROM consent WHERE customer_id = ?", (customer_id,)
        ).rowcount
        # Raw quarantined payloads may name the customer too; whole ids only (see names_id).
        connection.create_function("names_id", 2, names_id, deterministic=True)
        quarantine = connection.execute(
            "DELETE FROM quarantine WHERE instr(raw, ?) > 0 AND names_id(raw, ?)",
            (customer_id.encode("utf-8"), customer_id),
        ).rowcount
        connection.execute("COMMIT")
    except BaseException:
        connection.execute("ROLLBACK")
        raise
    return {"events": events, "consent": consent, "quarantine": quarantine}
