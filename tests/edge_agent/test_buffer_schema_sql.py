"""The buffer's first migration, frozen as SQL, makes the schema sqlite-utils made.

The agent's runtime no longer imports sqlite-utils (memory, issue 11); this test keeps the
frozen statements honest against the library's own ``create`` of the same declaration, and
checks the agent's import of the buffer stays free of sqlite-utils and numpy.
"""

from __future__ import annotations

import sqlite3
import subprocess
import sys
from pathlib import Path

import sqlite_utils

from edge_agent.buffer.schema import migrate


def _declared_by_sqlite_utils(db: sqlite_utils.Database) -> None:
    """The 0001 migration as it was written with sqlite-utils."""
    db.table("events").create(
        {
            "seq": int,
            "event_id": str,
            "type": str,
            "customer": int,
            "customer_id": str,
            "ts": str,
            "received_at": float,
            "envelope": str,
            "synced_at": float,
        },
        pk="seq",
        not_null={"event_id", "type", "customer", "ts", "received_at", "envelope"},
    )
    db.execute("CREATE UNIQUE INDEX events_event_id ON events(event_id)")
    db.execute("CREATE INDEX events_pending ON events(customer, seq) WHERE synced_at IS NULL")
    db.execute("CREATE INDEX events_synced ON events(seq) WHERE synced_at IS NOT NULL")
    db.execute(
        "CREATE INDEX events_customer_id ON events(customer_id) WHERE customer_id IS NOT NULL"
    )
    db.table("quarantine").create(
        {
            "id": int,
            "received_at": str,
            "source": str,
            "reason": str,
            "detail": str,
            "raw": bytes,
            "raw_len": int,
        },
        pk="id",
    )
    db.table("counters").create({"name": str, "value": int}, pk="name")
    db.table("consent").create(
        {
            "customer_id": str,
            "personalization": int,
            "profile_sharing": int,
            "partner_sharing": int,
            "ts": str,
            "event_id": str,
        },
        pk="customer_id",
    )
    db.table("meta").create({"key": str, "value": str}, pk="key")
    # 0002: the central store's consent grants
    db.table("central_consent").create(
        {"customer_id": str, "ts": str, "after_seq": int},
        pk="customer_id",
        not_null={"ts", "after_seq"},
    )


def _schema(path: Path) -> list[tuple[str, str, str | None]]:
    with sqlite3.connect(path) as connection:
        rows = connection.execute(
            "SELECT type, name, sql FROM sqlite_master WHERE name != '_migrations' ORDER BY name"
        ).fetchall()
    connection.close()
    return [(str(kind), str(name), sql) for kind, name, sql in rows]


def _columns(path: Path, table: str) -> list[tuple[object, ...]]:
    with sqlite3.connect(path) as connection:
        rows = connection.execute(f"PRAGMA table_xinfo({table})").fetchall()
    connection.close()
    return rows


def test_frozen_sql_matches_sqlite_utils(tmp_path: Path) -> None:
    frozen, library = tmp_path / "frozen.db", tmp_path / "library.db"
    connection = sqlite3.connect(frozen)
    assert migrate(connection) == 2
    connection.close()
    _declared_by_sqlite_utils(sqlite_utils.Database(library))
    assert _schema(frozen) == _schema(library)
    for table in ("events", "quarantine", "counters", "consent", "meta", "central_consent"):
        assert _columns(frozen, table) == _columns(library, table)


def test_migration_is_applied_once(tmp_path: Path) -> None:
    path = tmp_path / "buffer.db"
    for _ in range(2):
        connection = sqlite3.connect(path)
        assert migrate(connection) == 2
        connection.close()
    with sqlite3.connect(path) as connection:
        assert connection.execute("SELECT count(*) FROM _migrations").fetchone() == (2,)
    connection.close()


def test_buffer_import_loads_neither_sqlite_utils_nor_numpy() -> None:
    probe = (
        "import sys, edge_agent.buffer, edge_agent.buffer.schema; "
        "print(sorted(m for m in ('sqlite_utils', 'numpy') if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=60
    )
    assert out.stdout.strip() == "[]"
