"""Migration 4 on a store that ran before it: credentials keep working and the newest model
published stays the one served (now as the promoted version). Both backends."""

from __future__ import annotations

import contextlib
import hashlib
import json
import sqlite3
from datetime import UTC, datetime

import psycopg
from aiohttp.test_utils import TestClient, TestServer

from cloud_sync.store import auth, migrations, model_rollout
from cloud_sync.store.app import create_app
from cloud_sync.store.backend import is_postgres, open_backend, sqlite_path
from cloud_sync.store.records import ModelRecord
from cloud_sync.store.server import RUNNER_OPTIONS

TOKEN = "cst_agent_before-migration-4"
NOW = datetime(2026, 11, 20, tzinfo=UTC)


def store_at_version_3(db_url: str) -> None:
    """The schema and rows of a store before migration 4: one agent token, two models."""
    older = [m for m in migrations.MIGRATIONS if m.version <= 3]
    credential = (
        "INSERT INTO credentials (kind, name, store_id, scopes, token_hash, created_at)"
        " VALUES ('agent', 'old', 'store-001', '', %s, %s)"
    )
    model = (
        "INSERT INTO models (version, sha256, size, manifest, artifact, published_at)"
        " VALUES (%s, %s, 1, %s, %s, %s)"
    )
    rows = [
        (v, hashlib.sha256(v.encode()).hexdigest(), json.dumps({"version": v}), v.encode(), NOW)
        for v in ("m-1", "m-2")
    ]
    if is_postgres(db_url):
        with psycopg.connect(db_url) as conn:
            conn.execute(migrations.POSTGRES_LEDGER)
            for migration in older:
                for statement in migration.postgres:
                    conn.execute(statement)
                conn.execute(
                    "INSERT INTO schema_migrations (version, name) VALUES (%s, %s)",
                    (migration.version, migration.name),
                )
            conn.execute(credential, (auth.hash_token(TOKEN), NOW))
            for row in rows:
                conn.execute(model, row)
        return
    path = sqlite_path(db_url)
    assert path is not None
    stamp = NOW.isoformat()
    with contextlib.closing(sqlite3.connect(path)) as db, db:
        db.execute(migrations.SQLITE_LEDGER)
        for migration in older:
            for statement in migration.sqlite:
                db.execute(statement)
            db.execute(
                "INSERT INTO schema_migrations (version, name, applied_at) VALUES (?, ?, ?)",
                (migration.version, migration.name, stamp),
            )
        db.execute(credential.replace("%s", "?"), (auth.hash_token(TOKEN), stamp))
        for row in rows:
            db.execute(model.replace("%s", "?"), (*row[:4], stamp))


async def test_an_upgraded_store_serves_the_same_model_to_the_same_tokens(db_url: str) -> None:
    store_at_version_3(db_url)
    backend = await open_backend(db_url, pool_size=2)
    try:
        server = TestServer(create_app(backend))
        await server.start_server(**RUNNER_OPTIONS)
        async with TestClient(server) as client:
            headers = {"Authorization": f"Bearer {TOKEN}"}
            response = await client.get("/v1/models/latest", headers=headers)
            assert response.status == 200
            assert (await response.json())["version"] == "m-2"
        state = await backend.rollout()
        assert (state.current_version, state.canary_version) == ("m-2", None)
        # What was served before counts as promoted: rolling back the next one returns to it.
        now = datetime.now(UTC)
        await backend.publish_model(ModelRecord("m-3", "0" * 64, 1, {"version": "m-3"}), b"3", now)
        await model_rollout.promote(backend, "m-3", "admin:t", now)
        await model_rollout.roll_back(backend, "m-3", "admin:t", now)
        assert (await backend.rollout()).current_version == "m-2"
        # The rebuilt credentials table takes channel tokens now.
        channel = await auth.create_credential(backend, "channel", name="web-shop")
        assert await auth.authenticate(backend, f"Bearer {channel}") is not None
    finally:
        await backend.close()
