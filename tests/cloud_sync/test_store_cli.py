"""The ``customer-store`` commands and the migrations they apply, on both backends."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import subprocess
import sys

import psycopg
import pytest

from cloud_sync.store import auth
from cloud_sync.store.backend import open_backend
from cloud_sync.store.cli import main
from cloud_sync.store.migrations import latest_version
from cloud_sync.store.records import Principal


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    code = main(argv)
    return code, capsys.readouterr().out


def test_token_create_prints_a_working_token_last(
    db_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out = run(["token", "create", "--db", db_url, "--store", "store-042"], capsys)
    assert code == 0
    token = out.strip().splitlines()[-1]
    assert token.startswith(auth.TOKEN_PREFIX["agent"])

    async def lookup() -> Principal | None:
        backend = await open_backend(db_url)
        try:
            return await backend.find_principal(auth.hash_token(token))
        finally:
            await backend.close()

    principal = asyncio.run(lookup())
    assert principal is not None
    assert (principal.kind, principal.store_id) == ("agent", "store-042")


def test_keys_and_stats(db_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, out = run(
        [
            "partner",
            "create",
            "--db",
            db_url,
            "--name",
            "acme",
            "--scope",
            "profiles:read",
            "--scope",
            "aggregates:read",
        ],
        capsys,
    )
    assert code == 0
    assert out.strip().splitlines()[-1].startswith(auth.TOKEN_PREFIX["partner"])
    code, out = run(["admin", "create", "--db", db_url], capsys)
    assert code == 0
    assert out.strip().splitlines()[-1].startswith(auth.TOKEN_PREFIX["admin"])
    code, out = run(["stats", "--db", db_url], capsys)
    assert code == 0
    stats = json.loads(out)
    assert stats["events"] == 0
    assert stats["customers"] == 0
    assert stats["credentials"] == {"admin": 1, "partner": 1}


def test_refusals_exit_non_zero(db_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["token", "create", "--db", "mysql://x", "--store", "s"]) == 1
    with pytest.raises(SystemExit):
        main(["partner", "create", "--db", db_url, "--name", "n", "--scope", "everything"])
    assert "customer-store: error" in capsys.readouterr().err


def test_migrations_are_recorded_once(db_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(["migrate", "--db", db_url], capsys)[0] == 0
    assert run(["migrate", "--db", db_url], capsys)[0] == 0
    if db_url.startswith("sqlite"):
        with sqlite3.connect(db_url.removeprefix("sqlite://")) as conn:
            rows = conn.execute("SELECT version FROM schema_migrations").fetchall()
            mode = conn.execute("PRAGMA journal_mode").fetchone()[0]
        assert mode == "wal"
    else:
        with psycopg.connect(db_url) as pg:
            rows = pg.execute("SELECT version FROM schema_migrations").fetchall()
    assert [r[0] for r in rows] == list(range(1, latest_version() + 1))


async def test_instances_starting_together_migrate_once(pg_url: str) -> None:
    backends = await asyncio.gather(*(open_backend(pg_url, pool_size=1) for _ in range(4)))
    try:
        stats = await asyncio.gather(*(b.stats() for b in backends))
        assert all(s.events == 0 for s in stats)
    finally:
        await asyncio.gather(*(b.close() for b in backends))


def test_the_store_never_imports_the_agent() -> None:
    code = (
        "import sys, cloud_sync.store.cli, cloud_sync.store.db_sqlite, "
        "cloud_sync.store.db_postgres; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'edge_agent'))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=30, check=True
    )
    assert done.stdout.strip() == "[]"
