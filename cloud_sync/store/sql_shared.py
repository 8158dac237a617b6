"""SQL text and row shaping that both backends share, so their answers cannot drift apart.

Only portable SQL lives here (it runs on SQLite and PostgreSQL alike, ``%s`` placeholders that
SQLite's backend rewrites to ``?``); dialect-specific queries stay in each backend.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from datetime import date, datetime, timedelta
from typing import Any, Final, TypeVar, cast

from cloud_sync.store.errors import ModelPublishError
from cloud_sync.store.records import (
    Credential,
    EventRow,
    IdentityChange,
    Kind,
    ModelRecord,
    Principal,
    ShownRow,
    Stats,
    StoredEvent,
    format_ts,
)

T = TypeVar("T")

# UNION (not UNION ALL) stops at ids already seen, so a cycle of aliases terminates.
# An identity graph larger than this is a data problem, not a customer; stop walking it.
MAX_IDENTITIES: Final = 256

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
# The audit trail of consent and link changes (see ``trust``); receipt order is ``id``.
INSERT_CONSENT_CHANGE: Final = (
    "INSERT INTO identity_changes (kind, customer_id, flags, event_id, store_id, credential_id,"
    " event_ts, received_at, status) VALUES ('consent', %s, %s, %s, %s, %s, %s, %s, 'applied')"
    " ON CONFLICT (store_id, event_id) DO NOTHING"
)
INSERT_LINK_CHANGE: Final = (
    "INSERT INTO identity_changes (kind, customer_id, alias, method, event_id, store_id,"
    " credential_id, event_ts, received_at, status, reason)"
    " VALUES ('link', %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)"
    " ON CONFLICT (store_id, event_id) DO NOTHING"
)
HELD_SAME_LINK: Final = (
    "SELECT id FROM identity_changes WHERE kind = 'link' AND status = 'held' AND store_id <> %s"
    " AND ((customer_id = %s AND alias = %s) OR (customer_id = %s AND alias = %s))"
)
ADD_LINK: Final = (
    "INSERT INTO identity_links (a, b) VALUES (%s, %s), (%s, %s) ON CONFLICT DO NOTHING"
)
# Undoing one link change removes the edge only when no other applied change asserts it.
REMOVE_LINK: Final = (
    "DELETE FROM identity_links WHERE ((a = %s AND b = %s) OR (a = %s AND b = %s))"
    " AND NOT EXISTS (SELECT 1 FROM identity_changes c WHERE c.kind = 'link'"
    " AND c.status = 'applied' AND ((c.customer_id = identity_links.a"
    " AND c.alias = identity_links.b) OR (c.customer_id = identity_links.b"
    " AND c.alias = identity_links.a)))"
)
SET_CHANGE_STATUS: Final = (
    "UPDATE identity_changes SET status = %s, reason = %s, decided_at = %s, decided_by = %s"
    " WHERE id = %s"
)
CHANGE_COLUMNS: Final = (
    "id, kind, customer_id, alias, method, flags, event_id, store_id, credential_id,"
    " event_ts, received_at, status, reason, decided_at, decided_by"
)
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


def links(rows: Sequence[EventRow]) -> list[EventRow]:
    """The rows that claim a link between two different ids, in batch order."""
    return [r for r in rows if r.alias and r.customer_id and r.alias != r.customer_id]


def consents(rows: Sequence[EventRow]) -> list[EventRow]:
    return [r for r in rows if r.type == "consent.update" and r.customer_id is not None]


def identity_change(row: Sequence[Any], ts: Callable[[Any], datetime]) -> IdentityChange:
    """A row of CHANGE_COLUMNS; ``ts`` turns the backend's time values into datetimes."""
    return IdentityChange(
        change_id=int(row[0]),
        kind=str(row[1]),
        customer_id=str(row[2]),
        alias=row[3],
        method=row[4],
        flags=None if row[5] is None else json.loads(row[5]),
        event_id=str(row[6]),
        store_id=str(row[7]),
        credential_id=None if row[8] is None else int(row[8]),
        event_ts=ts(row[9]),
        received_at=ts(row[10]),
        status=str(row[11]),
        reason=str(row[12]),
        decided_at=None if row[13] is None else ts(row[13]),
        decided_by=row[14],
    )


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


# The rollout (migration 4): one state row, and a log of every change to it.
ROLLOUT_STATE: Final = (
    "SELECT current_version, canary_version, canary_percent, canary_since FROM model_rollout"
    " WHERE id = 1"
)
UPSERT_ROLLOUT: Final = (
    "INSERT INTO model_rollout (id, current_version, canary_version, canary_percent,"
    " canary_since, updated_at) VALUES (1, %s, %s, %s, %s, %s) ON CONFLICT (id) DO UPDATE SET"
    " current_version = excluded.current_version, canary_version = excluded.canary_version,"
    " canary_percent = excluded.canary_percent, canary_since = excluded.canary_since,"
    " updated_at = excluded.updated_at"
)
INSERT_ROLLOUT_LOG: Final = (
    "INSERT INTO model_rollout_log (action, version, percent, reason, decided_by, at)"
    " VALUES (%s, %s, %s, %s, %s, %s)"
)
ROLLOUT_LOG: Final = (
    "SELECT id, action, version, percent, reason, decided_by, at FROM model_rollout_log"
    " ORDER BY id DESC LIMIT %s"
)
MODEL_RECORD: Final = (
    "SELECT version, sha256, size, manifest, published_at FROM models WHERE version = %s"
)


class ShownGrouper:
    """Rows of a shown LEFT JOIN accepted query, in shown seq order, one row per acceptance:
    (shown seq, store_id, suggestion_id, data, acceptance seq or None, accepted sku). Fed row
    by row, it hands back each suggestion as one ShownRow once its rows are complete."""

    def __init__(self) -> None:
        self._head: tuple[Any, str, Any, Any] | None = None
        self._skus: list[str | None] = []

    def feed(self, row: Sequence[Any]) -> ShownRow | None:
        seq, store_id, suggestion_id, data, accepted_seq, sku = row
        done = None
        if self._head is None or self._head[0] != seq:
            done = self.finish()
            self._head = (seq, str(store_id), suggestion_id, data)
        if accepted_seq is not None:
            self._skus.append(sku if isinstance(sku, str) else None)
        return done

    def finish(self) -> ShownRow | None:
        head, skus = self._head, self._skus
        self._head, self._skus = None, []
        if head is None:
            return None
        _, store_id, suggestion_id, data = head
        if isinstance(data, str):
            data = json.loads(data)  # SQLite hands JSON back as text
        if not isinstance(suggestion_id, str) or not isinstance(data, dict):
            return None  # the registry requires both; such a row says nothing
        return ShownRow(store_id, suggestion_id, data, tuple(skus))


def shown_rows(rows: Iterable[Sequence[Any]]) -> Iterator[ShownRow]:
    """``ShownGrouper`` over an iterable of rows, streamed."""
    grouper = ShownGrouper()
    for row in rows:
        done = grouper.feed(row)
        if done is not None:
            yield done
    last = grouper.finish()
    if last is not None:
        yield last
