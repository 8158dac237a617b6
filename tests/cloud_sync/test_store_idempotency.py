"""(store_id, event_id) is the idempotency key: one store cannot shadow another's events, and
the migration to that key keeps what a store of the old schema holds. Both backends."""

from __future__ import annotations

import json
import sqlite3
from typing import Any

import psycopg
import pytest
from aiohttp.test_utils import TestClient
from conftest import Tokens
from cstore_helpers import consent, envelope

from cloud_sync.envelope_schema import default_registry
from cloud_sync.store.backend import open_backend, sqlite_path
from cloud_sync.store.ingest import Piece, check_batch
from cloud_sync.store.migrations import MIGRATIONS, POSTGRES_LEDGER, SQLITE_LEDGER
from cloud_sync.store.records import parse_ts

Client = TestClient[Any, Any]
JSON = {"Content-Type": "application/json"}


async def post(client: Client, headers: dict[str, str], items: list[Any]) -> dict[str, Any]:
    response = await client.post("/v1/events", data=json.dumps(items), headers={**JSON, **headers})
    assert response.status == 200
    answer: dict[str, Any] = await response.json()
    return answer


async def test_another_stores_event_id_does_not_shadow_the_real_event(
    client: Client, tokens: Tokens
) -> None:
    north, south = await tokens.agent("store-001"), await tokens.agent("store-002")
    real = envelope(customer_id="c-1", data={"sku": "SKU-REAL"})
    # store-002 learns (or guesses) the id and posts it first, under its own store.
    squatter = envelope(
        customer_id="c-1", store_id="store-002", event_id=real["event_id"], data={"sku": "SKU-X"}
    )
    assert (await post(client, south, [squatter]))["accepted"] == 1
    answer = await post(client, north, [real])
    assert (answer["accepted"], answer["duplicates"]) == (1, 0)
    again = await post(client, north, [real])  # resending is still a duplicate
    assert (again["accepted"], again["duplicates"]) == (0, 1)
    admin = await tokens.admin()
    page = await (await client.get("/v1/customers/c-1/events", headers=admin)).json()
    stored = {(e["store_id"], e["data"]["sku"]) for e in page["events"]}
    assert stored == {("store-001", "SKU-REAL"), ("store-002", "SKU-X")}
    stats = await (await client.get("/v1/customers/c-1", headers=admin)).json()
    assert stats["events"] == 2


def _old_schema_rows() -> list[dict[str, Any]]:
    pickup = envelope(customer_id="card-1", offset_s=1)
    grant = consent("card-1", partner=True, offset_s=2)
    link = envelope(
        "customer.identified",
        customer_id="card-1",
        offset_s=3,
        data={"method": "loyalty_card", "alias": "app-1"},
    )
    return [pickup, grant, link]


def _insert_args(row: dict[str, Any], seq: int) -> tuple[Any, ...]:
    return (
        seq,
        row["event_id"],
        row["type"],
        row["ts"].replace("Z", "000Z"),  # the backend's fixed-width text (SQLite)
        row["store_id"],
        row["device_id"],
        row["customer_id"],
        row["source"],
        1,
        json.dumps(row["data"]),
        row["received_at"],
        "2026-11-22T09:00:00.000000Z",
    )


def _make_v1_sqlite(path: str, rows: list[dict[str, Any]]) -> None:
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.execute("BEGIN")
        conn.execute(SQLITE_LEDGER)
        for statement in MIGRATIONS[0].sqlite:
            conn.execute(statement)
        conn.execute("INSERT INTO schema_migrations VALUES (1, 'v1', '2026-11-22')")
        conn.executemany(
            "INSERT INTO events VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [_insert_args(r, 10 + i) for i, r in enumerate(rows)],
        )
        conn.executemany(
            "INSERT INTO identity_links VALUES (?, ?)", [("card-1", "app-1"), ("app-1", "card-1")]
        )
        conn.execute("COMMIT")
    finally:
        conn.close()


def _make_v1_postgres(url: str, rows: list[dict[str, Any]]) -> None:
    with psycopg.connect(url) as conn:
        conn.execute(POSTGRES_LEDGER)
        for statement in MIGRATIONS[0].postgres:
            conn.execute(statement)
        conn.execute("INSERT INTO schema_migrations (version, name) VALUES (1, 'v1')")
        for row in rows:
            conn.execute(
                "INSERT INTO events (event_id, type, ts, store_id, device_id, customer_id,"
                " source, schema, data, received_at) VALUES"
                " (%s, %s, %s, %s, %s, %s, %s, 1, %s, %s)",
                (
                    row["event_id"],
                    row["type"],
                    row["ts"],
                    row["store_id"],
                    row["device_id"],
                    row["customer_id"],
                    row["source"],
                    json.dumps(row["data"]),
                    row["received_at"],
                ),
            )
        conn.execute("INSERT INTO identity_links VALUES ('card-1', 'app-1'), ('app-1', 'card-1')")


@pytest.mark.parametrize("backend_name", ["sqlite", "postgres"])
async def test_migration_keeps_events_consent_and_links(
    backend_name: str, request: pytest.FixtureRequest
) -> None:
    db_url = str(request.getfixturevalue("sqlite_url" if backend_name == "sqlite" else "pg_url"))
    rows = _old_schema_rows()
    path = sqlite_path(db_url)
    if path is not None:
        _make_v1_sqlite(path, rows)
    else:
        _make_v1_postgres(db_url, rows)
    backend = await open_backend(db_url, pool_size=2)
    try:
        assert (await backend.stats()).events == 3
        ids = await backend.identities("app-1")
        assert ids == ["app-1", "card-1"]
        facts = await backend.customer_facts(ids, 10)
        assert facts is not None
        assert sum(facts.counts.values()) == 3
        assert [c.flags["partner_sharing"] for c in facts.consent_changes] == [True]
        trail = await backend.audit("card-1", 10)
        assert [(c.kind, c.status, c.reason) for c in trail] == [
            ("consent", "applied", "before_audit"),
            ("link", "applied", "before_audit"),
        ]
        events = await backend.customer_events(ids, None, 10)
        assert [e.envelope["event_id"] for e in events] == [r["event_id"] for r in rows]
        if path is not None:  # SQLite rebuilt the table: its seq values are kept
            assert [e.seq for e in events] == [10, 11, 12]
    finally:
        await backend.close()
    # Reopening applies nothing twice, and the new key admits another store's copy.
    backend = await open_backend(db_url, pool_size=2)
    try:
        twin = {**rows[0], "store_id": "store-002", "source": "mqtt:edge/store-002/x"}
        checked = check_batch([Piece(twin)], "store-002", default_registry())
        now = parse_ts("2026-11-22T10:00:00Z")
        assert now is not None
        counts = await backend.ingest(checked.rows, now)
        assert counts.accepted == 1
        assert (await backend.stats()).events == 4
    finally:
        await backend.close()
