"""Fixtures for the central store: a real PostgreSQL database, real SQLite files, the app.

PostgreSQL: ``EDGE_TEST_PG_URL`` (default ``postgresql://postgres@127.0.0.1:5432/test``) names
a server; the session creates one uniquely named database there and drops it at the end, and
each test gets its own schema in it. Unreachable: skip, unless ``EDGE_REQUIRE_SERVICES=1``.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from urllib.parse import quote, urlsplit, urlunsplit

import psycopg
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from psycopg import sql

from cloud_sync.store import auth
from cloud_sync.store.app import create_app
from cloud_sync.store.backend import Backend, open_backend
from cloud_sync.store.ingest import Limits
from cloud_sync.store.server import RUNNER_OPTIONS

DEFAULT_PG_URL = "postgresql://postgres@127.0.0.1:5432/test"
TEST_LIMITS = Limits(max_body_bytes=256 * 1024, max_decoded_bytes=1024 * 1024, max_events=500)


def with_database(url: str, database: str) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path="/" + database))


def with_schema(url: str, schema: str) -> str:
    """A URL whose connections use ``schema`` (libpq ``options=-csearch_path=...``)."""
    parts = urlsplit(url)
    option = "options=" + quote(f"-csearch_path={schema}", safe="")
    query = f"{parts.query}&{option}" if parts.query else option
    return urlunsplit(parts._replace(query=query))


@pytest.fixture(scope="session")
def pg_server_url() -> Iterator[str]:
    """A fresh database for this session on the test server; dropped afterwards."""
    base = os.environ.get("EDGE_TEST_PG_URL", DEFAULT_PG_URL)
    try:
        admin = psycopg.connect(base, autocommit=True, connect_timeout=3)
    except psycopg.OperationalError as exc:
        reason = f"PostgreSQL unreachable at {base} (set EDGE_TEST_PG_URL): {exc}"
        if os.environ.get("EDGE_REQUIRE_SERVICES") == "1":
            pytest.fail(reason)
        pytest.skip(reason)
    name = f"cstore_test_{uuid.uuid4().hex[:12]}"
    with admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        try:
            yield with_database(base, name)
        finally:
            admin.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(name)))


@pytest.fixture
def pg_url(pg_server_url: str) -> Iterator[str]:
    """A URL to an empty schema of the session database, private to this test."""
    name = f"t_{uuid.uuid4().hex[:12]}"
    schema = sql.Identifier(name)
    # Short connections: a test may terminate every session of the database.
    with psycopg.connect(pg_server_url, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE SCHEMA {}").format(schema))
    try:
        yield with_schema(pg_server_url, name)
    finally:
        with psycopg.connect(pg_server_url, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP SCHEMA {} CASCADE").format(schema))


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite://{tmp_path / 'store.db'}"


@pytest.fixture(params=["sqlite", "postgres"])
def db_url(request: pytest.FixtureRequest) -> str:
    """The core suite runs once per backend."""
    fixture = "sqlite_url" if request.param == "sqlite" else "pg_url"
    return str(request.getfixturevalue(fixture))


@pytest.fixture
async def backend(db_url: str) -> AsyncIterator[Backend]:
    store = await open_backend(db_url, pool_size=4)
    try:
        yield store
    finally:
        await store.close()


@pytest.fixture
async def client(backend: Backend) -> AsyncIterator[TestClient[web.Request, web.Application]]:
    server = TestServer(create_app(backend, TEST_LIMITS))
    # TestServer drops constructor options; started here, the client reuses this runner.
    await server.start_server(**RUNNER_OPTIONS)
    async with TestClient(server) as test_client:
        yield test_client


class Tokens:
    """Credentials made through the same code the CLI uses."""

    def __init__(self, backend: Backend) -> None:
        self.backend = backend

    async def agent(self, store_id: str = "store-001") -> dict[str, str]:
        token = await auth.create_credential(self.backend, "agent", name="t", store_id=store_id)
        return {"Authorization": f"Bearer {token}"}

    async def admin(self) -> dict[str, str]:
        token = await auth.create_credential(self.backend, "admin", name="t")
        return {"Authorization": f"Bearer {token}"}

    async def partner(self, *scopes: str) -> dict[str, str]:
        token = await auth.create_credential(self.backend, "partner", name="p", scopes=scopes)
        return {"Authorization": f"Bearer {token}"}


@pytest.fixture
def tokens(backend: Backend) -> Tokens:
    return Tokens(backend)
