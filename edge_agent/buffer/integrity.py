"""Open the buffer file, and recover from a damaged one without a crash loop.

A damaged file (failed quick_check, a page that fails to read, or not a database at all)
is moved aside with its WAL and shared-memory files, a loud log line is written, and a
fresh file is opened; the buffer then salvages every readable row from the moved file into
the fresh one (``salvage.py``). Only the newest few moved-aside files are kept, so
recoveries cannot fill the disk. An error that waiting can cure (a full disk, a lock) is
not damage: the file stays where it is and opening is retried.
"""

from __future__ import annotations

import logging
import sqlite3
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Final

from edge_agent.buffer.faults import is_transient
from edge_agent.buffer.writes import transaction
from edge_agent.errors import StorageError, StorageUnavailableError

log = logging.getLogger(__name__)

KEEP_DAMAGED_FILES: Final = 2
_SIDE_FILES: Final = ("-wal", "-shm")


# Rows whose envelope is not a JSON object carrying the row's own event id.
_INVALID_ROWS: Final = (
    "FROM events WHERE NOT (CASE WHEN json_valid(envelope) THEN json_type(envelope) = 'object' "
    "AND json_extract(envelope, '$.event_id') IS event_id ELSE 0 END)"
)


@dataclass(frozen=True)
class OpenedFile:
    connection: sqlite3.Connection
    recovered_from: Path | None  # where the damaged file was moved, when it was
    invalid_rows: int = 0  # rows to quarantine as damaged_row (see quarantine_invalid_rows)


def connect(path: Path, synchronous: str) -> sqlite3.Connection:
    # isolation_level=None: transactions are explicit (BEGIN IMMEDIATE ... COMMIT) in the writer.
    connection = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    connection.execute("PRAGMA journal_mode=WAL")
    connection.execute(f"PRAGMA synchronous={synchronous.upper()}")
    connection.execute("PRAGMA foreign_keys=ON")
    # Keep the WAL small on an SD card: checkpoint often, truncate what is left.
    connection.execute("PRAGMA wal_autocheckpoint=1000")
    connection.execute("PRAGMA journal_size_limit=4194304")
    return connection


def open_checked(path: Path, synchronous: str) -> OpenedFile:
    path.parent.mkdir(parents=True, exist_ok=True)
    problem, invalid_rows = _check(path, synchronous)
    if problem is None:
        return OpenedFile(connect(path, synchronous), None, invalid_rows)
    moved = _move_aside(path)
    log.error(
        "buffer.damaged path=%s problem=%r moved_to=%s action=fresh_buffer "
        "(events in the damaged file are not lost from disk; inspect it with sqlite3)",
        path,
        problem,
        moved,
    )
    _prune_damaged(path)
    return OpenedFile(connect(path, synchronous), moved)


def damaged_files(path: Path) -> list[Path]:
    found = path.parent.glob(f"{path.name}.damaged-*")
    return sorted(p for p in found if not p.name.endswith(_SIDE_FILES))


def _check(path: Path, synchronous: str) -> tuple[str | None, int]:
    """(the damage found or None, how many rows hold a broken envelope)."""
    if not path.exists():
        return None, 0
    invalid = 0
    try:
        connection = connect(path, synchronous)
        try:
            result = connection.execute("PRAGMA quick_check").fetchone()[0]
            if result == "ok":
                invalid = _count_invalid_rows(connection)
        finally:
            connection.close()
    except sqlite3.DatabaseError as exc:
        if is_transient(exc):
            raise StorageUnavailableError(f"cannot open buffer {path}: {exc}") from exc
        return str(exc), 0
    return (None, invalid) if result == "ok" else (str(result), 0)


def _count_invalid_rows(connection: sqlite3.Connection) -> int:
    """Read every envelope (quick_check checks pages, not what they hold): a broken overflow
    page raises here, garbage inside a sound page is counted."""
    exists = connection.execute(
        "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'events'"
    ).fetchone()
    if not exists:
        return 0
    return int(connection.execute(f"SELECT count(*) {_INVALID_ROWS}").fetchone()[0])


def _move_aside(path: Path) -> Path:
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%fZ")
    target = path.with_name(f"{path.name}.damaged-{stamp}")
    try:
        path.rename(target)
        for suffix in _SIDE_FILES:
            side = path.with_name(path.name + suffix)
            if side.exists():
                side.rename(target.with_name(target.name + suffix))
    except OSError as exc:
        raise StorageError(f"cannot move damaged buffer {path} aside: {exc}") from exc
    return target


def _prune_damaged(path: Path) -> None:
    for old in damaged_files(path)[:-KEEP_DAMAGED_FILES]:
        for candidate in (old, *(old.with_name(old.name + s) for s in _SIDE_FILES)):
            candidate.unlink(missing_ok=True)
        log.warning("buffer.damaged.pruned path=%s", old)


def quarantine_invalid_rows(connection: sqlite3.Connection, raw_limit: int) -> int:
    """Move rows whose envelope is not a JSON object of their own id to the quarantine
    (reason ``damaged_row``): export and sync must never see them. Returns how many."""
    bad = connection.execute(f"SELECT seq, envelope {_INVALID_ROWS}").fetchall()
    if not bad:
        return 0
    now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"
    with transaction(connection):
        for seq, envelope in bad:
            raw = envelope.encode("utf-8", "backslashreplace") if isinstance(envelope, str) else b""
            connection.execute(
                "INSERT INTO quarantine (received_at, source, reason, detail, raw, raw_len) "
                "VALUES (?, 'buffer', 'damaged_row', ?, ?, ?)",
                (
                    now,
                    f"seq={seq}: envelope is not a JSON object of its event id",
                    raw[:raw_limit],
                    len(raw),
                ),
            )
            connection.execute("DELETE FROM events WHERE seq = ?", (seq,))
        connection.execute(
            "INSERT INTO counters (name, value) VALUES ('quarantine.damaged_row', ?) "
            "ON CONFLICT (name) DO UPDATE SET value = value + excluded.value",
            (len(bad),),
        )
    log.error("buffer.damaged_rows.quarantined rows=%d", len(bad))
    return len(bad)
