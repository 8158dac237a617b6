"""The heartbeat table's SQL, shared by both backends (``%s`` placeholders; SQLite swaps them)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime
from typing import Any, Final

from cloud_sync.store.fleet import Heartbeat

# A report older than the one stored (a retry that arrives late) does not replace it.
UPSERT_HEARTBEAT: Final = (
    "INSERT INTO agent_heartbeats (store_id, credential_id, received_at, clock_skew_s, report)"
    " VALUES (%s, %s, %s, %s, %s) ON CONFLICT (store_id) DO UPDATE SET"
    " credential_id = excluded.credential_id, received_at = excluded.received_at,"
    " clock_skew_s = excluded.clock_skew_s, report = excluded.report"
    " WHERE excluded.received_at >= agent_heartbeats.received_at"
)
SELECT_HEARTBEATS: Final = (
    "SELECT store_id, credential_id, received_at, clock_skew_s, report FROM agent_heartbeats"
    " ORDER BY store_id"
)


def heartbeat_params(heartbeat: Heartbeat, received_at: object) -> tuple[Any, ...]:
    return (
        heartbeat.store_id,
        heartbeat.credential_id,
        received_at,
        heartbeat.clock_skew_s,
        json.dumps(heartbeat.report, sort_keys=True),
    )


def heartbeat(row: Sequence[Any], received_at: datetime, report: dict[str, Any]) -> Heartbeat:
    skew = row[3]
    return Heartbeat(
        store_id=str(row[0]),
        credential_id=None if row[1] is None else int(row[1]),
        received_at=received_at,
        clock_skew_s=None if skew is None else float(skew),
        report=report,
    )
