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

log = logging.getLogger(__name__)

Migration = Callable[[sqlite3.Connection], None]

# 0001 as plain SQL: the exact statements sqlite-utils 4 issued for it (its ``create`` from
# column types, ``pk`` and ``not_null``), frozen here so that the agent's runtime does not
# import sqlite-utils (which imports numpy, dateutil, click and tabulate: about 15 MB of a
# store box's memory). ``tests/edge_agent/test_buffer_schema_sql.py`` checks that a buffer
# made here and one made by sqlite-utils have the same schema.
_INITIAL: Final = (
    'CREATE TABLE "events" (\n'
    '   "seq" INTEGER PRIMARY KEY,\n'  # arrival order; eviction and upload follow it
    '   "event_id" TEXT NOT NULL,\n'
    '   "type" TEXT NOT NULL,\n'
    '   "customer" INTEGER NOT NULL,\n'  # 1: a customer interaction (kept longest), 0: telemetry
    '   "customer_id" TEXT,\n'
    '   "ts" TEXT NOT NULL,\n'
    '   "received_at" REAL NOT NULL,\n'  # unix seconds, for age figures
    '   "envelope" TEXT NOT NULL,\n'  # the event envelope as JSON, exactly what export prints
    '   "synced_at" REAL\n'  # null until the central store acknowledged it
    ")",
    "CREATE UNIQUE INDEX events_event_id ON events(event_id)",
    # Upload order (customer events first, oldest first) and telemetry eviction both read this.
    "CREATE INDEX events_pending ON events(customer, seq) WHERE synced_at IS NULL",
    "CREATE INDEX events_synced ON events(seq) WHERE synced_at IS NOT NULL",
    "CREATE INDEX events_customer_id ON events(customer_id) WHERE customer_id IS NOT NULL",
    'CREATE TABLE "quarantine" (\n'
    '   "id" INTEGER PRIMARY KEY,\n'
    '   "received_at" TEXT,\n'
    '   "source" TEXT,\n'
    '   "reason" TEXT,\n'
    '   "detail" TEXT,\n'
    '   "raw" BLOB,\n'  # truncated to buffer.quarantine_raw_bytes
    '   "raw_len" INTEGER\n'  # the original length
    ")",
    'CREATE TABLE "counters" (\n   "name" TEXT PRIMARY KEY,\n   "value" INTEGER\n)',
    'CREATE TABLE "consent" (\n'
    '   "customer_id" TEXT PRIMARY KEY,\n'
    '   "personalization" INTEGER,\n'
    '   "profile_sharing" INTEGER,\n'
    '   "partner_sharing" INTEGER,\n'
    '   "ts" TEXT,\n'
    '   "event_id" TEXT\n'
    ")",
    'CREATE TABLE "meta" (\n   "key" TEXT PRIMARY KEY,\n   "value" TEXT\n)',
)


def _initial(connection: sqlite3.Connection) -> None:
    for statement in _INITIAL:
        connection.execute(statement)


def _central_consent(connection: sqlite3.Connection) -> None:
    # A consent the central store resolved (a fetched profile allowed sharing) for a customer
    # with no local record: it lets the customer's events committed after ``after_seq``
    # leave the store with the clear id (``governance.CentralGrant``). Grants only: a
    # central withdrawal deletes the row.
    connection.execute(
        'CREATE TABLE "central_consent" (\n'
        '   "customer_id" TEXT PRIMARY KEY,\n'
        '   "ts" TEXT NOT NULL,\n'  # when the profile said yes (RFC 3339, UTC)
        '   "after_seq" INTEGER NOT NULL\n'  # the newest event seq at the grant
        ")"
    )


MIGRATIONS: Final[tuple[tuple[str, Migration], ...]] = (
    ("0001_initial", _initial),
    ("0002_central_consent", _central_consent),
)


def migrate(connection: sqlite3.Connection) -> int:
    """Apply pending migrations; return the schema version now in force."""
    connection.execute(
        "CREATE TABLE IF NOT EXISTS _migrations "
        "(version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at TEXT NOT NULL)"
    )
    applied = {row[0] for row in connection.execute("SELECT version FROM _migrations")}
    for version, (name, apply) in enumerate(MIGRATIONS, start=1):
        if version in applied:
            continue
        with connection:  # one transaction per migration: all of it or none
            apply(connection)
            connection.execute(
                "INSERT INTO _migrations (version, name, applied_at) VALUES (?, ?, ?)",
                (version, name, datetime.now(UTC).isoformat()),
            )
        log.info("buffer.migration.applied version=%d name=%s", version, name)
    newest = max(applied | {len(MIGRATIONS)})
    if newest > len(MIGRATIONS):
        log.warning("buffer.schema.newer version=%d known=%d", newest, len(MIGRATIONS))
    return newest
