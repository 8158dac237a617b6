"""The buffer's read queries for the parts beside the pipeline (personalizer, uploader).

Each runs on the owner thread (``Buffer`` wraps them) and returns plain typed rows, so no
module outside this package knows the tables. The writes live in ``writes``, erasure in
``erasure``, the small key/value table in ``meta``.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Collection
from typing import Final, NamedTuple

from edge_agent.governance import CentralGrant, ConsentRecord

CUSTOMER: Final = 1  # the ``customer`` column: a customer interaction
TELEMETRY: Final = 0

_PENDING: Final = (
    "SELECT seq, envelope, customer_id FROM events "
    "WHERE synced_at IS NULL AND customer = ? AND seq > ? "
)


class PendingRow(NamedTuple):
    """An unsynced event as the uploader reads it (the upload rule is governance's)."""

    seq: int
    envelope: str
    customer: bool = True  # a customer event (False: telemetry), the buffer's column
    customer_id: str | None = None  # the buffer's column (the envelope's customer_id)


class StateRow(NamedTuple):
    """A recent customer event for rebuilding sessions: (customer id, type, envelope)."""

    customer_id: str
    type: str
    envelope: str


class PopularRow(NamedTuple):
    seq: int
    received_at: float
    sku: object  # whatever ``data.sku`` holds; the caller keeps strings only


def pending(
    connection: sqlite3.Connection, limit: int, cursors: dict[int, int]
) -> list[PendingRow]:
    """Up to ``limit`` unsynced rows past each class's cursor: customer events first, each
    class oldest first."""
    rows: list[PendingRow] = []
    for kind in (CUSTOMER, TELEMETRY):
        found = connection.execute(
            _PENDING + "ORDER BY seq LIMIT ?", (kind, cursors[kind], limit - len(rows))
        ).fetchall()
        rows += [PendingRow(seq, text, kind == CUSTOMER, cid) for seq, text, cid in found]
        if len(rows) >= limit:
            break
    return rows


def newest_pending(
    connection: sqlite3.Connection, limit: int, after: int, taken: Collection[int]
) -> list[PendingRow]:
    """The newest ``limit`` unsynced customer events past ``after`` and not in ``taken``,
    oldest first among them."""
    found = connection.execute(
        _PENDING + "ORDER BY seq DESC LIMIT ?", (CUSTOMER, after, limit + len(taken))
    ).fetchall()
    fresh = [PendingRow(seq, text, True, cid) for seq, text, cid in found]
    fresh = [row for row in fresh if row.seq not in taken]
    return list(reversed(fresh[:limit]))


def oldest_pending(connection: sqlite3.Connection) -> float | None:
    """The receive time (unix s) of the oldest unsynced event; one indexed read per class."""
    oldest: float | None = None
    for customer in (TELEMETRY, CUSTOMER):
        row = connection.execute(
            "SELECT received_at FROM events WHERE synced_at IS NULL AND customer = ? "
            "ORDER BY seq LIMIT 1",
            (customer,),
        ).fetchone()
        if row is not None:
            oldest = float(row[0]) if oldest is None else min(oldest, float(row[0]))
    return oldest


def newest_seq(connection: sqlite3.Connection) -> int:
    return int(connection.execute("SELECT max(seq) FROM events").fetchone()[0] or 0)


def consent(connection: sqlite3.Connection) -> list[ConsentRecord]:
    """The latest consent per customer (``governance.ConsentLedger`` loads it)."""
    return [
        ConsentRecord(cid, bool(personal), bool(profile), bool(partner), ts, event_id)
        for cid, personal, profile, partner, ts, event_id in connection.execute(
            "SELECT customer_id, personalization, profile_sharing, partner_sharing, ts, event_id "
            "FROM consent"
        )
    ]


def central_grants(connection: sqlite3.Connection) -> list[CentralGrant]:
    """The consents granted by the central store (``ConsentLedger.load_central`` loads them)."""
    return [
        CentralGrant(str(cid), str(ts), int(after_seq))
        for cid, ts, after_seq in connection.execute(
            "SELECT customer_id, ts, after_seq FROM central_consent"
        )
    ]


def recent_customer_events(
    connection: sqlite3.Connection, types: Collection[str], since: float, max_rows: int
) -> list[StateRow]:
    """Customer events of ``types`` received since ``since`` among the newest ``max_rows``
    rows (a seq range scan, so a start on a full buffer stays quick), oldest first."""
    newest = newest_seq(connection)
    if newest == 0:
        return []
    marks = ",".join("?" * len(types))
    return [
        StateRow(*row)
        for row in connection.execute(
            f"SELECT customer_id, type, envelope FROM events WHERE seq > ? AND received_at >= ? "
            f"AND customer_id IS NOT NULL AND type IN ({marks}) ORDER BY seq",
            (newest - max_rows, since, *sorted(types)),
        )
    ]


def items_taken(
    connection: sqlite3.Connection, types: Collection[str], after_seq: int, since: float
) -> list[PopularRow]:
    """(seq, received_at, data.sku) of events of ``types`` past ``after_seq``, oldest first."""
    marks = ",".join("?" * len(types))
    return [
        PopularRow(*row)
        for row in connection.execute(
            f"SELECT seq, received_at, json_extract(envelope, '$.data.sku') FROM events "
            f"WHERE seq > ? AND received_at >= ? AND type IN ({marks}) ORDER BY seq",
            (after_seq, since, *types),
        )
    ]


def held_customers(connection: sqlite3.Connection) -> list[str]:
    """Every clear customer id the buffer holds (events or consent records)."""
    return [
        row[0]
        for row in connection.execute(
            "SELECT DISTINCT customer_id FROM events WHERE customer_id IS NOT NULL "
            "UNION SELECT customer_id FROM consent"
            " UNION SELECT customer_id FROM central_consent"
        )
    ]


class Withdrawals(NamedTuple):
    """Customers now without profile sharing whose consent changed in the rows read, each
    with the envelopes of their ``customer.identified`` events (their aliases)."""

    customers: list[tuple[str, list[str]]]
    last_seq: int  # the last seq looked at


def withdrawals_since(connection: sqlite3.Connection, after: int, limit: int) -> Withdrawals:
    rows = connection.execute(
        "SELECT seq, customer_id FROM events WHERE seq > ? AND type = 'consent.update'"
        " AND customer_id IS NOT NULL ORDER BY seq LIMIT ?",
        (after, limit),
    ).fetchall()
    if not rows:
        return Withdrawals([], after)
    withdrawn: list[tuple[str, list[str]]] = []
    for customer_id in sorted({str(row[1]) for row in rows}):
        sharing = connection.execute(
            "SELECT profile_sharing FROM consent WHERE customer_id = ?", (customer_id,)
        ).fetchone()
        if sharing is None or sharing[0]:
            continue  # erased meanwhile, or sharing again
        identified = [
            str(envelope)
            for (envelope,) in connection.execute(
                "SELECT envelope FROM events WHERE customer_id = ?"
                " AND type = 'customer.identified'",
                (customer_id,),
            )
        ]
        withdrawn.append((customer_id, identified))
    return Withdrawals(withdrawn, int(rows[-1][0]))
