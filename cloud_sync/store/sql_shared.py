"""SQL text and row shaping that both backends share, so their answers cannot drift apart.

Only portable SQL lives here (it runs on SQLite and PostgreSQL alike, ``%s`` placeholders that
SQLite's backend rewrites to ``?``); dialect-specific queries stay in each backend.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from datetime import date, datetime, timedelta
from typing import Any, Final, TypeVar, cast

from cloud_sync.store.errors import ModelPublishError
from cloud_sync.store.records import (
    Credential,
    EventRow,
    Kind,
    ModelRecord,
    Principal,
    Stats,
    StoredEvent,
    format_ts,
)

T = TypeVar("T")

# UNION (not UNION ALL) stops at ids already seen, so a cycle of aliases terminates.
IDENTITIES: Final = (
    "WITH RECURSIVE ids(id) AS (SELECT CAST(%s AS TEXT)"
    " UNION SELECT l.b FROM identity_links l JOIN ids ON l.a = ids.id)"
    " SELECT id FROM ids LIMIT %s"
)
ENVELOPE_COLUMNS: Final = (
    "event_id, type, ts, store_id, device_id, customer_id, source, schema, data, received_at"
)
STATS_QUERIES: Final[Mapping[str, str]] = {
    "events": "SELECT count(*) FROM events",
    "customers": "SELECT count(DISTINCT customer_id) FROM events",
    "stores": "SELECT count(DISTINCT store_id) FROM events",
    "erasures": "SELECT count(*) FROM erasures",
    "models": "SELECT count(*) FROM models",
}
CREDENTIAL_COUNTS: Final = (
    "SELECT kind, count(*) FROM credentials WHERE revoked_at IS NULL GROUP BY kind"
)


def principal(row: Sequence[Any]) -> Principal:
    """A ``credentials`` row (id, kind, name, store_id, scopes) as a Principal."""
    scopes = frozenset(s for s in str(row[4]).split() if s)
    return Principal(int(row[0]), cast(Kind, row[1]), str(row[2]), row[3], scopes)


# requested_by of the erasures an agent reported (POST /v1/erasures/pseudonyms).
AGENT_REPORT_PREFIX: Final = "agent:"
AGENT_REPORT_PATTERN: Final = AGENT_REPORT_PREFIX + "%"
WITHOUT_AGENT_REPORTS: Final = " AND requested_by NOT LIKE %s"
CREDENTIAL_COLUMNS: Final = "id, kind, name, store_id, scopes, created_at, revoked_at"


def credential(row: Sequence[Any], created_at: datetime, revoked_at: datetime | None) -> Credential:
    """A CREDENTIAL_COLUMNS row (times already decoded by the backend) as a Credential."""
    scopes = frozenset(s for s in str(row[4]).split() if s)
    return Credential(
        int(row[0]), cast(Kind, row[1]), str(row[2]), row[3], scopes, created_at, revoked_at
    )


def pairs_both_ways(links: Sequence[Sequence[Any]]) -> list[tuple[str, str]]:
    """(customer_id, alias) rows of customer.identified events as links both ways."""
    pairs: list[tuple[str, str]] = []
    for a, b in links:
        if isinstance(a, str) and isinstance(b, str) and a and b and a != b:
            pairs += [(a, b), (b, a)]
    return pairs


def stored_event(seq: int, ts: datetime, cols: Sequence[Any], data: Any) -> StoredEvent:
    """Rebuild the envelope from ENVELOPE_COLUMNS (``data`` already decoded)."""
    envelope: dict[str, Any] = {
        "event_id": cols[0],
        "type": cols[1],
        "ts": format_ts(ts),
        "store_id": cols[3],
        "device_id": cols[4],
        "customer_id": cols[5],
        "source": cols[6],
        "schema": int(cols[7]),
        "data": data,
    }
    if cols[9] is not None:
        envelope["received_at"] = cols[9]
    return StoredEvent(int(seq), ts, envelope)


def without_erased(rows: Sequence[EventRow], erased_at: Mapping[str, datetime]) -> list[EventRow]:
    """Drop events of erased customers that happened before the erasure.

    An agent may upload an event it buffered before it learned of the erasure; storing it
    would bring the customer back. Events after the erasure are a new relationship and kept.
    """
    if not erased_at:
        return list(rows)
    return [
        r
        for r in rows
        if r.customer_id is None
        or r.customer_id not in erased_at
        or r.ts > erased_at[r.customer_id]
    ]


def link_pairs(rows: Sequence[EventRow]) -> list[tuple[str, str]]:
    """Both directions of every alias link, so the identity walk needs one join."""
    pairs: list[tuple[str, str]] = []
    for r in rows:
        if r.alias and r.customer_id and r.alias != r.customer_id:
            pairs += [(r.customer_id, r.alias), (r.alias, r.customer_id)]
    return pairs


def check_republish(record: ModelRecord, existing_sha256: str) -> bool:
    """Publishing a version again is a no-op when identical and an error when not."""
    if existing_sha256 == record.sha256:
        return False
    raise ModelPublishError(
        f"model version {record.version!r} already published with sha256 {existing_sha256};"
        " publish a new version instead"
    )


def collect_stats(counts: Mapping[str, int], credentials: Sequence[Sequence[Any]]) -> Stats:
    return Stats(
        events=counts["events"],
        customers=counts["customers"],
        stores=counts["stores"],
        erasures=counts["erasures"],
        models=counts["models"],
        credentials={str(kind): int(n) for kind, n in credentials},
    )


def day_after(day: date) -> str:
    return (day + timedelta(days=1)).isoformat()


def chunks(items: Sequence[T], size: int) -> Iterator[Sequence[T]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]
