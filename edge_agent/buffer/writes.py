"""The writer's rows and statements: the transaction helper, event rows, quarantine,
consent and persisted counters (each runs inside the caller's transaction), and the
quarantine row for an event SQLite cannot store."""

from __future__ import annotations

import contextlib
import json
import logging
import sqlite3
from collections import Counter
from collections.abc import Iterator, Sequence
from typing import Any, Final

import msgspec

from edge_agent.config import BufferSection
from edge_agent.events import Event, Rejected
from edge_agent.governance import CentralGrant, ConsentRecord, consent_of

log = logging.getLogger(__name__)

UNSTORABLE: Final = "unstorable"
# The envelope's text, written for every event on the owner thread (under the GIL the event
# loop needs): msgspec writes the same compact JSON as ``Event.to_json`` several times faster.
# Floats may be spelled differently (``1e16``, not ``1e+16``): the same numbers.
_ENVELOPE: Final = msgspec.json.Encoder()


def quarantine(
    connection: sqlite3.Connection, rejects: Sequence[Rejected], settings: BufferSection
) -> None:
    if not rejects:
        return
    limit = settings.quarantine_raw_bytes
    connection.executemany(
        "INSERT INTO quarantine (received_at, source, reason, detail, raw, raw_len) "
        "VALUES (?, ?, ?, ?, ?, ?)",
        [
            (r.received_at, r.source, r.reason, r.detail[:500], r.raw[:limit], len(r.raw))
            for r in rejects
        ],
    )
    # Bounded by rows too: a flood of garbage cannot crowd out events.
    connection.execute(
        "DELETE FROM quarantine WHERE id <= (SELECT max(id) FROM quarantine) - ?",
        (settings.quarantine_max_rows,),
    )


def record_consent(connection: sqlite3.Connection, events: Sequence[Event]) -> None:
    """The durable copy of the consent updates among ``events`` (governance reads them)."""
    record_consent_rows(connection, [c for e in events if (c := consent_of(e)) is not None])


def record_consent_rows(connection: sqlite3.Connection, updates: Sequence[ConsentRecord]) -> None:
    if updates:
        # The latest consent (by event time) wins, whatever order they arrive in.
        connection.executemany(
            "INSERT INTO consent VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (customer_id) DO UPDATE "
            "SET personalization=excluded.personalization, "
            "profile_sharing=excluded.profile_sharing, "
            "partner_sharing=excluded.partner_sharing, "
            "ts=excluded.ts, event_id=excluded.event_id WHERE excluded.ts >= consent.ts",
            updates,
        )


def grant_central(connection: sqlite3.Connection, customer_id: str, ts: str) -> CentralGrant | None:
    """Keep the central store's consent for a customer without a local record, as of the
    newest event committed now (the owner thread commits nothing in between); a grant already
    kept stays as it was (its ``after_seq`` too). None when a local record exists: it wins."""
    with transaction(connection):
        if connection.execute(
            "SELECT 1 FROM consent WHERE customer_id = ?", (customer_id,)
        ).fetchone():
            return None
        connection.execute(
            "INSERT INTO central_consent (customer_id, ts, after_seq) "
            "VALUES (?, ?, (SELECT coalesce(max(seq), 0) FROM events)) "
            "ON CONFLICT (customer_id) DO NOTHING",
            (customer_id, ts),
        )
        row = connection.execute(
            "SELECT ts, after_seq FROM central_consent WHERE customer_id = ?", (customer_id,)
        ).fetchone()
    return CentralGrant(customer_id, str(row[0]), int(row[1]))


def revoke_central(connection: sqlite3.Connection, customer_id: str) -> bool:
    """Drop a central grant (the store withdrew it); whether there was one."""
    with transaction(connection):
        return (
            connection.execute(
                "DELETE FROM central_consent WHERE customer_id = ?", (customer_id,)
            ).rowcount
            > 0
        )


def persist_counters(
    connection: sqlite3.Connection, dropped: Counter[str], rejects: Sequence[Rejected]
) -> None:
    increments: Counter[str] = Counter({f"drop.{k}": v for k, v in dropped.items()})
    increments.update(f"quarantine.{reject.reason}" for reject in rejects)
    if increments:
        connection.executemany(
            "INSERT INTO counters (name, value) VALUES (?, ?) "
            "ON CONFLICT (name) DO UPDATE SET value = value + excluded.value",
            list(increments.items()),
        )


@contextlib.contextmanager
def transaction(connection: sqlite3.Connection) -> Iterator[None]:
    """BEGIN IMMEDIATE ... COMMIT; rolled back on any exception, including cancellation."""
    connection.execute("BEGIN IMMEDIATE")
    try:
        yield
        if connection.in_transaction:
            connection.execute("COMMIT")
    except BaseException:
        rollback(connection)
        raise


def rollback(connection: sqlite3.Connection) -> None:
    if not connection.in_transaction:
        return
    try:
        connection.execute("ROLLBACK")
    except sqlite3.Error as exc:  # SQLite may have rolled back already (SQLITE_FULL does)
        log.warning("buffer.rollback.failed error=%s", exc)


def clean(text: str) -> str:
    """Text SQLite can store: lone surrogates and the like as backslash escapes."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def as_unstorable(item: Event | Rejected, detail: str) -> Rejected:
    if isinstance(item, Rejected):
        text = clean(f"{item.reason}: {item.detail}: {detail}")
        return Rejected(clean(item.source), UNSTORABLE, item.raw, text, clean(item.received_at))
    try:
        raw = json.dumps(item.envelope(), ensure_ascii=True).encode("ascii")
    except (ValueError, TypeError, RecursionError):
        raw = ascii(item.envelope()).encode("ascii")
    return Rejected(
        clean(item.source), UNSTORABLE, raw, clean(detail), clean(str(item.received_at))
    )


def event_row(event: Event, written_at: float) -> tuple[Any, ...]:
    return (
        event.event_id,
        event.type,
        int(event.customer),
        event.customer_id,
        event.ts,
        written_at,  # within milliseconds of receipt; used for age figures only
        envelope_text(event),
    )


def envelope_text(event: Event) -> str:
    envelope = event.envelope()
    try:
        return _ENVELOPE.encode(envelope).decode("utf-8")
    except (TypeError, ValueError, OverflowError):
        # What msgspec refuses (a lone surrogate, a type JSON has no word for) goes the old
        # way, so the writer's split finds and quarantines that row as before.
        return json.dumps(envelope, separators=(",", ":"), ensure_ascii=False)
