"""Erasing a customer from the buffer: events, consent record, quarantined payloads.

Used by the running agent (an erasure request from the store, through ``Buffer.erase``) and
by ``edge-agent buffer erase`` on the file beside it (WAL lets both work at once).
"""

from __future__ import annotations

import functools
import re
import sqlite3
from collections import Counter
from collections.abc import Sequence
from typing import Final

from edge_agent.buffer import meta
from edge_agent.buffer.writes import transaction

# Characters that may continue an id: an occurrence next to one is part of another id.
_ID_CHAR: Final = rb"[A-Za-z0-9._:@+-]"


@functools.lru_cache(maxsize=64)
def _whole_id(customer_id: str) -> re.Pattern[bytes]:
    escaped = re.escape(customer_id.encode("utf-8"))
    return re.compile(rb"(?<!" + _ID_CHAR + rb")" + escaped + rb"(?!" + _ID_CHAR + rb")")


def names_id(raw: bytes | None, customer_id: str) -> bool:
    """Whether raw bytes (JSON, a serial frame, noise) hold ``customer_id`` as a whole id:
    erasing ``c-erase`` must not touch a payload about ``c-erase0``."""
    if raw is None or not customer_id:
        return False
    return _whole_id(customer_id).search(bytes(raw)) is not None


def erase_customer(connection: sqlite3.Connection, customer_id: str) -> dict[str, int]:
    """Delete every trace of a customer in one transaction; return what was deleted."""
    with transaction(connection):
        deleted = _erase(connection, customer_id)
    del deleted["pending"]
    return deleted


def erase_customers(
    connection: sqlite3.Connection,
    customer_ids: Sequence[str],
    cursor: tuple[str, str] | None = None,
) -> Counter[str]:
    """Erase these customers and keep ``cursor`` (a meta key and value), in one transaction.

    Returns the totals: ``events``, ``pending`` (of them not yet synced), ``consent``,
    ``quarantine``.
    """
    totals: Counter[str] = Counter()
    with transaction(connection):
        for customer_id in customer_ids:
            totals.update(_erase(connection, customer_id))
        if cursor is not None:
            meta.write(connection, *cursor)
    return totals


def _erase(connection: sqlite3.Connection, customer_id: str) -> dict[str, int]:
    pending = connection.execute(
        "SELECT count(*) FROM events WHERE customer_id = ? AND synced_at IS NULL", (customer_id,)
    ).fetchone()[0]
    events = connection.execute("DELETE FROM events WHERE customer_id = ?", (customer_id,)).rowcount
    consent = connection.execute(
        "DELETE FROM consent WHERE customer_id = ?", (customer_id,)
    ).rowcount
    consent += connection.execute(
        "DELETE FROM central_consent WHERE customer_id = ?", (customer_id,)
    ).rowcount
    # Raw quarantined payloads may name the customer too; whole ids only (see names_id).
    connection.create_function("names_id", 2, names_id, deterministic=True)
    quarantine = connection.execute(
        "DELETE FROM quarantine WHERE instr(raw, ?) > 0 AND names_id(raw, ?)",
        (customer_id.encode("utf-8"), customer_id),
    ).rowcount
    return {"events": events, "pending": pending, "consent": consent, "quarantine": quarantine}
