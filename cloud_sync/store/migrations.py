"""Versioned schema migrations for both backends, recorded in ``schema_migrations``.

A migration is never edited once released: a change is a new version. Each backend applies
the pending ones in one transaction; PostgreSQL holds an advisory lock meanwhile so that
several service instances starting together migrate once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

# Any constant works; it only has to be the same for every instance of the service.
PG_MIGRATION_LOCK: Final = 0x63_73_74_6F_72_65  # "cstore"


@dataclass(frozen=True, slots=True)
class Migration:
    version: int
    name: str
    sqlite: tuple[str, ...]
    postgres: tuple[str, ...]


MIGRATIONS: Final[tuple[Migration, ...]] = (
    Migration(
        1,
        "events, identities, credentials, erasures, models",
        sqlite=(
            """CREATE TABLE events (
                seq INTEGER PRIMARY KEY,
                event_id TEXT NOT NULL UNIQUE,
                type TEXT NOT NULL,
                ts TEXT NOT NULL,
                store_id TEXT NOT NULL,
                device_id TEXT,
                customer_id TEXT,
                source TEXT NOT NULL,
                schema INTEGER NOT NULL,
                data TEXT NOT NULL,
                received_at TEXT,
                ingested_at TEXT NOT NULL)""",
            "CREATE INDEX events_customer ON events (customer_id, ts, seq)"
            " WHERE customer_id IS NOT NULL",
            """CREATE TABLE identity_links (
                a TEXT NOT NULL, b TEXT NOT NULL, PRIMARY KEY (a, b)) WITHOUT ROWID""",
            """CREATE TABLE credentials (
                id INTEGER PRIMARY KEY AUTOINCREMENT,
                kind TEXT NOT NULL CHECK (kind IN ('agent', 'partner', 'admin')),
                name TEXT NOT NULL,
                store_id TEXT,
                scopes TEXT NOT NULL DEFAULT '',
                token_hash TEXT NOT NULL UNIQUE,
                created_at TEXT NOT NULL,
                revoked_at TEXT)""",
            """CREATE TABLE erasures (
                seq INTEGER PRIMARY KEY AUTOINCREMENT,
                customer_id TEXT NOT NULL,
                requested_at TEXT NOT NULL,
                requested_by TEXT NOT NULL)""",
            "CREATE INDEX erasures_customer ON erasures (customer_id)",
            """CREATE TABLE models (
                seq INTEGER PRIMARY KEY AUTOINCREMENT,
                version TEXT NOT NULL UNIQUE,
                sha256 TEXT NOT NULL,
                size INTEGER NOT NULL,
                manifest TEXT NOT NULL,
                artifact BLOB NOT NULL,
                published_at TEXT NOT NULL)""",
        ),
        postgres=(
            """CREATE TABLE events (
                seq bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
                event_id text NOT NULL UNIQUE,
                type text NOT NULL,
                ts timestamptz NOT NULL,
                store_id text NOT NULL,
                device_id text,
                customer_id text,
                source text NOT NULL,
                schema integer NOT NULL,
                data jsonb NOT NULL,
                received_at text,
                ingested_at timestamptz NOT NULL DEFAULT now())""",
            "CREATE INDEX events_customer ON events (customer_id, ts, seq)"
            " WHERE customer_id IS NOT NULL",
            """CREATE TABLE identity_links (
                a text NOT NULL, b text NOT NULL, PRIMARY KEY (a, b))""",
            """CREATE TABLE credentials (
                id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
                kind text NOT NULL CHECK (kind IN ('agent', 'partner', 'admin')),
                name text NOT NULL,
                store_id text,
                scopes text NOT NULL DEFAULT '',
                token_hash text NOT NULL UNIQUE,
                created_at timestamptz NOT NULL DEFAULT now(),
                revoked_at timestamptz)""",
            """CREATE TABLE erasures (
                seq bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
                customer_id text NOT NULL,
                requested_at timestamptz NOT NULL,
                requested_by text NOT NULL)""",
            "CREATE INDEX erasures_customer ON erasures (customer_id)",
            """CREATE TABLE models (
                seq bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
                version text NOT NULL UNIQUE,
                sha256 text NOT NULL,
                size bigint NOT NULL,
                manifest jsonb NOT NULL,
                artifact bytea NOT NULL,
                published_at timestamptz NOT NULL)""",
        ),
    ),
    Migration(
        2,
        "events are unique per (store_id, event_id), not per event_id",
        # SQLite cannot drop a column's UNIQUE: the table is rebuilt, rows and seq kept.
        sqlite=(
            """CREATE TABLE events_by_store (
                seq INTEGER PRIMARY KEY,
                event_id TEXT NOT NULL,
                type TEXT NOT NULL,
                ts TEXT NOT NULL,
                store_id TEXT NOT NULL,
                device_id TEXT,
                customer_id TEXT,
                source TEXT NOT NULL,
                schema INTEGER NOT NULL,
                data TEXT NOT NULL,
                received_at TEXT,
                ingested_at TEXT NOT NULL,
                UNIQUE (store_id, event_id))""",
            "INSERT INTO events_by_store SELECT seq, event_id, type, ts, store_id, device_id,"
            " customer_id, source, schema, data, received_at, ingested_at FROM events",
            "DROP TABLE events",
            "ALTER TABLE events_by_store RENAME TO events",
            "CREATE INDEX events_customer ON events (customer_id, ts, seq)"
            " WHERE customer_id IS NOT NULL",
        ),
        postgres=(
            "ALTER TABLE events ADD CONSTRAINT events_store_event_key UNIQUE (store_id, event_id)",
            "ALTER TABLE events DROP CONSTRAINT IF EXISTS events_event_id_key",
        ),
    ),
    Migration(
        3,
        "identity_changes: every consent and link change with its origin",
        sqlite=(
            """CREATE TABLE identity_changes (
                id INTEGER PRIMARY KEY AUTOINCREMENT,
                kind TEXT NOT NULL CHECK (kind IN ('consent', 'link')),
                customer_id TEXT NOT NULL,
                alias TEXT,
                method TEXT,
                flags TEXT,
                event_id TEXT NOT NULL,
                store_id TEXT NOT NULL,
                credential_id INTEGER,
                event_ts TEXT NOT NULL,
                received_at TEXT NOT NULL,
                status TEXT NOT NULL,
                reason TEXT NOT NULL DEFAULT '',
                decided_at TEXT,
                decided_by TEXT,
                UNIQUE (store_id, event_id))""",
            "CREATE INDEX identity_changes_customer ON identity_changes (customer_id, kind)",
            "CREATE INDEX identity_changes_alias ON identity_changes (alias)"
            " WHERE alias IS NOT NULL",
            # What was stored before keeps counting, marked as recorded without an origin.
            "INSERT INTO identity_changes (kind, customer_id, flags, event_id, store_id,"
            " event_ts, received_at, status, reason) SELECT 'consent', customer_id, data,"
            " event_id, store_id, ts, ingested_at, 'applied', 'before_audit' FROM events"
            " WHERE type = 'consent.update' AND customer_id IS NOT NULL ORDER BY seq",
            "INSERT INTO identity_changes (kind, customer_id, alias, method, event_id,"
            " store_id, event_ts, received_at, status, reason) SELECT 'link', e.customer_id,"
            " json_extract(e.data, '$.alias'), json_extract(e.data, '$.method'), e.event_id,"
            " e.store_id, e.ts, e.ingested_at, 'applied', 'before_audit' FROM events e"
            " WHERE e.type = 'customer.identified' AND e.customer_id IS NOT NULL"
            " AND EXISTS (SELECT 1 FROM identity_links l WHERE l.a = e.customer_id"
            " AND l.b = json_extract(e.data, '$.alias')) ORDER BY e.seq",
        ),
        postgres=(
            """CREATE TABLE identity_changes (
                id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
                kind text NOT NULL CHECK (kind IN ('consent', 'link')),
                customer_id text NOT NULL,
                alias text,
                method text,
                flags text,
                event_id text NOT NULL,
                store_id text NOT NULL,
                credential_id bigint,
                event_ts timestamptz NOT NULL,
                received_at timestamptz NOT NULL,
                status text NOT NULL,
                reason text NOT NULL DEFAULT '',
                decided_at timestamptz,
                decided_by text,
                UNIQUE (store_id, event_id))""",
            "CREATE INDEX identity_changes_customer ON identity_changes (customer_id, kind)",
            "CREATE INDEX identity_changes_alias ON identity_changes (alias)"
            " WHERE alias IS NOT NULL",
            "INSERT INTO identity_changes (kind, customer_id, flags, event_id, store_id,"
            " event_ts, received_at, status, reason) SELECT 'consent', customer_id, data::text,"
            " event_id, store_id, ts, ingested_at, 'applied', 'before_audit' FROM events"
            " WHERE type = 'consent.update' AND customer_id IS NOT NULL ORDER BY seq",
            "INSERT INTO identity_changes (kind, customer_id, alias, method, event_id,"
            " store_id, event_ts, received_at, status, reason) SELECT 'link', e.customer_id,"
            " e.data->>'alias', e.data->>'method', e.event_id, e.store_id, e.ts, e.ingested_at,"
            " 'applied', 'before_audit' FROM events e WHERE e.type = 'customer.identified'"
            " AND e.customer_id IS NOT NULL AND EXISTS (SELECT 1 FROM identity_links l"
            " WHERE l.a = e.customer_id AND l.b = e.data->>'alias') ORDER BY e.seq",
        ),
    ),
    Migration(
        4,
        "channel credentials, staged model rollout with its log, indexes for feedback",
        sqlite=(
            # SQLite cannot alter a CHECK: the small credentials table is rebuilt, ids kept.
            """CREATE TABLE credentials_v4 (
                id INTEGER PRIMARY KEY AUTOINCREMENT,
                kind TEXT NOT NULL CHECK (kind IN ('agent', 'partner', 'admin', 'channel')),
                name TEXT NOT NULL,
                store_id TEXT,
                scopes TEXT NOT NULL DEFAULT '',
                token_hash TEXT NOT NULL UNIQUE,
                created_at TEXT NOT NULL,
                revoked_at TEXT)""",
            "INSERT INTO credentials_v4 SELECT id, kind, name, store_id, scopes, token_hash,"
            " created_at, revoked_at FROM credentials",
            "DROP TABLE credentials",
            "ALTER TABLE credentials_v4 RENAME TO credentials",
            """CREATE TABLE model_rollout (
                id INTEGER PRIMARY KEY CHECK (id = 1),
                current_version TEXT,
                canary_version TEXT,
                canary_percent INTEGER NOT NULL DEFAULT 0,
                canary_since TEXT,
                updated_at TEXT NOT NULL)""",
            # Whatever was served before keeps being served: the newest published version.
            "INSERT INTO model_rollout (id, current_version, updated_at)"
            " SELECT 1, version, published_at FROM models ORDER BY seq DESC LIMIT 1",
            """CREATE TABLE model_rollout_log (
                id INTEGER PRIMARY KEY AUTOINCREMENT,
                action TEXT NOT NULL,
                version TEXT NOT NULL,
                percent INTEGER,
                reason TEXT NOT NULL DEFAULT '',
                decided_by TEXT NOT NULL,
                at TEXT NOT NULL)""",
            # ... and counts as promoted, so that a rollback of the next one comes back to it.
            "INSERT INTO model_rollout_log (action, version, reason, decided_by, at)"
            " SELECT 'publish', version, 'before_rollout', 'migration', published_at FROM models"
            " ORDER BY seq DESC LIMIT 1",
            "CREATE INDEX events_shown_model ON events (json_extract(data, '$.model_version'), ts)"
            " WHERE type = 'suggestion.shown'",
            "CREATE INDEX events_accepted_suggestion ON events"
            " (store_id, json_extract(data, '$.suggestion_id'))"
            " WHERE type = 'suggestion.accepted'",
        ),
        postgres=(
            "ALTER TABLE credentials DROP CONSTRAINT IF EXISTS credentials_kind_check",
            "ALTER TABLE credentials ADD CONSTRAINT credentials_kind_check"
            " CHECK (kind IN ('agent', 'partner', 'admin', 'channel'))",
            """CREATE TABLE model_rollout (
                id integer PRIMARY KEY CHECK (id = 1),
                current_version text,
                canary_version text,
                canary_percent integer NOT NULL DEFAULT 0,
                canary_since timestamptz,
                updated_at timestamptz NOT NULL)""",
            "INSERT INTO model_rollout (id, current_version, updated_at)"
            " SELECT 1, version, published_at FROM models ORDER BY seq DESC LIMIT 1",
            """CREATE TABLE model_rollout_log (
                id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
                action text NOT NULL,
                version text NOT NULL,
                percent integer,
                reason text NOT NULL DEFAULT '',
                decided_by text NOT NULL,
                at timestamptz NOT NULL)""",
            "INSERT INTO model_rollout_log (action, version, reason, decided_by, at)"
            " SELECT 'publish', version, 'before_rollout', 'migration', published_at FROM models"
            " ORDER BY seq DESC LIMIT 1",
            "CREATE INDEX events_shown_model ON events ((data->>'model_version'), ts)"
            " WHERE type = 'suggestion.shown'",
            "CREATE INDEX events_accepted_suggestion ON events"
            " (store_id, (data->>'suggestion_id')) WHERE type = 'suggestion.accepted'",
        ),
    ),
    Migration(
        5,
        "agent_heartbeats: the latest heartbeat of each agent (the fleet view)",
        sqlite=(
            """CREATE TABLE agent_heartbeats (
                store_id TEXT PRIMARY KEY,
                credential_id INTEGER,
                received_at TEXT NOT NULL,
                clock_skew_s REAL,
                report TEXT NOT NULL)""",
        ),
        postgres=(
            """CREATE TABLE agent_heartbeats (
                store_id text PRIMARY KEY,
                credential_id bigint,
                received_at timestamptz NOT NULL,
                clock_skew_s double precision,
                report jsonb NOT NULL)""",
        ),
    ),
    Migration(
        6,
        "postgresql: events partitioned by ingest time, exactly-once kept by event_keys",
        # SQLite keeps its one events table (same behaviour); the version keeps the lockstep.
        sqlite=(),
        postgres=(
            "ALTER TABLE events RENAME TO events_v5",
            # seq, the feed's cursor, keeps its values; ingested_at (the store's clock, never
            # the device's) routes a row, so a late or replayed event lands in today's partition.
            """CREATE TABLE events (
                seq bigint GENERATED ALWAYS AS IDENTITY,
                event_id text NOT NULL,
                type text NOT NULL,
                ts timestamptz NOT NULL,
                store_id text NOT NULL,
                device_id text,
                customer_id text,
                source text NOT NULL,
                schema integer NOT NULL,
                data jsonb NOT NULL,
                received_at text,
                ingested_at timestamptz NOT NULL DEFAULT now()) PARTITION BY RANGE (ingested_at)""",
            # A unique key on events would have to include ingested_at; the idempotency key
            # (store_id, event_id) is claimed here first, in the ingest's transaction.
            """CREATE TABLE event_keys (
                store_id text NOT NULL,
                event_id text NOT NULL,
                PRIMARY KEY (store_id, event_id))""",
            # Everything stored before, up to the end of the migration's day (UTC), in one
            # partition; later ones follow (cloud_sync.store.partitions); strays: default.
            "DO $$ BEGIN EXECUTE format('CREATE TABLE events_legacy PARTITION OF events"
            " FOR VALUES FROM (MINVALUE) TO (%L)', date_trunc('day', now(), 'UTC')"
            " + interval '1 day'); END $$",
            "CREATE TABLE events_default PARTITION OF events DEFAULT",
            # Copied in bounded batches of seq, every row and its seq kept.
            """DO $$
            DECLARE lo bigint := 0; top bigint; batch constant bigint := 50000;
            BEGIN
                SELECT coalesce(max(seq), 0) INTO top FROM events_v5;
                WHILE lo < top LOOP
                    INSERT INTO events (seq, event_id, type, ts, store_id, device_id,
                        customer_id, source, schema, data, received_at, ingested_at)
                    OVERRIDING SYSTEM VALUE
                    SELECT seq, event_id, type, ts, store_id, device_id, customer_id, source,
                        schema, data, received_at, ingested_at
                    FROM events_v5 WHERE seq > lo AND seq <= lo + batch;
                    INSERT INTO event_keys (store_id, event_id)
                    SELECT store_id, event_id FROM events_v5 WHERE seq > lo AND seq <= lo + batch;
                    lo := lo + batch;
                END LOOP;
            END $$""",
            "SELECT setval(pg_get_serial_sequence('events', 'seq'), greatest(max(seq), 1),"
            " max(seq) IS NOT NULL) FROM events",
            "DROP TABLE events_v5",
            # Each index is made on every partition: reads by customer stay index lookups, one
            # per partition, whatever the table's size; events_seq serves the feed's cursor.
            "CREATE INDEX events_seq ON events (seq)",
            "CREATE INDEX events_customer ON events (customer_id, ts, seq)"
            " WHERE customer_id IS NOT NULL",
            "CREATE INDEX events_shown_model ON events ((data->>'model_version'), ts)"
            " WHERE type = 'suggestion.shown'",
            "CREATE INDEX events_accepted_suggestion ON events"
            " (store_id, (data->>'suggestion_id')) WHERE type = 'suggestion.accepted'",
        ),
    ),
)

SQLITE_LEDGER: Final = """CREATE TABLE IF NOT EXISTS schema_migrations (
    version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at TEXT NOT NULL)"""
POSTGRES_LEDGER: Final = """CREATE TABLE IF NOT EXISTS schema_migrations (
    version integer PRIMARY KEY, name text NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now())"""


def pending(applied: set[int]) -> list[Migration]:
    """Migrations not yet recorded, in version order."""
    return sorted((m for m in MIGRATIONS if m.version not in applied), key=lambda m: m.version)


def latest_version() -> int:
    return max(m.version for m in MIGRATIONS)
