"""PostgreSQL ``events`` partitions by ingest time: made ahead, dropped for retention.

Migration 6 partitions ``events`` by ``ingested_at`` (the store's clock): ``events_legacy``
holds what was stored before it, ``events_pYYYYMMDD`` one period each (``SPAN_DAYS`` days from
that date, weeks from Monday by default; the first after ``events_legacy`` is shorter), and
``events_default`` catches a row whose period has no partition yet (maintenance that did not
run). Making a partition moves its strays out of the default one in the same transaction.

Retention drops whole partitions and forgets their idempotency keys (``event_keys``).
Only events go: consent and link changes (``identity_changes``), ``identity_links``,
``erasures`` and credentials are other tables and are never touched here.

Every change holds ``PARTITION_LOCK`` so that service instances and the CLI take turns.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from typing import Any, Final

import psycopg
from psycopg import sql

log = logging.getLogger(__name__)

PARTITION_LOCK: Final = 0x63_73_70_61_72_74  # "cspart"
DEFAULT_DAYS_AHEAD: Final = 7
# Days per partition. A read by customer probes every partition's index, so fewer, wider
# partitions read faster; retention drops whole partitions, so it is exact to this span.
SPAN_DAYS: Final = 7
DEFAULT_PARTITION: Final = "events_default"
_BOUND = re.compile(r"FOR VALUES FROM \((.+)\) TO \((.+)\)")


@dataclass(frozen=True, slots=True)
class Partition:
    name: str
    lower: datetime | None  # None: MINVALUE
    upper: datetime | None  # None: MAXVALUE (or the default partition)
    is_default: bool
    rows: int  # the planner's estimate (pg_class.reltuples), -1 when never analysed

    def as_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "from": self.lower.isoformat() if self.lower else None,
            "to": self.upper.isoformat() if self.upper else None,
            "default": self.is_default,
            "rows_estimate": self.rows,
        }


def day_name(day: date) -> str:
    """A partition's name: ``events_p`` and the first day it holds."""
    return f"events_p{day:%Y%m%d}"


def period_start(day: date, span_days: int) -> date:
    """The first day of the ``span_days``-day period holding ``day``: periods are aligned on
    Mondays (date.toordinal() 1, 0001-01-01, was a Monday), so a 7-day span is an ISO week."""
    ordinal = day.toordinal()
    return date.fromordinal(ordinal - (ordinal - 1) % span_days)


def midnight(day: date) -> datetime:
    return datetime.combine(day, time(), UTC)


async def is_partitioned(conn: psycopg.AsyncConnection[Any]) -> bool:
    cur = await conn.execute(
        "SELECT 1 FROM pg_partitioned_table p JOIN pg_class c ON c.oid = p.partrelid"
        " WHERE c.oid = to_regclass('events')"
    )
    return await cur.fetchone() is not None


async def list_partitions(conn: psycopg.AsyncConnection[Any]) -> list[Partition]:
    """The partitions of ``events``, oldest first, the default one last."""
    async with conn.transaction():
        # Bounds are printed in the session's time zone: UTC, so that they parse the same.
        await conn.execute("SET LOCAL TimeZone = 'UTC'")
        cur = await conn.execute(
            "SELECT c.relname, pg_get_expr(c.relpartbound, c.oid), c.reltuples::bigint"
            " FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid"
            " WHERE i.inhparent = to_regclass('events')"
        )
        rows = await cur.fetchall()
    parts = [_partition(str(r[0]), str(r[1]), int(r[2])) for r in rows]
    return sorted(parts, key=lambda p: (p.is_default, p.lower or datetime.min.replace(tzinfo=UTC)))


async def create_ahead(
    conn: psycopg.AsyncConnection[Any],
    now: datetime,
    days: int = DEFAULT_DAYS_AHEAD,
    span_days: int = SPAN_DAYS,
    *,
    wait: bool = True,
) -> list[str] | None:
    """Make the partitions (``span_days`` days each) holding ``now``'s day to ``days`` days
    ahead; the names made. A period that overlaps an existing partition is left alone.
    ``wait=False``: None at once when another session holds ``PARTITION_LOCK``."""
    made: list[str] = []
    async with conn.transaction():
        if not wait:
            cur = await conn.execute("SELECT pg_try_advisory_xact_lock(%s)", (PARTITION_LOCK,))
            got = await cur.fetchone()
            if not (got and got[0]):
                return None
        await conn.execute("SELECT pg_advisory_xact_lock(%s)", (PARTITION_LOCK,))
        existing = await list_partitions(conn)
        today = now.astimezone(UTC).date()
        starts = sorted(
            {period_start(today + timedelta(days=d), span_days) for d in range(days + 1)}
        )
        for start in starts:
            gap = _gap(existing, midnight(start), midnight(start + timedelta(days=span_days)))
            if gap is None:
                continue
            lo, hi = gap
            await _create_day(conn, lo.date(), lo, hi)
            existing.append(Partition(day_name(lo.date()), lo, hi, False, 0))
            made.append(day_name(lo.date()))
    if made:
        log.info("store.partitions.created names=%s", ",".join(made))
    return made


async def drop_older(
    conn: psycopg.AsyncConnection[Any], now: datetime, days: int
) -> tuple[list[str], int]:
    """Drop the partitions wholly older than ``days`` days before ``now``'s day (UTC), with their
    idempotency keys, and delete the default partition's rows that old. The names dropped and
    the number of strays deleted from the default partition."""
    if days < 1:
        raise ValueError(f"retention days must be at least 1, not {days}")
    cutoff = midnight(now.astimezone(UTC).date() - timedelta(days=days))
    dropped: list[str] = []
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock(%s)", (PARTITION_LOCK,))
        due = [
            p.name
            for p in await list_partitions(conn)
            if not p.is_default and p.upper is not None and p.upper <= cutoff
        ]
    for name in due:
        # One transaction a partition: its keys and rows go together (a key without its row
        # would let a resend in twice), and DROP's exclusive lock on events is held only
        # from the drop to the commit, not while the keys are deleted.
        async with conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock(%s)", (PARTITION_LOCK,))
            cur = await conn.execute("SELECT to_regclass(%s)", (name,))
            found = await cur.fetchone()
            if found is None or found[0] is None:
                continue  # dropped meanwhile by another instance or the CLI
            table = sql.Identifier(name)
            await conn.execute(
                sql.SQL(
                    "DELETE FROM event_keys k USING {} p"
                    " WHERE k.store_id = p.store_id AND k.event_id = p.event_id"
                ).format(table)
            )
            await conn.execute(sql.SQL("DROP TABLE {}").format(table))
        dropped.append(name)
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock(%s)", (PARTITION_LOCK,))
        cur = await conn.execute(
            "WITH gone AS (DELETE FROM events_default WHERE ingested_at < %s"
            " RETURNING store_id, event_id), keys AS (DELETE FROM event_keys k USING gone g"
            " WHERE k.store_id = g.store_id AND k.event_id = g.event_id)"
            " SELECT count(*) FROM gone",
            (cutoff,),
        )
        counted = await cur.fetchone()
        strays = int(counted[0]) if counted else 0
    log.info(
        "store.partitions.dropped cutoff=%s names=%s strays=%d",
        cutoff.isoformat(),
        ",".join(dropped),
        strays,
    )
    return dropped, strays


async def _create_day(
    conn: psycopg.AsyncConnection[Any], day: date, lo: datetime, hi: datetime
) -> None:
    """One day's partition; that day's strays move out of the default partition first (a new
    partition cannot be made over rows the default one holds)."""
    table = sql.Identifier(day_name(day))
    await conn.execute("CREATE TEMPORARY TABLE strays (LIKE events) ON COMMIT DROP")
    await conn.execute(
        "WITH moved AS (DELETE FROM events_default WHERE ingested_at >= %s AND ingested_at < %s"
        " RETURNING *) INSERT INTO strays SELECT * FROM moved",
        (lo, hi),
    )
    await conn.execute(
        sql.SQL("CREATE TABLE {} PARTITION OF events FOR VALUES FROM ({}) TO ({})").format(
            table, sql.Literal(lo), sql.Literal(hi)
        )
    )
    cur = await conn.execute("INSERT INTO events OVERRIDING SYSTEM VALUE SELECT * FROM strays")
    if cur.rowcount:
        log.warning("store.partitions.drained name=%s rows=%d", day_name(day), cur.rowcount)
    await conn.execute("DROP TABLE strays")


def _gap(existing: list[Partition], lo: datetime, hi: datetime) -> tuple[datetime, datetime] | None:
    """The part of [lo, hi) no partition holds yet, from its start (a period that begins
    inside ``events_legacy`` or an older, shorter partition gets only its remaining days)."""
    bounded = [p for p in existing if not p.is_default]
    moved = True
    while moved and lo < hi:
        moved = False
        for part in bounded:
            if (part.lower is None or part.lower <= lo) and (part.upper is None or part.upper > lo):
                lo, moved = part.upper if part.upper is not None else hi, True
    for part in bounded:
        if part.lower is not None and lo < part.lower < hi:
            hi = part.lower
    return (lo, hi) if lo < hi else None


def _partition(name: str, bound: str, rows: int) -> Partition:
    if bound == "DEFAULT":
        return Partition(name, None, None, True, rows)
    match = _BOUND.fullmatch(bound)
    if match is None:
        raise ValueError(f"events partition {name}: unexpected bound {bound!r}")
    return Partition(name, _bound_value(match.group(1)), _bound_value(match.group(2)), False, rows)


def _bound_value(text: str) -> datetime | None:
    if text in ("MINVALUE", "MAXVALUE"):
        return None
    return datetime.fromisoformat(text.strip("'")).astimezone(UTC)
