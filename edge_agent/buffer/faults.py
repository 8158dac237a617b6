"""What a failed write means: the rows are bad, or the disk or file is (and waiting helps).

The writer must never quarantine good events because the disk is full or another process
holds the lock, and never retry forever a row SQLite cannot store. SQLite's result code
tells the two apart; any other error (Python's own binding errors: a lone surrogate, an
integer beyond 64 bits) is taken to be about a row, which the writer then isolates.
"""

from __future__ import annotations

import sqlite3
from enum import StrEnum


class Fault(StrEnum):
    ROWS = "unstorable"  # something in the batch cannot be stored: find it, quarantine it
    DISK_FULL = "disk_full"  # SQLITE_FULL (ENOSPC on the file or its WAL): hold, retry
    LOCKED = "locked"  # another connection holds the write lock (the CLI): hold, retry
    IO_ERROR = "io_error"  # the device failed a read or write: hold, retry
    DAMAGED = "damaged"  # the file is corrupt: hold; a restart moves it aside and salvages


_BY_PRIMARY_CODE = {
    sqlite3.SQLITE_FULL: Fault.DISK_FULL,
    sqlite3.SQLITE_BUSY: Fault.LOCKED,
    sqlite3.SQLITE_LOCKED: Fault.LOCKED,
    sqlite3.SQLITE_IOERR: Fault.IO_ERROR,
    sqlite3.SQLITE_CANTOPEN: Fault.IO_ERROR,
    sqlite3.SQLITE_NOMEM: Fault.IO_ERROR,
    sqlite3.SQLITE_READONLY: Fault.IO_ERROR,
    sqlite3.SQLITE_PROTOCOL: Fault.LOCKED,
    sqlite3.SQLITE_CORRUPT: Fault.DAMAGED,
    sqlite3.SQLITE_NOTADB: Fault.DAMAGED,
}


def classify(exc: BaseException) -> Fault:
    """The fault behind a failed write; ROWS unless the file or the device is to blame."""
    if isinstance(exc, sqlite3.Error):
        code = getattr(exc, "sqlite_errorcode", None)
        if code is None:  # raised by the module itself (e.g. a bad parameter)
            return Fault.ROWS
        return _BY_PRIMARY_CODE.get(code & 0xFF, Fault.ROWS)
    return Fault.ROWS


def is_transient(exc: BaseException) -> bool:
    """Waiting (for space, the lock, the device) can make the same write succeed."""
    return classify(exc) in (Fault.DISK_FULL, Fault.LOCKED, Fault.IO_ERROR)
