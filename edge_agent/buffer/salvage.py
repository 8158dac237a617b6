"""Salvage, don't strand: read every row still readable from a damaged buffer file.

A damaged b-tree fails a scan at the first bad page, so rows are read by ranges of their
``seq`` and, where a range fails, one by one: a row is lost only when its own path in the
tree is broken. Each row read is checked (the envelope is a JSON object carrying the row's
event id) before it is copied, so garbage inside a page is counted, never exported.

Rows are copied into the fresh file unsynced first (the ones the store has not seen), each
keeping its synced state; event ids make a second run add nothing. What was salvaged and
what could not be read is recorded per file in the fresh file's ``meta`` table, so /status
and /metrics keep showing it across restarts until an operator clears it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

from edge_agent.buffer.integrity import connect
from edge_agent.buffer.schema import migrate
from edge_agent.buffer.writes import record_consent_rows, transaction
from edge_agent.errors import StorageError
from edge_agent.governance import ConsentRecord, consent_update

log = logging.getLogger(__name__)

RECORD_KEY: Final = "salvage"
_RANGE: Final = 512  # seqs per range read
_INSERT_BATCH: Final = 1000
_COLUMNS: Final = "seq, event_id, type, customer, customer_id, ts, received_at, envelope, synced_at"


@dataclass(frozen=True)
class SalvageRecord:
    """What salvage found, summed over every file salvaged since the last clear."""

    files: dict[str, dict[str, Any]]  # file name -> {"salvaged", "unreadable", "at"}

    @property
    def salvaged(self) -> int:
        return sum(int(entry["salvaged"]) for entry in self.files.values())

    @property
    def unreadable(self) -> int:
        return sum(int(entry["unreadable"]) for entry in self.files.values())

    def as_status(self) -> dict[str, Any]:
        return {
            "files": sorted(self.files),
            "salvaged": self.salvaged,
            "unreadable": self.unreadable,
            "by_file": self.files,
        }


@dataclass(frozen=True)
class SalvageResult:
    file: Path
    readable: int  # rows read and valid
    inserted: int  # of those, rows the target did not hold yet
    unreadable: int  # rows that could not be read or were not valid

    def as_dict(self) -> dict[str, Any]:
        return {
            "file": str(self.file),
            "readable": self.readable,
            "inserted": self.inserted,
            "unreadable": self.unreadable,
        }


@dataclass(frozen=True)
class _Row:
    seq: int
    values: tuple[Any, ...]  # event_id, type, customer, customer_id, ts, received_at, envelope
    synced_at: float | None
    envelope: dict[str, Any]

    @property
    def envelope_text(self) -> str:
        return str(self.values[6])


class RowReader:
    """Reads the events table of a possibly damaged file; counts what it cannot read."""

    def __init__(self, connection: sqlite3.Connection) -> None:
        self.connection = connection
        self.unreadable = 0

    def rows(self) -> Iterator[_Row]:
        """Every readable, valid row in seq order."""
        low, high = self._bounds()
        if high is None:
            return
        start = low
        while start <= high:
            end = start + _RANGE
            try:
                found = self.connection.execute(
                    f"SELECT {_COLUMNS} FROM events WHERE seq >= ? AND seq < ? ORDER BY seq",
                    (start, end),
                ).fetchall()
            except sqlite3.DatabaseError:
                found = list(self._one_by_one(start, min(end, high + 1)))
            for raw in found:
                row = _valid(raw)
                if row is None:
                    self.unreadable += 1
                else:
                    yield row
            start = end

    def _one_by_one(self, start: int, end: int) -> Iterator[tuple[Any, ...]]:
        for seq in range(start, end):
            try:
                found = self.connection.execute(
                    f"SELECT {_COLUMNS} FROM events WHERE seq = ?", (seq,)
                ).fetchone()
            except sqlite3.DatabaseError:
                self.unreadable += 1  # its page (or a page above it) is broken
                continue
            if found is not None:
                yield found

    def _bounds(self) -> tuple[int, int | None]:
        """The lowest and highest seq any intact path leads to (an index, the table)."""
        lows: list[int] = []
        highs: list[int] = []
        for statement in (
            "SELECT min(seq), max(seq) FROM events",
            "SELECT min(seq), max(seq) FROM events INDEXED BY events_event_id "
            "WHERE event_id IS NOT NULL",
        ):
            with contextlib.suppress(sqlite3.DatabaseError):
                low, high = self.connection.execute(statement).fetchone()
                if high is not None:
                    lows.append(int(low))
                    highs.append(int(high))
        if not highs:
            with contextlib.suppress(sqlite3.DatabaseError):  # the rightmost path alone
                high = self.connection.execute("SELECT max(seq) FROM events").fetchone()[0]
                if high is not None:
                    highs.append(int(high))
        if not highs:
            return 1, None
        return (min(lows) if lows else 1), max(highs)


def open_damaged(path: Path) -> sqlite3.Connection:
    """Open a file for reading only; its WAL (moved aside with it) is read too."""
    if not path.exists():
        raise StorageError(f"no file to salvage at {path}")
    try:
        connection = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10.0)
        connection.execute("PRAGMA query_only=ON")
        connection.execute("SELECT count(*) FROM sqlite_master").fetchone()
    except sqlite3.DatabaseError as exc:
        raise StorageError(f"cannot read {path} as a database: {exc}") from exc
    return connection


def open_target(path: Path) -> sqlite3.Connection:
    """The live buffer, for ``edge-agent buffer salvage`` beside a running agent."""
    path.parent.mkdir(parents=True, exist_ok=True)
    connection = connect(path, "full")
    connection.execute("PRAGMA busy_timeout=10000")  # the agent's writer commits meanwhile
    migrate(connection)
    return connection


def salvage_into(target: sqlite3.Connection, damaged: Path) -> SalvageResult:
    """Copy what can be read from ``damaged`` into ``target`` and record the figures.

    The entry is written as incomplete first: a salvage cut short (kill -9, power) is run
    again at the next open (``unfinished``), adding nothing twice.
    """
    try:
        source = open_damaged(damaged)
    except StorageError as exc:
        log.error("buffer.salvage.unreadable file=%s error=%s", damaged, exc)  # noqa: TRY400
        result = SalvageResult(damaged, 0, 0, 0)
        _record(target, result, error=str(exc))
        return result
    _record(target, SalvageResult(damaged, 0, 0, 0), complete=False)
    try:
        result = _copy(source, target, damaged)
    finally:
        source.close()
    _record(target, result)
    log_call = log.error if result.unreadable else log.warning
    log_call(
        "buffer.salvage.done file=%s readable=%d inserted=%d unreadable=%d",
        damaged,
        result.readable,
        result.inserted,
        result.unreadable,
    )
    return result


def _copy(source: sqlite3.Connection, target: sqlite3.Connection, damaged: Path) -> SalvageResult:
    readable = inserted = 0
    unreadable = 0
    # Unsynced first: if time or space runs out, what the store has not seen is in.
    for synced in (False, True):
        reader = RowReader(source)
        batch: list[_Row] = []
        for row in reader.rows():
            if (row.synced_at is not None) != synced:
                continue
            batch.append(row)
            if len(batch) >= _INSERT_BATCH:
                inserted += _insert(target, batch)
                readable += len(batch)
                batch.clear()
        inserted += _insert(target, batch)
        readable += len(batch)
        if not synced:
            unreadable = reader.unreadable  # both passes meet the same rows
    # A broken leaf can hide its rows without an error: the indexes know how many there were.
    unreadable = max(unreadable, expected_rows(source) - readable)
    _copy_consent(source, target)
    return SalvageResult(damaged, readable, inserted, unreadable)


def expected_rows(connection: sqlite3.Connection) -> int:
    """How many rows the file held, as its intact indexes count them (0 if none is)."""
    counts = [0]
    for statement in (
        "SELECT count(*) FROM events INDEXED BY events_event_id WHERE event_id IS NOT NULL",
        "SELECT (SELECT count(*) FROM events INDEXED BY events_pending "
        "WHERE synced_at IS NULL AND customer IN (0, 1)) + (SELECT count(*) FROM events "
        "INDEXED BY events_synced WHERE synced_at IS NOT NULL)",
    ):
        with contextlib.suppress(sqlite3.DatabaseError):
            counts.append(int(connection.execute(statement).fetchone()[0]))
    return max(counts)


def _insert(target: sqlite3.Connection, rows: list[_Row]) -> int:
    if not rows:
        return 0
    with transaction(target):
        before = target.total_changes
        target.executemany(
            "INSERT OR IGNORE INTO events (event_id, type, customer, customer_id, ts, "
            "received_at, envelope, synced_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            [(*row.values, row.synced_at) for row in rows],
        )
        inserted = target.total_changes - before
        record_consent_rows(target, [c for row in rows if (c := _consent(row)) is not None])
    return inserted


def _consent(row: _Row) -> ConsentRecord | None:
    envelope = row.envelope
    return consent_update(
        envelope.get("type"),
        envelope.get("customer_id"),
        envelope.get("data"),
        envelope.get("ts"),
        envelope.get("event_id"),
    )


def _copy_consent(source: sqlite3.Connection, target: sqlite3.Connection) -> None:
    """The consent table too (its rows may come from events evicted long ago)."""
    try:
        rows = source.execute(
            "SELECT customer_id, personalization, profile_sharing, partner_sharing, ts, "
            "event_id FROM consent"
        ).fetchall()
    except sqlite3.DatabaseError as exc:
        log.warning("buffer.salvage.consent_unreadable error=%s", exc)
        return
    with transaction(target):
        record_consent_rows(target, [ConsentRecord(*row) for row in rows])


def _valid(raw: tuple[Any, ...]) -> _Row | None:
    """The row if it is whole: typed columns, an envelope that is a JSON object of its id."""
    seq, event_id, kind, customer, customer_id, ts, received_at, envelope, synced_at = raw
    if not (
        isinstance(event_id, str)
        and isinstance(kind, str)
        and customer in (0, 1)
        and (customer_id is None or isinstance(customer_id, str))
        and isinstance(ts, str)
        and isinstance(received_at, int | float)
        and isinstance(envelope, str)
        and (synced_at is None or isinstance(synced_at, int | float))
    ):
        return None
    parsed = parse_envelope(envelope)
    if parsed is None or parsed.get("event_id") != event_id:
        return None
    values = (event_id, kind, customer, customer_id, ts, received_at, envelope)
    return _Row(int(seq), values, synced_at, parsed)


def parse_envelope(text: str) -> dict[str, Any] | None:
    """The envelope as a dict, or None when it is not strict JSON (no NaN) or not an object."""
    try:
        parsed = json.loads(text, parse_constant=_no_constant)
    except (ValueError, RecursionError):
        return None
    return parsed if isinstance(parsed, dict) else None


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def read_record(connection: sqlite3.Connection) -> SalvageRecord | None:
    found = connection.execute("SELECT value FROM meta WHERE key = ?", (RECORD_KEY,)).fetchone()
    if found is None:
        return None
    try:
        files = json.loads(found[0])
    except ValueError:
        return None
    return SalvageRecord(files) if isinstance(files, dict) and files else None


def unfinished(connection: sqlite3.Connection, directory: Path) -> list[Path]:
    """Files whose salvage was cut short and that are still there to finish it."""
    record = read_record(connection)
    if record is None:
        return []
    found = [
        directory / name for name, entry in record.files.items() if not entry.get("complete", True)
    ]
    return [path for path in found if path.exists()]


def _record(
    target: sqlite3.Connection, result: SalvageResult, *, complete: bool = True, error: str = ""
) -> None:
    """Keep the figures per file (a second salvage of a file replaces its entry)."""
    current = read_record(target)
    files = dict(current.files) if current else {}
    files[result.file.name] = {
        "salvaged": result.readable,
        "unreadable": result.unreadable,
        "complete": complete,
        "error": error,  # the file could not be opened at all: nothing could be counted
        "at": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    with target:
        target.execute(
            "INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)",
            (RECORD_KEY, json.dumps(files, sort_keys=True)),
        )


def clear_record(connection: sqlite3.Connection) -> SalvageRecord | None:
    """Forget the salvage figures (an operator has looked); return what was cleared."""
    current = read_record(connection)
    with transaction(connection):
        connection.execute("DELETE FROM meta WHERE key IN (?, 'recovered_from')", (RECORD_KEY,))
    return current
