"""PostgreSQL events partitioned by ingest day (migration 6, cloud_sync.store.partitions): a
store of the old layout converts with every row and seq kept, re-sent events stay duplicates,
day partitions are made ahead and drain strays, retention drops events only. SQLite keeps its
layout at the same migration version."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import sqlite3
from datetime import UTC, date, datetime, timedelta

import psycopg
import pytest

from cloud_sync.store import cli, migrations, partitions
from cloud_sync.store.backend import open_backend, sqlite_path
from cloud_sync.store.db_postgres import PostgresBackend
from cloud_sync.store.records import EventRow

OLD_ROWS = 120_000  # more than two of the migration's copy batches (50,000 seq each)
OLD_TS = datetime(2026, 10, 1, tzinfo=UTC)


def old_store(url: str) -> None:
    """A store at migration 5 (unpartitioned events) holding OLD_ROWS events in two stores, the
    same event_id in both for the first thousand, with consent and link records beside them."""
    with psycopg.connect(url) as conn:
        conn.execute(migrations.POSTGRES_LEDGER)
        for migration in migrations.MIGRATIONS:
            if migration.version > 5:  # the last version of the old layout
                continue
            for statement in migration.postgres:
                conn.execute(statement)
            conn.execute(
                "INSERT INTO schema_migrations (version, name) VALUES (%s, %s)",
                (migration.version, migration.name),
            )
        conn.execute(
            "INSERT INTO events (event_id, type, ts, store_id, customer_id, source, schema, data,"
            " ingested_at) SELECT 'e-' || (i %% 60000), 'product.picked_up',"
            " %s + i * interval '1 second', CASE WHEN i < 60000 THEN 's-1' ELSE 's-2' END,"
            " 'c-' || (i %% 500), 'mqtt:t', 1, jsonb_build_object('sku', 'SKU-' || (i %% 40)),"
            " %s + i * interval '1 second' FROM generate_series(0, %s - 1) i",
            (OLD_TS, OLD_TS, OLD_ROWS),
        )
        # Holes in seq (rolled back inserts) must not lose rows.
        conn.execute("DELETE FROM events WHERE seq % 1000 = 7")
        conn.execute(
            "INSERT INTO identity_changes (kind, customer_id, flags, event_id, store_id,"
            " event_ts, received_at, status) VALUES ('consent', 'c-1', '{\"partner\": true}',"
            " 'consent-1', 's-1', %s, %s, 'applied')",
            (OLD_TS, OLD_TS),
        )
        conn.execute("INSERT INTO identity_links VALUES ('c-1', 'card-1'), ('card-1', 'c-1')")


def row(event_id: str, store_id: str, customer_id: str = "c-1") -> EventRow:
    return EventRow(
        event_id=event_id,
        type="product.picked_up",
        ts=OLD_TS,
        store_id=store_id,
        device_id="shelf-1",
        customer_id=customer_id,
        source="mqtt:t",
        schema=1,
        data_json='{"sku": "SKU-1"}',
        received_at=None,
        alias=None,
    )


def snapshot(url: str) -> set[tuple[int, str, str]]:
    with psycopg.connect(url) as conn:
        return {
            (int(r[0]), str(r[1]), str(r[2]))
            for r in conn.execute("SELECT seq, store_id, event_id FROM events").fetchall()
        }


def scalar(url: str, query: str) -> int:
    with psycopg.connect(url) as conn:
        found = conn.execute(query).fetchone()
    assert found is not None
    return int(found[0])


async def test_an_old_store_converts_with_every_row_and_seq_kept(pg_url: str) -> None:
    old_store(pg_url)
    before = snapshot(pg_url)
    assert len(before) == OLD_ROWS - OLD_ROWS // 1000
    backend = await open_backend(pg_url, pool_size=4)
    try:
        assert snapshot(pg_url) == before
        assert scalar(pg_url, "SELECT count(*) FROM event_keys") == len(before)
        assert scalar(pg_url, "SELECT max(version) FROM schema_migrations") == 6
        assert scalar(pg_url, "SELECT count(*) FROM events_legacy") == len(before)
        assert scalar(pg_url, "SELECT count(*) FROM identity_changes") == 1
        assert scalar(pg_url, "SELECT count(*) FROM identity_links") == 2
        # Re-sending old events (both stores' copies of one id) stores nothing twice ...
        again = await backend.ingest([row("e-5", "s-1"), row("e-5", "s-2")], datetime.now(UTC))
        assert (again.accepted, again.duplicates) == (0, 2)
        # ... and a new event is stored once, after every old seq (the feed's cursor).
        first = await backend.ingest([row("new-1", "s-1")], datetime.now(UTC))
        second = await backend.ingest([row("new-1", "s-1")], datetime.now(UTC))
        assert (first.accepted, second.accepted, second.duplicates) == (1, 0, 1)
        newest = await backend.events_after(max(s for s, _, _ in before), None, 10)
        assert [e.envelope["event_id"] for e in newest] == ["new-1"]
        assert len(snapshot(pg_url)) == len(before) + 1
    finally:
        await backend.close()


async def test_concurrent_ingests_of_one_batch_store_it_once(pg_url: str) -> None:
    backend = await open_backend(pg_url, pool_size=4)
    try:
        batch = [row(f"e-{i}", "s-1", f"c-{i % 7}") for i in range(300)]
        results = await asyncio.gather(
            *(backend.ingest(batch, datetime.now(UTC)) for _ in range(4))
        )
        assert sum(r.accepted for r in results) == len(batch)
        assert sum(r.duplicates for r in results) == 3 * len(batch)
        assert scalar(pg_url, "SELECT count(*) FROM events") == len(batch)
    finally:
        await backend.close()


def holders(parts: list[partitions.Partition], day: date) -> list[str]:
    """The partitions (not the default one) that hold ``day``."""
    lo = partitions.midnight(day)
    return [
        p.name
        for p in parts
        if not p.is_default
        and (p.lower is None or p.lower <= lo)
        and (p.upper is None or p.upper > lo)
    ]


def test_periods_are_aligned_on_mondays() -> None:
    friday = date(2026, 11, 27)
    assert partitions.period_start(friday, 7) == date(2026, 11, 23)  # its Monday
    assert partitions.period_start(date(2026, 11, 23), 7) == date(2026, 11, 23)
    assert partitions.period_start(friday, 1) == friday


async def test_partitions_are_made_ahead_and_take_in_strays(pg_url: str) -> None:
    backend = await open_backend(pg_url, pool_size=2)
    assert isinstance(backend, PostgresBackend)
    try:
        now = datetime.now(UTC)
        parts = await backend.partition_list()
        assert [p.name for p in parts if p.is_default] == ["events_default"]
        # Every day from today to a week ahead is held by exactly one partition; the first
        # ones after events_legacy (which ends tomorrow) start on the day it ends.
        for d in range(partitions.DEFAULT_DAYS_AHEAD + 1):
            assert len(holders(parts, now.date() + timedelta(days=d))) == 1, (d, parts)
        tomorrow = now.date() + timedelta(days=1)
        assert holders(parts, tomorrow) == [partitions.day_name(tomorrow)]
        # A row whose days have no partition yet (maintenance that did not run) is kept ...
        later = now + timedelta(days=60)
        with psycopg.connect(pg_url, autocommit=True) as conn:
            conn.execute("INSERT INTO event_keys VALUES ('s-1', 'late')")
            conn.execute(
                "INSERT INTO events (event_id,"
                " type, ts, store_id, source, schema, data, ingested_at) VALUES ('late',"
                " 'product.picked_up', %s, 's-1', 'mqtt:t', 1, '{}', %s)",
                (later, later),
            )
        assert scalar(pg_url, "SELECT count(*) FROM events_default") == 1
        seq = scalar(pg_url, "SELECT seq FROM events WHERE event_id = 'late'")
        # ... and moves, seq kept, into its period's partition when that is made.
        made = await backend.partitions_create_ahead(later, 0)
        start = partitions.period_start(later.date(), partitions.SPAN_DAYS)
        assert made == [partitions.day_name(start)]
        assert scalar(pg_url, "SELECT count(*) FROM events_default") == 0
        assert scalar(pg_url, f"SELECT seq FROM {made[0]} WHERE event_id = 'late'") == seq
        assert await backend.partitions_create_ahead(later, 0) == []
    finally:
        await backend.close()


async def test_retention_drops_old_partitions_and_keeps_consent_links_and_erasures(
    pg_url: str,
) -> None:
    backend = await open_backend(pg_url, pool_size=2)
    assert isinstance(backend, PostgresBackend)
    try:
        now = datetime.now(UTC)
        await backend.ingest([row("old-1", "s-1"), row("old-2", "s-1")], now)
        await backend.erase(["c-gone"], "admin:t", now)
        with psycopg.connect(pg_url, autocommit=True) as conn:
            conn.execute(
                "INSERT INTO identity_changes (kind, customer_id, flags, event_id, store_id,"
                " event_ts, received_at, status) VALUES ('consent', 'c-1', '{}', 'consent-1',"
                " 's-1', now(), now(), 'applied')"
            )
            conn.execute("INSERT INTO identity_links VALUES ('c-1', 'card-1')")
        keep = {t: scalar(pg_url, f"SELECT count(*) FROM {t}") for t in _KEPT}
        # Twenty days on, with a retention of 5 days: today's rows (in events_legacy, which
        # ends tomorrow) and every partition ending by the cutoff go; later ones stay.
        later = now + timedelta(days=20)
        cutoff = partitions.midnight(later.date() - timedelta(days=5))
        before = await backend.partition_list()
        due = [p.name for p in before if p.upper is not None and p.upper <= cutoff]
        assert "events_legacy" in due
        dropped, strays = await backend.partitions_drop_older(later, 5)
        assert (dropped, strays) == (due, 0)
        assert scalar(pg_url, "SELECT count(*) FROM events") == 0
        assert scalar(pg_url, "SELECT count(*) FROM event_keys") == 0
        assert {t: scalar(pg_url, f"SELECT count(*) FROM {t}") for t in _KEPT} == keep
        remaining = {p.name for p in await backend.partition_list()}
        assert remaining == {p.name for p in before} - set(due)
        # A dropped event's key is forgotten with it: sent again, it is stored again.
        again = await backend.ingest([row("old-1", "s-1")], datetime.now(UTC))
        assert again.accepted == 1
        # It went to events_default (its days' partition is gone); retention finds it there.
        assert scalar(pg_url, "SELECT count(*) FROM events_default") == 1
        _, strays = await backend.partitions_drop_older(now + timedelta(days=400), 5)
        assert strays == 1
        assert scalar(pg_url, "SELECT count(*) FROM event_keys") == 0
        with pytest.raises(ValueError, match="at least 1"):
            await backend.partitions_drop_older(now, 0)
    finally:
        await backend.close()


_KEPT = ("identity_changes", "identity_links", "erasures", "credentials")


def run_cli(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main(list(argv))
    return code, out.getvalue(), err.getvalue()


def test_the_partitions_cli_lists_creates_and_drops(pg_url: str) -> None:
    code, out, _ = run_cli("partitions", "list", "--db", pg_url)
    assert code == 0
    listed = [json.loads(line) for line in out.splitlines()]
    assert listed[0]["name"] == "events_legacy"
    assert listed[-1] == {
        "name": "events_default",
        "from": None,
        "to": None,
        "default": True,
        "rows_estimate": listed[-1]["rows_estimate"],
    }
    code, out, _ = run_cli("partitions", "create-ahead", "--days", "30", "--db", pg_url)
    assert code == 0
    assert json.loads(out)["created"]  # a month ahead needs more than the week made at start
    code, out, _ = run_cli("partitions", "list", "--db", pg_url)
    last = max(
        datetime.fromisoformat(p["to"]) for p in map(json.loads, out.splitlines()) if p["to"]
    )
    assert last >= partitions.midnight(datetime.now(UTC).date() + timedelta(days=31))
    code, out, _ = run_cli("partitions", "drop-older", "--days", "30", "--db", pg_url)
    assert (code, json.loads(out)) == (0, {"default_rows_deleted": 0, "dropped": []})
    err = io.StringIO()
    with contextlib.redirect_stderr(err), pytest.raises(SystemExit):  # argparse's usage error
        cli.main(["partitions", "drop-older", "--days", "0", "--db", pg_url])
    assert "expected 1..3650" in err.getvalue()


def test_the_partitions_cli_refuses_sqlite(sqlite_url: str) -> None:
    code, out, err = run_cli("partitions", "list", "--db", sqlite_url)
    assert (code, out) == (1, "")
    assert "PostgreSQL only" in err
    path = sqlite_path(sqlite_url)
    assert path is not None
    with contextlib.closing(sqlite3.connect(path)) as conn:
        versions = [r[0] for r in conn.execute("SELECT version FROM schema_migrations")]
    assert max(versions) == migrations.latest_version()


async def test_an_ingest_never_waits_for_maintenance_under_way(pg_url: str) -> None:
    backend = await open_backend(pg_url, pool_size=2)
    try:
        async with (
            await psycopg.AsyncConnection.connect(pg_url) as holder,
            await psycopg.AsyncConnection.connect(pg_url, autocommit=True) as other,
        ):
            await holder.execute("SELECT pg_advisory_xact_lock(%s)", (partitions.PARTITION_LOCK,))
            later = datetime.now(UTC) + timedelta(days=60)
            assert await partitions.create_ahead(other, later, 0, wait=False) is None
            stored = await backend.ingest([row("during", "s-1")], datetime.now(UTC))
            assert stored.accepted == 1
            await holder.rollback()
            made = await partitions.create_ahead(other, later, 0, wait=False)
            assert made == [partitions.day_name(partitions.period_start(later.date(), 7))]
    finally:
        await backend.close()


def test_the_cli_default_is_the_stores_own() -> None:
    args = cli.build_parser().parse_args(["partitions", "create-ahead"])
    assert args.days == partitions.DEFAULT_DAYS_AHEAD
