"""The embedded backend: one SQLite file in WAL mode, owned by one thread.

sqlite3 blocks, so every call runs on a single-thread executor that owns the connection; the
event loop only awaits. Writes take ``BEGIN IMMEDIATE`` so a batch is one transaction that
either commits whole or rolls back whole, also on cancellation.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sqlite3
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from datetime import UTC, date, datetime
from functools import partial
from pathlib import Path
from typing import Any, TypeVar, cast

from cloud_sync.store import acceptance, fleet_sql, migrations, sql_shared, trust
from cloud_sync.store.acceptance import Performance
from cloud_sync.store.errors import AuditError, BackendError
from cloud_sync.store.fleet import Heartbeat
from cloud_sync.store.records import (
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
    is_pseudonym,
    parse_ts,
    sortable_ts,
)
from cloud_sync.store.rollout import RolloutDecision

log = logging.getLogger(__name__)
T = TypeVar("T")
# A model version's suggestions and their acceptances (same store, same suggestion_id), in
# shown order; events_shown_model and events_accepted_suggestion (migration 4) serve it.
_SUGGESTION = "json_extract({0}.data, '$.suggestion_id')"
SHOWN_WITH_ACCEPTED = (
    f"SELECT s.seq, s.store_id, {_SUGGESTION.format('s')}, s.data, a.seq,"
    " json_extract(a.data, '$.sku') FROM events s LEFT JOIN events a"
    " ON a.type = 'suggestion.accepted' AND a.store_id = s.store_id"
    f" AND {_SUGGESTION.format('a')} = {_SUGGESTION.format('s')}"
    " WHERE s.type = 'suggestion.shown' AND json_extract(s.data, '$.model_version') = ?"
    " AND s.ts >= ? ORDER BY s.seq"
)


def _ts(text: str) -> datetime:
    moment = parse_ts(text)
    if moment is None:  # only our own sortable_ts() text is stored
        raise BackendError("read", f"corrupt timestamp {text!r}")
    return moment


@contextmanager
def _atomic(conn: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield conn
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


class SqliteBackend:
    """``Backend`` on a SQLite file; see ``cloud_sync.store.backend.Backend``."""

    def __init__(self, path: str, executor: ThreadPoolExecutor, conn: sqlite3.Connection) -> None:
        self._path = path
        self._executor = executor
        self._conn = conn

    @classmethod
    async def open(cls, path: str) -> SqliteBackend:
        executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="store-sqlite")
        loop = asyncio.get_running_loop()
        try:
            conn = await loop.run_in_executor(executor, _connect, path)
        except sqlite3.Error as exc:
            executor.shutdown(wait=False)
            raise BackendError("open", f"{path}: {exc}") from exc
        log.info("store.sqlite.open path=%s", path)
        return cls(path, executor, conn)

    async def _run(self, operation: str, fn: Callable[[sqlite3.Connection], T]) -> T:
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._executor, fn, self._conn)
        except sqlite3.Error as exc:
            raise BackendError(operation, str(exc)) from exc

    async def ping(self) -> None:
        await self._run("ping", lambda c: c.execute("SELECT 1").fetchone())

    async def ingest(
        self, rows: Sequence[EventRow], now: datetime, credential_id: int | None = None
    ) -> IngestCounts:
        return await self._run(
            "ingest", partial(_ingest, rows=rows, now=now, credential_id=credential_id)
        )

    async def find_principal(self, token_hash: str) -> Principal | None:
        row = await self._run(
            "auth",
            lambda c: c.execute(
                "SELECT id, kind, name, store_id, scopes FROM credentials"
                " WHERE token_hash = ? AND (revoked_at IS NULL OR revoked_at > ?)",
                (token_hash, _now()),
            ).fetchone(),
        )
        return None if row is None else sql_shared.principal(row)

    async def add_credential(
        self, kind: Kind, name: str, store_id: str | None, scopes: Sequence[str], token_hash: str
    ) -> int:
        def add(conn: sqlite3.Connection) -> int:
            with _atomic(conn):
                cur = conn.execute(
                    "INSERT INTO credentials (kind, name, store_id, scopes, token_hash, created_at)"
                    " VALUES (?, ?, ?, ?, ?, ?)",
                    (kind, name, store_id, " ".join(sorted(scopes)), token_hash, _now()),
                )
                return int(cast(int, cur.lastrowid))

        return await self._run("add_credential", add)

    async def identities(self, customer_id: str) -> list[str]:
        sql = sql_shared.IDENTITIES.replace("%s", "?")
        rows = await self._run(
            "identities",
            lambda c: c.execute(sql, (customer_id, sql_shared.MAX_IDENTITIES)).fetchall(),
        )
        return sorted(str(r[0]) for r in rows)

    async def customer_facts(self, ids: Sequence[str], recent: int) -> CustomerFacts | None:
        return await self._run("customer_facts", partial(_facts, ids=ids, recent=recent))

    async def customer_events(
        self, ids: Sequence[str], after: tuple[datetime, int] | None, limit: int
    ) -> list[StoredEvent]:
        marks = ",".join("?" * len(ids))
        params: list[Any] = list(ids)
        where = ""
        if after is not None:
            where = " AND (ts, seq) > (?, ?)"
            params += [sortable_ts(after[0]), after[1]]
        sql = (
            f"SELECT seq, {sql_shared.ENVELOPE_COLUMNS} FROM events"
            f" WHERE customer_id IN ({marks}){where} ORDER BY ts, seq LIMIT ?"
        )
        rows = await self._run(
            "customer_events", lambda c: c.execute(sql, [*params, limit]).fetchall()
        )
        return [sql_shared.stored_event(r[0], _ts(r[3]), r[1:], json.loads(r[9])) for r in rows]

    async def erase(self, ids: Sequence[str], requested_by: str, now: datetime) -> int:
        def erase(conn: sqlite3.Connection) -> int:
            marks = ",".join("?" * len(ids))
            with _atomic(conn):
                deleted = conn.execute(
                    f"DELETE FROM events WHERE customer_id IN ({marks})", list(ids)
                ).rowcount
                conn.execute(
                    f"DELETE FROM identity_links WHERE a IN ({marks}) OR b IN ({marks})",
                    [*ids, *ids],
                )
                conn.execute(
                    f"DELETE FROM identity_changes WHERE customer_id IN ({marks})"
                    f" OR alias IN ({marks})",
                    [*ids, *ids],
                )
                conn.executemany(
                    "INSERT INTO erasures (customer_id, requested_at, requested_by)"
                    " VALUES (?, ?, ?)",
                    [(i, sortable_ts(now), requested_by) for i in ids],
                )
                return int(deleted)

        return await self._run("erase", erase)

    async def audit(self, customer_id: str | None, limit: int) -> list[IdentityChange]:
        where = " WHERE customer_id = ? OR alias = ?" if customer_id is not None else ""
        params: list[Any] = [customer_id, customer_id] if customer_id is not None else []
        rows = await self._run(
            "audit",
            lambda c: c.execute(
                f"SELECT {sql_shared.CHANGE_COLUMNS} FROM identity_changes{where}"
                " ORDER BY id LIMIT ?",
                [*params, limit],
            ).fetchall(),
        )
        return [sql_shared.identity_change(r, _ts) for r in rows]

    async def decide_change(
        self, change_id: int, action: str, decided_by: str, now: datetime
    ) -> IdentityChange:
        def decide(conn: sqlite3.Connection) -> IdentityChange:
            with _atomic(conn):
                row = conn.execute(
                    f"SELECT {sql_shared.CHANGE_COLUMNS} FROM identity_changes WHERE id = ?",
                    (change_id,),
                ).fetchone()
                if row is None:
                    raise AuditError(f"no identity change {change_id}")
                change = sql_shared.identity_change(row, _ts)
                status, edge = trust.transition(change.kind, change.status, action)
                pair = (change.customer_id, change.alias, change.alias, change.customer_id)
                conn.execute(
                    _q(sql_shared.SET_CHANGE_STATUS),
                    (status, action, sortable_ts(now), decided_by, change_id),
                )
                # After the status: the removal looks for other applied changes of the pair.
                if edge == "add":
                    conn.execute(_q(sql_shared.ADD_LINK), pair)
                elif edge == "remove":
                    conn.execute(_q(sql_shared.REMOVE_LINK), pair)
                row = conn.execute(
                    f"SELECT {sql_shared.CHANGE_COLUMNS} FROM identity_changes WHERE id = ?",
                    (change_id,),
                ).fetchone()
                return sql_shared.identity_change(row, _ts)

        return await self._run("decide_change", decide)

    async def erasures(
        self, after: int, limit: int, *, agent_reports: bool = True
    ) -> list[Erasure]:
        skip = "" if agent_reports else sql_shared.WITHOUT_AGENT_REPORTS.replace("%s", "?")
        params = (after,) if agent_reports else (after, sql_shared.AGENT_REPORT_PATTERN)
        rows = await self._run(
            "erasures",
            lambda c: c.execute(
                "SELECT seq, customer_id, requested_at FROM erasures"
                f" WHERE seq > ?{skip} ORDER BY seq LIMIT ?",
                (*params, limit),
            ).fetchall(),
        )
        return [Erasure(int(r[0]), str(r[1]), _ts(r[2])) for r in rows]

    async def erasure_exists(self, seq: int) -> bool:
        row = await self._run(
            "erasure_exists",
            lambda c: c.execute("SELECT 1 FROM erasures WHERE seq = ?", (seq,)).fetchone(),
        )
        return row is not None

    async def erase_pseudonyms(
        self, store_id: str, pseudonyms: Sequence[str], requested_by: str, now: datetime
    ) -> int:
        def erase(conn: sqlite3.Connection) -> int:
            marks = ",".join("?" * len(pseudonyms))
            with _atomic(conn):
                deleted = conn.execute(
                    f"DELETE FROM events WHERE store_id = ? AND customer_id IN ({marks})",
                    [store_id, *pseudonyms],
                ).rowcount
                conn.execute(
                    f"DELETE FROM identity_links WHERE a IN ({marks}) OR b IN ({marks})",
                    [*pseudonyms, *pseudonyms],
                )
                conn.executemany(
                    "INSERT INTO erasures (customer_id, requested_at, requested_by)"
                    " VALUES (?, ?, ?)",
                    [(p, sortable_ts(now), requested_by) for p in pseudonyms],
                )
                return int(deleted)

        return await self._run("erase_pseudonyms", erase)

    async def pseudonymise(self, store_id: str, pairs: Sequence[tuple[str, str]]) -> int:
        def rewrite(conn: sqlite3.Connection) -> int:
            rewritten = 0
            with _atomic(conn):
                for clear, pseudonym in pairs:
                    rewritten += conn.execute(
                        "UPDATE events SET customer_id = ? WHERE store_id = ? AND customer_id = ?",
                        (pseudonym, store_id, clear),
                    ).rowcount
                    conn.execute(
                        "UPDATE events SET data = json_set(data, '$.alias', ?)"
                        " WHERE store_id = ? AND type = 'customer.identified'"
                        " AND json_extract(data, '$.alias') = ?",
                        (pseudonym, store_id, clear),
                    )
                affected = sorted({i for pair in pairs for i in pair})
                marks = ",".join("?" * len(affected))
                conn.execute(
                    f"DELETE FROM identity_links WHERE a IN ({marks}) OR b IN ({marks})",
                    [*affected, *affected],
                )
                alias = "json_extract(data, '$.alias')"
                made = conn.execute(
                    f"SELECT customer_id, {alias} FROM events WHERE type = 'customer.identified'"
                    f" AND (customer_id IN ({marks}) OR {alias} IN ({marks}))",
                    [*affected, *affected],
                ).fetchall()
                conn.executemany(
                    "INSERT INTO identity_links (a, b) VALUES (?, ?) ON CONFLICT DO NOTHING",
                    sql_shared.pairs_both_ways(made),
                )
            return rewritten

        return await self._run("pseudonymise", rewrite)

    async def credentials(self, kind: Kind) -> list[Credential]:
        rows = await self._run(
            "credentials",
            lambda c: c.execute(
                f"SELECT {sql_shared.CREDENTIAL_COLUMNS} FROM credentials WHERE kind = ?"
                " ORDER BY id",
                (kind,),
            ).fetchall(),
        )
        return [_credential(r) for r in rows]

    async def agent_keys(self) -> list[tuple[str, str]]:
        rows = await self._run(
            "agent_keys",
            lambda c: c.execute(
                "SELECT store_id, token_hash FROM credentials WHERE kind = 'agent'"
                " AND store_id IS NOT NULL AND (revoked_at IS NULL OR revoked_at > ?)"
                " ORDER BY id",
                (_now(),),
            ).fetchall(),
        )
        return [(str(r[0]), str(r[1])) for r in rows]

    async def credential(self, kind: Kind, credential_id: int) -> Credential | None:
        row = await self._run(
            "credential",
            lambda c: c.execute(
                f"SELECT {sql_shared.CREDENTIAL_COLUMNS} FROM credentials"
                " WHERE kind = ? AND id = ?",
                (kind, credential_id),
            ).fetchone(),
        )
        return None if row is None else _credential(row)

    async def revoke_credential(self, kind: Kind, credential_id: int, at: datetime) -> bool:
        def revoke(conn: sqlite3.Connection) -> bool:
            with _atomic(conn):
                cur = conn.execute(
                    "UPDATE credentials SET revoked_at = ? WHERE kind = ? AND id = ?"
                    " AND (revoked_at IS NULL OR revoked_at > ?)",
                    (sortable_ts(at), kind, credential_id, sortable_ts(at)),
                )
                return cur.rowcount == 1

        return await self._run("revoke_credential", revoke)

    async def publish_model(self, record: ModelRecord, artifact: bytes, now: datetime) -> bool:
        def publish(conn: sqlite3.Connection) -> bool:
            with _atomic(conn):
                row = conn.execute(
                    "SELECT sha256 FROM models WHERE version = ?", (record.version,)
                ).fetchone()
                if row is not None:
                    return sql_shared.check_republish(record, str(row[0]))
                conn.execute(
                    "INSERT INTO models (version, sha256, size, manifest, artifact, published_at)"
                    " VALUES (?, ?, ?, ?, ?, ?)",
                    (
                        record.version,
                        record.sha256,
                        record.size,
                        json.dumps(record.manifest),
                        artifact,
                        sortable_ts(now),
                    ),
                )
                return True

        return await self._run("publish_model", publish)

    async def latest_model(self) -> ModelRecord | None:
        row = await self._run(
            "latest_model",
            lambda c: c.execute(
                "SELECT version, sha256, size, manifest, published_at FROM models"
                " ORDER BY seq DESC LIMIT 1"
            ).fetchone(),
        )
        return None if row is None else _model(row)

    async def model(self, version: str) -> tuple[ModelRecord, bytes] | None:
        row = await self._run(
            "model",
            lambda c: c.execute(
                "SELECT version, sha256, size, manifest, published_at, artifact FROM models"
                " WHERE version = ?",
                (version,),
            ).fetchone(),
        )
        return None if row is None else (_model(row), bytes(row[5]))

    async def aggregates(
        self, since: date | None, until: date | None, store_id: str | None
    ) -> list[AggregateRow]:
        sql = (
            "SELECT substr(ts, 1, 10) AS day, store_id, type, count(*) FROM events"
            " WHERE (? IS NULL OR ts >= ?) AND (? IS NULL OR ts < ?)"
            " AND (? IS NULL OR store_id = ?)"
            " GROUP BY day, store_id, type ORDER BY day, store_id, type"
        )
        lo = since.isoformat() if since else None
        hi = sql_shared.day_after(until) if until else None
        rows = await self._run(
            "aggregates",
            lambda c: c.execute(sql, (lo, lo, hi, hi, store_id, store_id)).fetchall(),
        )
        return [AggregateRow(date.fromisoformat(r[0]), r[1], r[2], int(r[3])) for r in rows]

    async def stats(self) -> Stats:
        def stats(conn: sqlite3.Connection) -> Stats:
            counts = {
                name: int(conn.execute(sql).fetchone()[0])
                for name, sql in sql_shared.STATS_QUERIES.items()
            }
            kinds = conn.execute(sql_shared.CREDENTIAL_COUNTS).fetchall()
            return sql_shared.collect_stats(counts, kinds)

        return await self._run("stats", stats)

    # ---- the fleet view ------------------------------------------------------------

    async def record_heartbeat(self, heartbeat: Heartbeat) -> None:
        def record(conn: sqlite3.Connection) -> None:
            with _atomic(conn):
                conn.execute(
                    fleet_sql.UPSERT_HEARTBEAT.replace("%s", "?"),
                    fleet_sql.heartbeat_params(heartbeat, sortable_ts(heartbeat.received_at)),
                )

        await self._run("record_heartbeat", record)

    async def heartbeats(self) -> list[Heartbeat]:
        rows = await self._run(
            "heartbeats", lambda c: c.execute(fleet_sql.SELECT_HEARTBEATS).fetchall()
        )
        return [fleet_sql.heartbeat(r, _ts(r[2]), json.loads(r[4])) for r in rows]

    async def consent_facts(self, ids: Sequence[str]) -> ConsentFacts:
        return await self._run("consent_facts", partial(_consent_facts, ids=ids))

    async def profile_facts(
        self, customer_id: str, types: Sequence[str], limit: int
    ) -> ProfileFacts:
        return await self._run(
            "profile_facts",
            partial(_profile_facts, customer_id=customer_id, types=types, limit=limit),
        )

    async def feed_high_water(self) -> int:
        # One writer, and seq is assigned inside its transaction: what is visible has no holes
        # that a later commit could fill.
        row = await self._run(
            "feed_high_water",
            lambda c: c.execute("SELECT coalesce(max(seq), 0) FROM events").fetchone(),
        )
        return int(row[0])

    async def events_after(
        self, after: int, upto: int | None, limit: int, since: datetime | None = None
    ) -> list[StoredEvent]:
        where = ["seq > ?", "customer_id IS NOT NULL"]
        params: list[Any] = [after]
        if upto is not None:
            where.append("seq <= ?")
            params.append(upto)
        if since is not None:
            where.append("(ts >= ? OR type = 'consent.update')")
            params.append(sortable_ts(since))
        sql = (
            f"SELECT seq, {sql_shared.ENVELOPE_COLUMNS} FROM events WHERE {' AND '.join(where)}"
            " ORDER BY seq LIMIT ?"
        )
        rows = await self._run(
            "events_after", lambda c: c.execute(sql, [*params, limit]).fetchall()
        )
        return [sql_shared.stored_event(r[0], _ts(r[3]), r[1:], json.loads(r[9])) for r in rows]

    async def model_record(self, version: str) -> ModelRecord | None:
        row = await self._run(
            "model_record",
            lambda c: c.execute(_q(sql_shared.MODEL_RECORD), (version,)).fetchone(),
        )
        return None if row is None else _model(row)

    async def rollout(self) -> RolloutState:
        return await self._run("rollout", _rollout_state)

    async def rollout_log(self, limit: int) -> list[RolloutEntry]:
        rows = await self._run(
            "rollout_log",
            lambda c: c.execute(_q(sql_shared.ROLLOUT_LOG), (limit,)).fetchall(),
        )
        return [_rollout_entry(r) for r in rows]

    async def update_rollout(
        self, decide: RolloutDecision, decided_by: str, now: datetime
    ) -> RolloutEntry:
        def update(conn: sqlite3.Connection) -> RolloutEntry:
            with _atomic(conn):
                log_rows = conn.execute(
                    "SELECT id, action, version, percent, reason, decided_by, at"
                    " FROM model_rollout_log ORDER BY id"
                ).fetchall()
                change = decide(_rollout_state(conn), [_rollout_entry(r) for r in log_rows])
                new = change.state
                stamp = sortable_ts(now)
                since = None if new.canary_since is None else sortable_ts(new.canary_since)
                conn.execute(
                    _q(sql_shared.UPSERT_ROLLOUT),
                    (new.current_version, new.canary_version, new.canary_percent, since, stamp),
                )
                cur = conn.execute(
                    _q(sql_shared.INSERT_ROLLOUT_LOG),
                    (
                        change.action,
                        change.version,
                        change.percent,
                        change.reason,
                        decided_by,
                        stamp,
                    ),
                )
                return RolloutEntry(
                    int(cast(int, cur.lastrowid)),
                    change.action,
                    change.version,
                    change.percent,
                    change.reason,
                    decided_by,
                    now,
                )

        return await self._run("update_rollout", update)

    async def shown_performance(self, version: str, since: datetime | None) -> Performance:
        lo = sortable_ts(since) if since is not None else ""

        def tally(conn: sqlite3.Connection) -> Performance:
            # Iterated, not fetched whole: one suggestion at a time on the owner thread.
            rows = conn.execute(SHOWN_WITH_ACCEPTED, (version, lo))
            return acceptance.performance(version, sql_shared.shown_rows(rows))

        return await self._run("shown_performance", tally)

    async def close(self) -> None:
        try:
            await self._run("close", lambda c: c.close())
        finally:
            self._executor.shutdown(wait=True)
        log.info("store.sqlite.closed path=%s", self._path)


def _now() -> str:
    return sortable_ts(datetime.now(UTC))


def _connect(path: str) -> sqlite3.Connection:
    if path != ":memory:":
        Path(path).parent.mkdir(parents=True, exist_ok=True)
    # Autocommit mode: transactions are explicit (BEGIN IMMEDIATE) so none is left half open.
    conn = sqlite3.connect(path, isolation_level=None, timeout=30.0)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")  # a 2xx means the batch survives a power cut
    conn.execute("PRAGMA foreign_keys=ON")
    _migrate(conn)
    return conn


def _migrate(conn: sqlite3.Connection) -> None:
    with _atomic(conn):
        conn.execute(migrations.SQLITE_LEDGER)
        applied = {int(r[0]) for r in conn.execute("SELECT version FROM schema_migrations")}
        for migration in migrations.pending(applied):
            for statement in migration.sqlite:
                conn.execute(statement)
            conn.execute(
                "INSERT INTO schema_migrations (version, name, applied_at) VALUES (?, ?, ?)",
                (migration.version, migration.name, _now()),
            )
            log.info("store.migration.applied backend=sqlite version=%d", migration.version)


def _ingest(
    conn: sqlite3.Connection, rows: Sequence[EventRow], now: datetime, credential_id: int | None
) -> IngestCounts:
    with _atomic(conn):
        customers = sorted({r.customer_id for r in rows if r.customer_id is not None})
        erased_at: dict[str, datetime] = {}
        for chunk in sql_shared.chunks(customers, 500):
            marks = ",".join("?" * len(chunk))
            for cid, at in conn.execute(
                f"SELECT customer_id, max(requested_at) FROM erasures"
                f" WHERE customer_id IN ({marks}) GROUP BY customer_id",
                chunk,
            ):
                erased_at[str(cid)] = _ts(at)
        keep = sql_shared.without_erased(rows, erased_at)
        stamp = sortable_ts(now)
        cur = conn.executemany(
            "INSERT INTO events (event_id, type, ts, store_id, device_id, customer_id, source,"
            " schema, data, received_at, ingested_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
            " ON CONFLICT (store_id, event_id) DO NOTHING",
            [
                (
                    r.event_id,
                    r.type,
                    sortable_ts(r.ts),
                    r.store_id,
                    r.device_id,
                    r.customer_id,
                    r.source,
                    r.schema,
                    r.data_json,
                    r.received_at,
                    stamp,
                )
                for r in keep
            ],
        )
        accepted = cur.rowcount
        conn.executemany(
            _q(sql_shared.INSERT_CONSENT_CHANGE),
            [
                (
                    r.customer_id,
                    r.data_json,
                    r.event_id,
                    r.store_id,
                    credential_id,
                    sortable_ts(r.ts),
                    stamp,
                )
                for r in sql_shared.consents(keep)
            ],
        )
        for row in sql_shared.links(keep):
            _link(conn, row, credential_id, stamp)
    return IngestCounts(accepted, len(keep) - accepted, len(rows) - len(keep))


def _link(conn: sqlite3.Connection, row: EventRow, credential_id: int | None, stamp: str) -> None:
    """Record one claimed link and apply it when the trust model allows (``trust``)."""
    a, b = str(row.customer_id), str(row.alias)
    ids_a = _walk(conn, a)
    same = b in ids_a
    held = [] if same else conn.execute(_q(sql_shared.HELD_SAME_LINK), (row.store_id, a, b, b, a))
    held_ids = [int(h[0]) for h in held]
    facts = trust.LinkFacts(
        method=row.method,
        store_id=row.store_id,
        same_profile=same,
        stores_a=() if same else _history_stores(conn, ids_a),
        stores_b=() if same else _history_stores(conn, _walk(conn, b)),
        corroborated=bool(held_ids),
    )
    status, reason = trust.decide_link(facts, trust.DEFAULT_LINK_METHODS)
    cur = conn.execute(
        _q(sql_shared.INSERT_LINK_CHANGE),
        (
            a,
            b,
            row.method,
            row.event_id,
            row.store_id,
            credential_id,
            sortable_ts(row.ts),
            stamp,
            status,
            reason,
        ),
    )
    if cur.rowcount != 1 or status != trust.APPLIED or same:
        return  # a resent event, a link not (yet) believed, or nothing to change
    conn.execute(_q(sql_shared.ADD_LINK), (a, b, b, a))
    for held_id in held_ids:
        conn.execute(
            _q(sql_shared.SET_CHANGE_STATUS),
            (trust.APPLIED, "corroborated", stamp, f"store:{row.store_id}", held_id),
        )


def _walk(conn: sqlite3.Connection, customer_id: str) -> list[str]:
    rows = conn.execute(
        _q(sql_shared.IDENTITIES), (customer_id, sql_shared.MAX_IDENTITIES)
    ).fetchall()
    return [str(r[0]) for r in rows]


def _history_stores(conn: sqlite3.Connection, ids: Sequence[str]) -> set[str]:
    marks = ",".join("?" * len(ids))
    rows = conn.execute(
        f"SELECT DISTINCT store_id FROM events WHERE customer_id IN ({marks})"
        " AND type <> 'customer.identified'",
        list(ids),
    ).fetchall()
    return {str(r[0]) for r in rows}


def _q(sql: str) -> str:
    """Shared SQL (``%s`` placeholders) in sqlite3's ``?`` style."""
    return sql.replace("%s", "?")


def _facts(conn: sqlite3.Connection, ids: Sequence[str], recent: int) -> CustomerFacts | None:
    # One read transaction: in WAL mode it is one snapshot, so the four reads agree.
    conn.execute("BEGIN")
    try:
        return _facts_in_snapshot(conn, ids, recent)
    finally:
        conn.execute("COMMIT")


def _facts_in_snapshot(
    conn: sqlite3.Connection, ids: Sequence[str], recent: int
) -> CustomerFacts | None:
    marks = ",".join("?" * len(ids))
    where = f"customer_id IN ({marks})"
    params = list(ids)
    by_type = conn.execute(
        f"SELECT type, count(*), min(ts), max(ts) FROM events WHERE {where} GROUP BY type", params
    ).fetchall()
    if not by_type:
        return None
    devices = conn.execute(
        "SELECT CASE WHEN instr(source, ':') > 0 THEN substr(source, 1, instr(source, ':') - 1)"
        f" ELSE source END AS channel, store_id, device_id, count(*) FROM events WHERE {where}"
        " GROUP BY channel, store_id, device_id ORDER BY channel, store_id, device_id",
        params,
    ).fetchall()
    skus = conn.execute(
        f"SELECT json_extract(data, '$.sku'), ts FROM events WHERE {where}"
        " AND json_type(data, '$.sku') = 'text' ORDER BY ts DESC, seq DESC LIMIT ?",
        [*params, recent],
    ).fetchall()
    consents = conn.execute(
        "SELECT id, customer_id, flags, event_ts FROM identity_changes"
        f" WHERE {where} AND kind = 'consent' AND status = 'applied' ORDER BY id",
        params,
    ).fetchall()
    history = conn.execute(
        f"SELECT DISTINCT customer_id FROM events WHERE {where} AND type <> 'customer.identified'",
        params,
    ).fetchall()
    return CustomerFacts(
        ids=tuple(ids),
        counts={str(r[0]): int(r[1]) for r in by_type},
        first_seen=min(_ts(r[2]) for r in by_type),
        last_seen=max(_ts(r[3]) for r in by_type),
        stores=tuple(sorted({str(r[1]) for r in devices})),
        devices=tuple(DeviceFacts(r[0], r[1], r[2], int(r[3])) for r in devices),
        recent_skus=tuple((str(r[0]), _ts(r[1])) for r in skus),
        consent_changes=tuple(
            ConsentChange(int(r[0]), str(r[1]), json.loads(r[2]), _ts(r[3])) for r in consents
        ),
        history_ids=tuple(sorted(str(r[0]) for r in history)),
    )


def _consent_facts(conn: sqlite3.Connection, ids: Sequence[str]) -> ConsentFacts:
    marks = ",".join("?" * len(ids))
    consents = conn.execute(
        "SELECT id, customer_id, flags, event_ts FROM identity_changes"
        f" WHERE customer_id IN ({marks}) AND kind = 'consent' AND status = 'applied' ORDER BY id",
        list(ids),
    ).fetchall()
    history = conn.execute(
        f"SELECT DISTINCT customer_id FROM events WHERE customer_id IN ({marks})"
        " AND type <> 'customer.identified'",
        list(ids),
    ).fetchall()
    return ConsentFacts(
        consent_changes=tuple(
            ConsentChange(int(r[0]), str(r[1]), json.loads(r[2]), _ts(r[3])) for r in consents
        ),
        history_ids=tuple(sorted(str(r[0]) for r in history)),
    )


def _profile_facts(
    conn: sqlite3.Connection, customer_id: str, types: Sequence[str], limit: int
) -> ProfileFacts:
    conn.execute("BEGIN")  # one snapshot: ids, consent, interactions and counts agree
    try:
        ids = [i for i in _walk(conn, customer_id) if not is_pseudonym(i)]
        consent = _consent_facts(conn, ids)
        id_marks, type_marks = ",".join("?" * len(ids)), ",".join("?" * len(types))
        where = f"customer_id IN ({id_marks}) AND type IN ({type_marks})"
        params = [*ids, *types]
        sku = "CASE WHEN json_type(data, '$.sku') = 'text' THEN json_extract(data, '$.sku') END"
        rows = conn.execute(
            f"SELECT ts, type, {sku}, store_id, event_id FROM events WHERE {where}"
            " ORDER BY ts DESC, seq DESC LIMIT ?",
            [*params, limit],
        ).fetchall()
        counts = conn.execute(
            f"SELECT json_extract(data, '$.sku'), count(*) FROM events WHERE {where}"
            " AND json_type(data, '$.sku') = 'text' GROUP BY 1",
            params,
        ).fetchall()
    finally:
        conn.execute("COMMIT")
    return ProfileFacts(
        consent=consent,
        interactions=tuple(Interaction(_ts(r[0]), r[1], r[2], r[3], r[4]) for r in rows),
        by_sku={str(r[0]): int(r[1]) for r in counts},
    )


def _rollout_state(conn: sqlite3.Connection) -> RolloutState:
    row = conn.execute(_q(sql_shared.ROLLOUT_STATE)).fetchone()
    if row is None:
        return RolloutState(None, None, 0, None)
    return RolloutState(row[0], row[1], int(row[2]), None if row[3] is None else _ts(row[3]))


def _rollout_entry(row: Sequence[Any]) -> RolloutEntry:
    return RolloutEntry(
        int(row[0]), str(row[1]), str(row[2]), row[3], str(row[4]), str(row[5]), _ts(row[6])
    )


def _credential(row: Sequence[Any]) -> Credential:
    return sql_shared.credential(row, _ts(row[5]), None if row[6] is None else _ts(row[6]))


def _model(row: Sequence[Any]) -> ModelRecord:
    return ModelRecord(
        version=str(row[0]),
        sha256=str(row[1]),
        size=int(row[2]),
        manifest=json.loads(row[3]),
        published_at=_ts(row[4]),
    )
