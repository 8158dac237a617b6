"""``customer-store partitions list|create-ahead|drop-older``: PostgreSQL event partitions.

Split from ``cli`` (which wires every command). Retention is ``drop-older --days N`` run daily
(a systemd timer or cron, see docs/scaling.md): it drops whole partitions (ingest weeks) of
``events`` and their idempotency keys, never consent, link, erasure or credential records.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

from cloud_sync.store.backend import Backend
from cloud_sync.store.errors import StoreError


def partition_parsers(
    commands: Any, with_db: Callable[[argparse.ArgumentParser], argparse.ArgumentParser]
) -> None:
    group = commands.add_parser(
        "partitions", help="PostgreSQL events partitions (by ingest time) and retention"
    ).add_subparsers(dest="action", required=True)
    with_db(group.add_parser("list", help="one JSON object per partition, oldest first"))
    ahead = with_db(
        group.add_parser("create-ahead", help="make the partitions holding today to N days ahead")
    )
    ahead.add_argument("--days", type=_days, default=7, help="default %(default)s")
    drop = with_db(
        group.add_parser(
            "drop-older",
            help="drop the events ingested more than N days before today (UTC), whole days;"
            " consent, link, erasure and credential records stay",
        )
    )
    drop.add_argument("--days", type=_days, required=True)


def partition_command(args: argparse.Namespace) -> Callable[[Backend], Awaitable[str]]:
    async def work(b: Backend) -> str:
        # psycopg is the [store] extra: imported only when the command runs.
        from cloud_sync.store.db_postgres import PostgresBackend

        if not isinstance(b, PostgresBackend):
            raise StoreError("partitions: PostgreSQL only (SQLite keeps one events table)")
        now = datetime.now(UTC)
        if args.action == "list":
            return "\n".join(
                json.dumps(p.as_json(), sort_keys=True) for p in await b.partition_list()
            )
        if args.action == "create-ahead":
            made = await b.partitions_create_ahead(now, args.days)
            return json.dumps({"created": made}, sort_keys=True)
        dropped, strays = await b.partitions_drop_older(now, args.days)
        return json.dumps({"dropped": dropped, "default_rows_deleted": strays}, sort_keys=True)

    return work


def _days(text: str) -> int:
    value = int(text)
    if not 1 <= value <= 3650:
        raise argparse.ArgumentTypeError(f"--days {value}: expected 1..3650")
    return value
