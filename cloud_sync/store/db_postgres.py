"""The deployment backend: PostgreSQL through psycopg 3 and an async connection pool.

Nothing is cached in the process: idempotency is the ``(store_id, event_id)`` primary key of
``event_keys`` (``ON CONFLICT DO NOTHING``; ``events`` itself is partitioned by ingest time and
cannot hold that key), so any number of service instances can share one database.
A batch is COPied into a per-connection temporary staging table and moved with one
``INSERT ... SELECT ... ON CONFLICT DO NOTHING``, all in one transaction: COPY is the cheapest
way in, and the staging table empties itself at commit. Rows move in event_id order, so
concurrent batches lock keys in the same order and cannot deadlock.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from datetime import UTC, date, datetime, time, timedelta
from typing import Any, Final

import psycopg
from psycopg.types.json import Jsonb
from psycopg_pool import AsyncConnectionPool

from cloud_sync.store import acceptance, fleet_sql, migrations, partitions, sql_shared, trust
from cloud_sync.store.acceptance import Performance
from cloud_sync.store.errors import AuditError, BackendError
from cloud_sync.store.fleet import Heartbeat
from cloud_sync.store.records import (
    PSEUDONYM_REGEX,
    AggregateRow,
    ConsentChange,
    ConsentFacts,
    Credential,
    CustomerFacts,
    DeviceFacts,
    Erasure,
    EventRow,
    IdentityChange,
    IngestCounts,
    Interaction,
    Kind,
    ModelRecord,
    Principal,
    ProfileFacts,
    RolloutEntry,
    RolloutState,
    Stats,
    StoredEvent,
)
from cloud_sync.store.rollout import RolloutDecision

log = logging.getLogger(__name__)

STATEMENT_TIMEOUT_MS = 60_000
# Ingests hold this lock shared while they insert; the feed takes it exclusively for an
# instant to learn the highest seq that no ingest in progress can still fill in below
# (identity values are drawn before commit, so commits can land out of seq order).
FEED_LOCK: Final = 0x63_73_66_65_65_64  # "csfeed"
FEED_LOCK_TIMEOUT: Final = "5s"
# GET /v1/profiles in one statement. Each part reads events or identity_changes by
# customer_id, so events_customer (customer_id, ts, seq) and identity_changes_customer serve
# them; the interactions' ORDER BY ... LIMIT sorts one profile's rows, not the table.
PROFILE_FACTS: Final = """
WITH RECURSIVE ids(id) AS (
    SELECT CAST(%(customer_id)s AS text)
    UNION SELECT l.b FROM identity_links l JOIN ids ON l.a = ids.id
), walked AS (SELECT id FROM ids LIMIT %(max_ids)s),
clear AS (SELECT array_agg(id) AS ids FROM walked WHERE id !~ %(pseudonym)s),
picked AS (
    SELECT ts, type, CASE WHEN jsonb_typeof(data->'sku') = 'string' THEN data->>'sku' END
        AS sku, store_id, event_id, seq
    FROM events, clear WHERE customer_id = ANY(clear.ids) AND type = ANY(%(types)s)
    ORDER BY ts DESC, seq DESC LIMIT %(limit)s
)
SELECT
    (SELECT coalesce(json_agg(json_build_array(c.id, c.customer_id, c.flags, c.event_ts)
        ORDER BY c.id), '[]') FROM identity_changes c, clear
        WHERE c.customer_id = ANY(clear.ids) AND c.kind = 'consent' AND c.status = 'applied'),
    (SELECT coalesce(json_agg(DISTINCT e.customer_id), '[]') FROM events e, clear
        WHERE e.customer_id = ANY(clear.ids) AND e.type <> 'customer.identified'),
    (SELECT coalesce(json_agg(json_build_array(p.ts, p.type, p.sku, p.store_id, p.event_id)
        ORDER BY p.ts DESC, p.seq DESC), '[]') FROM picked p),
    (SELECT coalesce(json_object_agg(k.sku, k.n), '{}') FROM (
        SELECT e.data->>'sku' AS sku, count(*) AS n FROM events e, clear
        WHERE e.customer_id = ANY(clear.ids) AND e.type = ANY(%(types)s)
        AND jsonb_typeof(e.data->'sku') = 'string' GROUP BY 1) k)
"""
# A model version's suggestions and their acceptances (same store, same suggestion_id), in
# shown order; events_shown_model and events_accepted_suggestion (migration 4) serve it.
SHOWN_WITH_ACCEPTED: Final = (
    "SELECT s.seq, s.store_id, s.data->>'suggestion_id', s.data, a.seq, a.data->>'sku'"
    " FROM events s LEFT JOIN events a ON a.type = 'suggestion.accepted'"
    " AND a.store_id = s.store_id AND a.data->>'suggestion_id' = s.data->>'suggestion_id'"
    " WHERE s.type = 'suggestion.shown' AND s.data->>'model_version' = %s AND s.ts >= %s"
    " ORDER BY s.seq"
)
SHOWN_SLICE: Final = 2000
OPEN_TIMEOUT_S = 15.0
CONNECTION_WAIT_S = 30.0  # waiting for a free pooled connection; then a 503
COLUMNS = "event_id, type, ts, store_id, device_id, customer_id, source, schema, data, received_at"
# A session's temporary table: made once per pooled connection (see _configure).
CREATE_STAGING = (
    "CREATE TEMPORARY TABLE IF NOT EXISTS ingest_staging (event_id text, type text,"
    " ts timestamptz, store_id text, device_id text, customer_id text, source text,"
    " schema integer, data jsonb, received_at text) ON COMMIT DELETE ROWS"
)
COPY_STAGING = f"COPY ingest_staging ({COLUMNS}) FROM STDIN"
# events is partitioned by ingest time (migration 6), so it can hold no unique key on
# (store_id, event_id): the keys are claimed in event_keys first, in key order, and only the
# rows whose key was new move into events, in the same transaction.
MOVE_STAGED = (
    "WITH claimed AS (INSERT INTO event_keys (store_id, event_id)"
    " SELECT DISTINCT store_id, event_id FROM ingest_staging ORDER BY store_id, event_id"
    " ON CONFLICT (store_id, event_id) DO NOTHING RETURNING store_id, event_id)"
    f" INSERT INTO events ({COLUMNS}) SELECT DISTINCT ON (s.store_id, s.event_id)"
    f" {', '.join('s.' + c for c in COLUMNS.split(', '))}"
    " FROM ingest_staging s JOIN claimed c USING (store_id, event_id)"
    " ORDER BY s.store_id, s.event_id"
)
# Partitions are made a week ahead at start and again once a day by the first ingest.
PARTITION_CHECK: Final = timedelta(days=1)
PARTITION_RETRY: Final = timedelta(minutes=10)


def event_records(rows: Sequence[EventRow]) -> list[tuple[Any, ...]]:
    """The batch as COPY records, in ``COLUMNS`` order."""
    return [
        (
            r.event_id,
            r.type,
            r.ts,
            r.store_id,
            r.device_id,
            r.customer_id,
            r.source,
            r.schema,
            r.data_json,
            r.received_at,
        )
        for r in rows
    ]


class PostgresBackend:
    """``Backend`` on PostgreSQL; see ``cloud_sync.store.backend.Backend``."""

    def __init__(self, pool: AsyncConnectionPool) -> None:
        self._pool = pool
        self._partitions_due = datetime.min.replace(tzinfo=UTC)

    @classmethod
    async def open(cls, url: str, *, pool_size: int = 10) -> PostgresBackend:
        pool = AsyncConnectionPool(
            url,
            min_size=1,
            max_size=max(1, pool_size),
            open=False,
            name="customer-store",
            configure=_configure,
            timeout=CONNECTION_WAIT_S,
        )
        try:
            await pool.open(wait=True, timeout=OPEN_TIMEOUT_S)
            async with pool.connection() as conn:
                await _migrate(conn)
            backend = cls(pool)
            await backend.ensure_partitions(datetime.now(UTC))
        except psycopg.Error as exc:  # PoolTimeout is an OperationalError too
            await pool.close()
            raise BackendError("open", f"postgresql: {exc}") from exc
        log.info("store.postgres.open pool_max=%d", pool_size)
        return backend

    async def ensure_partitions(self, now: datetime) -> list[str]:
        """Make the partitions of ``events`` ahead (``partitions.create_ahead``), waiting for
        another instance's maintenance. Raises ``psycopg.Error``."""
        async with self._pool.connection() as conn:
            made = await partitions.create_ahead(conn, now, partitions.DEFAULT_DAYS_AHEAD)
        self._partitions_due = now + PARTITION_CHECK
        return made or []

    async def _ensure_partitions_quietly(self, now: datetime) -> None:
        """From an ingest, at most once a day: it never waits for maintenance under way
        elsewhere and never fails the batch (a row without its partition lands in
        events_default and moves later); a miss is logged and retried a while later."""
        self._partitions_due = now + PARTITION_RETRY
        try:
            async with self._pool.connection() as conn:
                made = await partitions.create_ahead(
                    conn, now, partitions.DEFAULT_DAYS_AHEAD, wait=False
                )
        except psycopg.Error as exc:
            log.warning("store.partitions.create_failed error=%s", exc)
            return
        if made is not None:
            self._partitions_due = now + PARTITION_CHECK

    async def _fetch(
        self, operation: str, sql: str, params: Sequence[Any] | Mapping[str, Any] = ()
    ) -> list[Any]:
        try:
            async with self._pool.connection() as conn:
                cur = await conn.execute(sql, params)
                return await cur.fetchall()
        except psycopg.Error as exc:
            raise BackendError(operation, str(exc)) from exc

    async def partition_list(self) -> list[partitions.Partition]:
        try:
            async with self._pool.connection() as conn:
                return await partitions.list_partitions(conn)
        except psycopg.Error as exc:
            raise BackendError("partitions", str(exc)) from exc

    async def partitions_create_ahead(self, now: datetime, days: int) -> list[str]:
        try:
            async with self._pool.connection() as conn:
                return await partitions.create_ahead(conn, now, days) or []
        except psycopg.Error as exc:
            raise BackendError("partitions", str(exc)) from exc

    async def partitions_drop_older(self, now: datetime, days: int) -> tuple[list[str], int]:
        try:
            async with self._pool.connection() as conn:
                return await partitions.drop_older(conn, now, days)
        except psycopg.Error as exc:
            raise BackendError("partitions", str(exc)) from exc

    async def ping(self) -> None:
        await self._fetch("ping", "SELECT 1")

    async def ingest(
        self, rows: Sequence[EventRow], now: datetime, credential_id: int | None = None
    ) -> IngestCounts:
        customers = sorted({r.customer_id for r in rows if r.customer_id is not None})
        try:
            wall = datetime.now(UTC)  # ingested_at is the database's clock, not the caller's
            if wall >= self._partitions_due:
                await self._ensure_partitions_quietly(wall)
            async with self._pool.connection() as conn, conn.transaction():
                await conn.execute("SELECT pg_advisory_xact_lock_shared(%s)", (FEED_LOCK,))
                erased_at: dict[str, datetime] = {}
                if customers:
                    cur = await conn.execute(
                        "SELECT customer_id, max(requested_at) FROM erasures"
                        " WHERE customer_id = ANY(%s) GROUP BY customer_id",
                        (customers,),
                    )
                    erased_at = {str(c): at for c, at in await cur.fetchall()}
                keep = sql_shared.without_erased(rows, erased_at)
                async with conn.cursor() as cur:
                    async with cur.copy(COPY_STAGING) as copy:
                        for record in event_records(keep):
                            await copy.write_row(record)
                    await cur.execute(MOVE_STAGED)
                    accepted = cur.rowcount
                    consents = [
                        (
                            r.customer_id,
                            r.data_json,
                            r.event_id,
                            r.store_id,
                            credential_id,
                            r.ts,
                            now,
                        )
                        for r in sql_shared.consents(keep)
                    ]
                    if consents:
                        await cur.executemany(sql_shared.INSERT_CONSENT_CHANGE, consents)
                for row in sql_shared.links(keep):
                    await _link(conn, row, credential_id, now)
        except psycopg.Error as exc:
            raise BackendError("ingest", str(exc)) from exc
        return IngestCounts(accepted, len(keep) - accepted, len(rows) - len(keep))

    async def find_principal(self, token_hash: str) -> Principal | None:
        rows = await self._fetch(
            "auth",
            "SELECT id, kind, name, store_id, scopes FROM credentials"
            " WHERE token_hash = %s AND (revoked_at IS NULL OR revoked_at > now())",
            (token_hash,),
        )
        return sql_shared.principal(rows[0]) if rows else None

    async def add_credential(
        self, kind: Kind, name: str, store_id: str | None, scopes: Sequence[str], token_hash: str
    ) -> int:
        rows = await self._fetch(
            "add_credential",
            "INSERT INTO credentials (kind, name, store_id, scopes, token_hash)"
            " VALUES (%s, %s, %s, %s, %s) RETURNING id",
            (kind, name, store_id, " ".join(sorted(scopes)), token_hash),
        )
        return int(rows[0][0])

    async def identities(self, customer_id: str) -> list[str]:
        rows = await self._fetch(
            "identities", sql_shared.IDENTITIES, (customer_id, sql_shared.MAX_IDENTITIES)
        )
        return sorted(str(r[0]) for r in rows)

    async def customer_facts(self, ids: Sequence[str], recent: int) -> CustomerFacts | None:
        where = "customer_id = ANY(%s)"
        id_list = list(ids)
        queries: list[tuple[str, tuple[Any, ...]]] = [
            (
                f"SELECT type, count(*), min(ts), max(ts) FROM events WHERE {where} GROUP BY type",
                (id_list,),
            ),
            (
                "SELECT split_part(source, ':', 1) AS channel, store_id, device_id, count(*)"
                f" FROM events WHERE {where} GROUP BY 1, 2, 3 ORDER BY 1, 2, 3",
                (id_list,),
            ),
            (
                f"SELECT data->>'sku', ts FROM events WHERE {where}"
                " AND jsonb_typeof(data->'sku') = 'string' ORDER BY ts DESC, seq DESC LIMIT %s",
                (id_list, recent),
            ),
            (
                "SELECT id, customer_id, flags, event_ts FROM identity_changes"
                f" WHERE {where} AND kind = 'consent' AND status = 'applied' ORDER BY id",
                (id_list,),
            ),
            (
                f"SELECT DISTINCT customer_id FROM events WHERE {where}"
                " AND type <> 'customer.identified'",
                (id_list,),
            ),
        ]
        results: list[list[Any]] = []
        try:
            # One snapshot for the five reads, so the parts of a profile agree with each other.
            async with self._pool.connection() as conn, conn.transaction():
                await conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
                for query, params in queries:
                    cur = await conn.execute(query, params)
                    results.append(await cur.fetchall())
        except psycopg.Error as exc:
            raise BackendError("customer_facts", str(exc)) from exc
        by_type, devices, skus, consents, history = results
        if not by_type:
            return None
        return CustomerFacts(
            ids=tuple(ids),
            counts={str(r[0]): int(r[1]) for r in by_type},
            first_seen=min(r[2] for r in by_type),
            last_seen=max(r[3] for r in by_type),
            stores=tuple(sorted({str(r[1]) for r in devices})),
            devices=tuple(DeviceFacts(r[0], r[1], r[2], int(r[3])) for r in devices),
            recent_skus=tuple((str(r[0]), r[1]) for r in skus),
            consent_changes=tuple(
                ConsentChange(int(r[0]), str(r[1]), json.loads(r[2]), r[3]) for r in consents
            ),
            history_ids=tuple(sorted(str(r[0]) for r in history)),
        )

    async def customer_events(
        self, ids: Sequence[str], after: tuple[datetime, int] | None, limit: int
    ) -> list[StoredEvent]:
        params: list[Any] = [list(ids)]
        where = ""
        if after is not None:
            where = " AND (ts, seq) > (%s, %s)"
            params += [after[0], after[1]]
        rows = await self._fetch(
            "customer_events",
            f"SELECT seq, {sql_shared.ENVELOPE_COLUMNS} FROM events"
            f" WHERE customer_id = ANY(%s){where} ORDER BY ts, seq LIMIT %s",
            [*params, limit],
        )
        return [sql_shared.stored_event(r[0], r[3], r[1:], r[9]) for r in rows]

    async def erase(self, ids: Sequence[str], requested_by: str, now: datetime) -> int:
        id_list = sorted(ids)
        try:
            async with self._pool.connection() as conn, conn.transaction():
                cur = await conn.execute(
                    "DELETE FROM events WHERE customer_id = ANY(%s)", (id_list,)
                )
                deleted = cur.rowcount
                await conn.execute(
                    "DELETE FROM identity_links WHERE a = ANY(%s) OR b = ANY(%s)",
                    (id_list, id_list),
                )
                await conn.execute(
                    "DELETE FROM identity_changes WHERE customer_id = ANY(%s) OR alias = ANY(%s)",
                    (id_list, id_list),
                )
                await conn.execute(
                    "INSERT INTO erasures (customer_id, requested_at, requested_by)"
                    " SELECT unnest(%s::text[]), %s, %s",
                    (id_list, now, requested_by),
                )
        except psycopg.Error as exc:
            raise BackendError("erase", str(exc)) from exc
        return deleted

    async def audit(self, customer_id: str | None, limit: int) -> list[IdentityChange]:
        where = " WHERE customer_id = %s OR alias = %s" if customer_id is not None else ""
        params: list[Any] = [customer_id, customer_id] if customer_id is not None else []
        rows = await self._fetch(
            "audit",
            f"SELECT {sql_shared.CHANGE_COLUMNS} FROM identity_changes{where} ORDER BY id LIMIT %s",
            [*params, limit],
        )
        return [sql_shared.identity_change(r, _same) for r in rows]

    async def decide_change(
        self, change_id: int, action: str, decided_by: str, now: datetime
    ) -> IdentityChange:
        select = f"SELECT {sql_shared.CHANGE_COLUMNS} FROM identity_changes WHERE id = %s"
        try:
            async with self._pool.connection() as conn, conn.transaction():
                cur = await conn.execute(select + " FOR UPDATE", (change_id,))
                row = await cur.fetchone()
                if row is None:
                    raise AuditError(f"no identity change {change_id}")
                change = sql_shared.identity_change(row, _same)
                status, edge = trust.transition(change.kind, change.status, action)
                pair = (change.customer_id, change.alias, change.alias, change.customer_id)
                await conn.execute(
                    sql_shared.SET_CHANGE_STATUS, (status, action, now, decided_by, change_id)
                )
                # After the status: the removal looks for other applied changes of the pair.
                if edge == "add":
                    await conn.execute(sql_shared.ADD_LINK, pair)
                elif edge == "remove":
                    await conn.execute(sql_shared.REMOVE_LINK, pair)
                cur = await conn.execute(select, (change_id,))
                row = await cur.fetchone()
                if row is None:  # held by FOR UPDATE: it cannot vanish meanwhile
                    raise AuditError(f"identity change {change_id} vanished")
        except psycopg.Error as exc:
            raise BackendError("decide_change", str(exc)) from exc
        return sql_shared.identity_change(row, _same)

    async def erasures(
        self, after: int, limit: int, *, agent_reports: bool = True
    ) -> list[Erasure]:
        skip = "" if agent_reports else sql_shared.WITHOUT_AGENT_REPORTS
        params = (after,) if agent_reports else (after, sql_shared.AGENT_REPORT_PATTERN)
        rows = await self._fetch(
            "erasures",
            f"SELECT seq, customer_id, requested_at FROM erasures"
            f" WHERE seq > %s{skip} ORDER BY seq LIMIT %s",
            (*params, limit),
        )
        return [Erasure(int(r[0]), str(r[1]), r[2]) for r in rows]

    async def erasure_exists(self, seq: int) -> bool:
        return bool(await self._fetch("erasure_exists", _ERASURE_EXISTS, (seq,)))

    async def erase_pseudonyms(
        self, store_id: str, pseudonyms: Sequence[str], requested_by: str, now: datetime
    ) -> int:
        names = sorted(pseudonyms)
        try:
            async with self._pool.connection() as conn, conn.transaction():
                cur = await conn.execute(
                    "DELETE FROM events WHERE store_id = %s AND customer_id = ANY(%s)",
                    (store_id, names),
                )
                deleted = cur.rowcount
                await conn.execute(
                    "DELETE FROM identity_links WHERE a = ANY(%s) OR b = ANY(%s)", (names, names)
                )
                await conn.execute(
                    "INSERT INTO erasures (customer_id, requested_at, requested_by)"
                    " SELECT unnest(%s::text[]), %s, %s",
                    (names, now, requested_by),
                )
        except psycopg.Error as exc:
            raise BackendError("erase_pseudonyms", str(exc)) from exc
        return deleted

    async def pseudonymise(self, store_id: str, pairs: Sequence[tuple[str, str]]) -> int:
        affected = sorted({i for pair in pairs for i in pair})
        rewritten = 0
        try:
            async with self._pool.connection() as conn, conn.transaction():
                for clear, pseudonym in sorted(pairs):
                    cur = await conn.execute(
                        "UPDATE events SET customer_id = %s"
                        " WHERE store_id = %s AND customer_id = %s",
                        (pseudonym, store_id, clear),
                    )
                    rewritten += cur.rowcount
                    await conn.execute(
                        "UPDATE events SET data = jsonb_set(data, '{alias}', to_jsonb(%s::text))"
                        " WHERE store_id = %s AND type = 'customer.identified'"
                        " AND data->>'alias' = %s",
                        (pseudonym, store_id, clear),
                    )
                await conn.execute(
                    "DELETE FROM identity_links WHERE a = ANY(%s) OR b = ANY(%s)",
                    (affected, affected),
                )
                cur = await conn.execute(
                    "SELECT customer_id, data->>'alias' FROM events"
                    " WHERE type = 'customer.identified'"
                    " AND (customer_id = ANY(%s) OR data->>'alias' = ANY(%s))",
                    (affected, affected),
                )
                links = sql_shared.pairs_both_ways(await cur.fetchall())
                if links:
                    await conn.cursor().executemany(
                        "INSERT INTO identity_links (a, b) VALUES (%s, %s) ON CONFLICT DO NOTHING",
                        links,
                    )
        except psycopg.Error as exc:
            raise BackendError("pseudonymise", str(exc)) from exc
        return rewritten

    async def credentials(self, kind: Kind) -> list[Credential]:
        rows = await self._fetch(
            "credentials",
            f"SELECT {sql_shared.CREDENTIAL_COLUMNS} FROM credentials WHERE kind = %s ORDER BY id",
            (kind,),
        )
        return [sql_shared.credential(r, r[5], r[6]) for r in rows]

    async def agent_keys(self) -> list[tuple[str, str]]:
        rows = await self._fetch(
            "agent_keys",
            "SELECT store_id, token_hash FROM credentials WHERE kind = 'agent'"
            " AND store_id IS NOT NULL AND (revoked_at IS NULL OR revoked_at > now())"
            " ORDER BY id",
        )
        return [(str(r[0]), str(r[1])) for r in rows]

    async def credential(self, kind: Kind, credential_id: int) -> Credential | None:
        rows = await self._fetch(
            "credential",
            f"SELECT {sql_shared.CREDENTIAL_COLUMNS} FROM credentials WHERE kind = %s AND id = %s",
            (kind, credential_id),
        )
        return sql_shared.credential(rows[0], rows[0][5], rows[0][6]) if rows else None

    async def revoke_credential(self, kind: Kind, credential_id: int, at: datetime) -> bool:
        rows = await self._fetch(
            "revoke_credential",
            "UPDATE credentials SET revoked_at = %s WHERE kind = %s AND id = %s"
            " AND (revoked_at IS NULL OR revoked_at > %s) RETURNING id",
            (at, kind, credential_id, at),
        )
        return bool(rows)

    async def publish_model(self, record: ModelRecord, artifact: bytes, now: datetime) -> bool:
        try:
            async with self._pool.connection() as conn, conn.transaction():
                cur = await conn.execute(
                    "INSERT INTO models (version, sha256, size, manifest, artifact, published_at)"
                    " VALUES (%s, %s, %s, %s, %s, %s) ON CONFLICT (version) DO NOTHING",
                    (
                        record.version,
                        record.sha256,
                        record.size,
                        Jsonb(record.manifest),
                        artifact,
                        now,
                    ),
                )
                if cur.rowcount == 1:
                    return True
                cur = await conn.execute(
                    "SELECT sha256 FROM models WHERE version = %s", (record.version,)
                )
                existing = await cur.fetchone()
        except psycopg.Error as exc:
            raise BackendError("publish_model", str(exc)) from exc
        return sql_shared.check_republish(record, str(existing[0]) if existing else "")

    async def latest_model(self) -> ModelRecord | None:
        rows = await self._fetch(
            "latest_model",
            "SELECT version, sha256, size, manifest, published_at FROM models"
            " ORDER BY seq DESC LIMIT 1",
        )
        return _model(rows[0]) if rows else None

    async def model(self, version: str) -> tuple[ModelRecord, bytes] | None:
        rows = await self._fetch(
            "model",
            "SELECT version, sha256, size, manifest, published_at, artifact FROM models"
            " WHERE version = %s",
            (version,),
        )
        return (_model(rows[0]), bytes(rows[0][5])) if rows else None

    async def aggregates(
        self, since: date | None, until: date | None, store_id: str | None
    ) -> list[AggregateRow]:
        where: list[str] = []
        params: list[Any] = []
        if since is not None:
            where.append("ts >= %s")
            params.append(datetime.combine(since, time(), UTC))
        if until is not None:
            where.append("ts < %s")
            params.append(
                datetime.combine(date.fromisoformat(sql_shared.day_after(until)), time(), UTC)
            )
        if store_id is not None:
            where.append("store_id = %s")
            params.append(store_id)
        clause = f" WHERE {' AND '.join(where)}" if where else ""
        rows = await self._fetch(
            "aggregates",
            "SELECT (ts AT TIME ZONE 'UTC')::date AS day, store_id, type, count(*) FROM events"
            f"{clause} GROUP BY 1, 2, 3 ORDER BY 1, 2, 3",
            params,
        )
        return [AggregateRow(r[0], r[1], r[2], int(r[3])) for r in rows]

    async def stats(self) -> Stats:
        counts: dict[str, int] = {}
        for name, sql in sql_shared.STATS_QUERIES.items():
            rows = await self._fetch("stats", sql)
            counts[name] = int(rows[0][0])
        kinds = await self._fetch("stats", sql_shared.CREDENTIAL_COUNTS)
        return sql_shared.collect_stats(counts, kinds)

    # ---- the fleet view ------------------------------------------------------------

    async def record_heartbeat(self, heartbeat: Heartbeat) -> None:
        params = fleet_sql.heartbeat_params(heartbeat, heartbeat.received_at)
        try:
            async with self._pool.connection() as conn:
                await conn.execute(fleet_sql.UPSERT_HEARTBEAT, params)
        except psycopg.Error as exc:
            raise BackendError("record_heartbeat", str(exc)) from exc

    async def heartbeats(self) -> list[Heartbeat]:
        rows = await self._fetch("heartbeats", fleet_sql.SELECT_HEARTBEATS)
        return [fleet_sql.heartbeat(r, r[2], dict(r[4])) for r in rows]

    async def consent_facts(self, ids: Sequence[str]) -> ConsentFacts:
        try:
            async with self._pool.connection() as conn, conn.transaction():
                return await _consent_facts(conn, ids)
        except psycopg.Error as exc:
            raise BackendError("consent_facts", str(exc)) from exc

    async def profile_facts(
        self, customer_id: str, types: Sequence[str], limit: int
    ) -> ProfileFacts:
        # One statement, one round trip, one snapshot: the walk, consent and history, the
        # newest interactions and the counts per sku.
        rows = await self._fetch(
            "profile_facts",
            PROFILE_FACTS,
            {
                "customer_id": customer_id,
                "max_ids": sql_shared.MAX_IDENTITIES,
                "pseudonym": PSEUDONYM_REGEX,
                "types": list(types),
                "limit": limit,
            },
        )
        consents, history, interactions, by_sku = rows[0]
        return ProfileFacts(
            consent=ConsentFacts(
                consent_changes=tuple(
                    ConsentChange(int(c[0]), str(c[1]), json.loads(c[2]), _json_ts(c[3]))
                    for c in consents
                ),
                history_ids=tuple(sorted(str(h) for h in history)),
            ),
            interactions=tuple(
                Interaction(_json_ts(i[0]), i[1], i[2], i[3], i[4]) for i in interactions
            ),
            by_sku={str(k): int(v) for k, v in by_sku.items()},
        )

    async def feed_high_water(self) -> int:
        try:
            async with self._pool.connection() as conn, conn.transaction():
                await conn.execute(f"SET LOCAL lock_timeout = '{FEED_LOCK_TIMEOUT}'")
                await conn.execute("SELECT pg_advisory_xact_lock(%s)", (FEED_LOCK,))
                cur = await conn.execute("SELECT coalesce(max(seq), 0) FROM events")
                row = await cur.fetchone()
        except psycopg.Error as exc:
            raise BackendError("feed_high_water", str(exc)) from exc
        return int(row[0]) if row else 0

    async def events_after(
        self, after: int, upto: int | None, limit: int, since: datetime | None = None
    ) -> list[StoredEvent]:
        where = ["seq > %s", "customer_id IS NOT NULL"]
        params: list[Any] = [after]
        if upto is not None:
            where.append("seq <= %s")
            params.append(upto)
        if since is not None:
            where.append("(ts >= %s OR type = 'consent.update')")
            params.append(since)
        rows = await self._fetch(
            "events_after",
            f"SELECT seq, {sql_shared.ENVELOPE_COLUMNS} FROM events WHERE {' AND '.join(where)}"
            " ORDER BY seq LIMIT %s",
            [*params, limit],
        )
        return [sql_shared.stored_event(r[0], r[3], r[1:], r[9]) for r in rows]

    async def model_record(self, version: str) -> ModelRecord | None:
        rows = await self._fetch("model_record", sql_shared.MODEL_RECORD, (version,))
        return _model(rows[0]) if rows else None

    async def rollout(self) -> RolloutState:
        rows = await self._fetch("rollout", sql_shared.ROLLOUT_STATE)
        return _rollout_state(rows[0] if rows else None)

    async def rollout_log(self, limit: int) -> list[RolloutEntry]:
        rows = await self._fetch("rollout_log", sql_shared.ROLLOUT_LOG, (limit,))
        return [RolloutEntry(int(r[0]), r[1], r[2], r[3], r[4], r[5], r[6]) for r in rows]

    async def update_rollout(
        self, decide: RolloutDecision, decided_by: str, now: datetime
    ) -> RolloutEntry:
        try:
            async with self._pool.connection() as conn, conn.transaction():
                # Serialises rollout changes (a promote racing the automatic check).
                await conn.execute("LOCK TABLE model_rollout IN EXCLUSIVE MODE")
                cur = await conn.execute(sql_shared.ROLLOUT_STATE)
                state = _rollout_state(await cur.fetchone())
                cur = await conn.execute(
                    "SELECT id, action, version, percent, reason, decided_by, at"
                    " FROM model_rollout_log ORDER BY id"
                )
                log_rows = [
                    RolloutEntry(int(r[0]), r[1], r[2], r[3], r[4], r[5], r[6])
                    for r in await cur.fetchall()
                ]
                change = decide(state, log_rows)
                new = change.state
                await conn.execute(
                    sql_shared.UPSERT_ROLLOUT,
                    (
                        new.current_version,
                        new.canary_version,
                        new.canary_percent,
                        new.canary_since,
                        now,
                    ),
                )
                cur = await conn.execute(
                    sql_shared.INSERT_ROLLOUT_LOG + " RETURNING id",
                    (change.action, change.version, change.percent, change.reason, decided_by, now),
                )
                row = await cur.fetchone()
        except psycopg.Error as exc:
            raise BackendError("update_rollout", str(exc)) from exc
        entry_id = int(row[0]) if row else 0
        return RolloutEntry(
            entry_id, change.action, change.version, change.percent, change.reason, decided_by, now
        )

    async def shown_performance(self, version: str, since: datetime | None) -> Performance:
        lo = since or datetime(1970, 1, 1, tzinfo=UTC)
        tally = acceptance.Tally(version)
        try:
            # A server-side cursor: the rows arrive in slices, one suggestion tallied at a time.
            async with (
                self._pool.connection() as conn,
                conn.transaction(),
                conn.cursor(name="shown_performance") as cur,
            ):
                await cur.execute(SHOWN_WITH_ACCEPTED, (version, lo))
                grouper = sql_shared.ShownGrouper()
                while rows := await cur.fetchmany(SHOWN_SLICE):
                    for row in rows:
                        done = grouper.feed(row)
                        if done is not None:
                            tally.add(done)
                last = grouper.finish()
                if last is not None:
                    tally.add(last)
        except psycopg.Error as exc:
            raise BackendError("shown_performance", str(exc)) from exc
        return tally.result()

    async def close(self) -> None:
        await self._pool.close()
        log.info("store.postgres.closed")


_ERASURE_EXISTS: Final = "SELECT 1 FROM erasures WHERE seq = %s"


async def _configure(conn: psycopg.AsyncConnection[Any]) -> None:
    """Each new pooled connection gets its own staging table (temporary tables are per session)
    and a statement timeout, so a stuck database turns into a 503 rather than a hung request."""
    await conn.execute(f"SET statement_timeout = {STATEMENT_TIMEOUT_MS}")
    await conn.execute(CREATE_STAGING)
    await conn.commit()


async def _migrate(conn: psycopg.AsyncConnection[Any]) -> None:
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock(%s)", (migrations.PG_MIGRATION_LOCK,))
        await conn.execute(migrations.POSTGRES_LEDGER)
        cur = await conn.execute("SELECT version FROM schema_migrations")
        applied = {int(r[0]) for r in await cur.fetchall()}
        for migration in migrations.pending(applied):
            for statement in migration.postgres:
                await conn.execute(statement)
            await conn.execute(
                "INSERT INTO schema_migrations (version, name) VALUES (%s, %s)",
                (migration.version, migration.name),
            )
            log.info("store.migration.applied backend=postgres version=%d", migration.version)


async def _link(
    conn: psycopg.AsyncConnection[Any], row: EventRow, credential_id: int | None, now: datetime
) -> None:
    """Record one claimed link and apply it when the trust model allows (``trust``)."""
    a, b = str(row.customer_id), str(row.alias)
    ids_a = await _walk(conn, a)
    same = b in ids_a
    held_ids: list[int] = []
    if not same:
        cur = await conn.execute(sql_shared.HELD_SAME_LINK, (row.store_id, a, b, b, a))
        held_ids = [int(h[0]) for h in await cur.fetchall()]
    facts = trust.LinkFacts(
        method=row.method,
        store_id=row.store_id,
        same_profile=same,
        stores_a=() if same else await _history_stores(conn, ids_a),
        stores_b=() if same else await _history_stores(conn, await _walk(conn, b)),
        corroborated=bool(held_ids),
    )
    status, reason = trust.decide_link(facts, trust.DEFAULT_LINK_METHODS)
    cur = await conn.execute(
        sql_shared.INSERT_LINK_CHANGE,
        (a, b, row.method, row.event_id, row.store_id, credential_id, row.ts, now, status, reason),
    )
    if cur.rowcount != 1 or status != trust.APPLIED or same:
        return  # a resent event, a link not (yet) believed, or nothing to change
    await conn.execute(sql_shared.ADD_LINK, (a, b, b, a))
    for held_id in held_ids:
        await conn.execute(
            sql_shared.SET_CHANGE_STATUS,
            (trust.APPLIED, "corroborated", now, f"store:{row.store_id}", held_id),
        )


async def _walk(conn: psycopg.AsyncConnection[Any], customer_id: str) -> list[str]:
    cur = await conn.execute(sql_shared.IDENTITIES, (customer_id, sql_shared.MAX_IDENTITIES))
    return [str(r[0]) for r in await cur.fetchall()]


async def _history_stores(conn: psycopg.AsyncConnection[Any], ids: Sequence[str]) -> set[str]:
    cur = await conn.execute(
        "SELECT DISTINCT store_id FROM events WHERE customer_id = ANY(%s)"
        " AND type <> 'customer.identified'",
        (list(ids),),
    )
    return {str(r[0]) for r in await cur.fetchall()}


async def _consent_facts(conn: psycopg.AsyncConnection[Any], ids: Sequence[str]) -> ConsentFacts:
    id_list = list(ids)
    cur = await conn.execute(
        "SELECT id, customer_id, flags, event_ts FROM identity_changes"
        " WHERE customer_id = ANY(%s) AND kind = 'consent' AND status = 'applied' ORDER BY id",
        (id_list,),
    )
    consents = await cur.fetchall()
    cur = await conn.execute(
        "SELECT DISTINCT customer_id FROM events WHERE customer_id = ANY(%s)"
        " AND type <> 'customer.identified'",
        (id_list,),
    )
    history = await cur.fetchall()
    return ConsentFacts(
        consent_changes=tuple(
            ConsentChange(int(r[0]), str(r[1]), json.loads(r[2]), r[3]) for r in consents
        ),
        history_ids=tuple(sorted(str(r[0]) for r in history)),
    )


def _rollout_state(row: Sequence[Any] | None) -> RolloutState:
    if row is None:
        return RolloutState(None, None, 0, None)
    return RolloutState(row[0], row[1], int(row[2]), row[3])


def _json_ts(text: str) -> datetime:
    """A timestamptz as json_build_array writes it (ISO 8601 with an offset)."""
    return datetime.fromisoformat(text)


def _same(value: datetime) -> datetime:
    return value  # psycopg already returns timestamptz as an aware datetime


def _model(row: Sequence[Any]) -> ModelRecord:
    return ModelRecord(
        version=str(row[0]),
        sha256=str(row[1]),
        size=int(row[2]),
        manifest=dict(row[3]),
        published_at=row[4],
    )
