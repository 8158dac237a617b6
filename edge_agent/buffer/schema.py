"""The buffer's schema as versioned migrations, recorded in a table (sqlite-utils style).

A migration is applied once, in its own transaction, and never edited after release: a new
need is a new migration appended to ``MIGRATIONS``.
"""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Final

import sqlite_utils

log = logging.getLogger(__name__)

Migration = Callable[[sqlite_utils.Database], None]


def _initial(db: sqlite_utils.Database) -> None:
    db.table("events").create(
        {
            "seq": int,  # arrival order; eviction and upload follow it
            "event_id": str,
            "type": str,
            "customer": int,  # 1: a customer interaction (kept longest), 0: telemetry
            "customer_id": str,
            "ts": str,
            "received_at": float,  # unix seconds, for age figures
            "envelope": str,  # the event envelope as JSON, exactly what export prints
            "synced_at": float,  # null until the central store acknowledged it
        },
        pk="seq",
        not_null={"event_id", "type", "customer", "ts", "received_at", "envelope"},
    )
    db.execute("CREATE UNIQUE INDEX events_event_id ON events(event_id)")
    # Upload order (customer events first, oldest first) and telemetry eviction both read this.
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
            "raw": bytes,  # truncated to buffer.quarantine_raw_bytes
            "raw_len": int,  # the original length
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


MIGRATIONS: Final[tuple[tuple[str, Migration], ...]] = (("0001_initial", _initial),)


def migrate(connection: sqlite3.Connection) -> int:
    """Apply pending migrations; return the schema version now in force."""
    connection.execute(
        "CREATE TABLE IF NOT EXISTS _migrations "
        "(version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at TEXT NOT NULL)"
    )
    applied = {row[0] for row in connection.execute("SELECT version FROM _migrations")}
    db = sqlite_utils.Database(connection)
    for version, (name, apply) in enumerate(MIGRATIONS, start=1):
        if version in applied:
            continue
        with connection:  # one transaction per migration: all of it or none
            apply(db)
            connection.execute(
                "INSERT INTO _migrations (version, name, applied_at) VALUES (?, ?, ?)",
                (version, name, datetime.now(UTC).isoformat()),
            )
        log.info("buffer.migration.applied version=%d name=%s", version, name)
    newest = max(applied | {len(MIGRATIONS)})
    if newest > len(MIGRATIONS):
        log.warning("buffer.schema.newer version=%d known=%d", newest, len(MIGRATIONS))
    return newest
