"""Log lines that journald, Vector and Loki read as they are meant.

- ``logfmt`` (default): ``level=warning logger=edge_agent.x msg="sync.error kind=..."``; every
  value quoted and escaped per logfmt (by ``logfmter``), so a parser never splits a message.
- ``json``: one object per line (``level``, ``logger``, ``msg``, ``exc`` on errors).
- Under systemd (stderr is the journal stream named by ``JOURNAL_STREAM``) each line starts
  with the syslog priority, ``<4>`` for a warning, which journald strips and stores:
  ``journalctl -p warning`` then shows warnings and worse. journald stamps the time itself,
  so ``ts`` is left out there.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from datetime import UTC, datetime
from typing import Final, TextIO

from logfmter import Logfmter

FORMATS: Final = ("logfmt", "json")
# syslog(3) priorities by logging level (journald reads a leading "<N>").
_PRIORITY: Final = {
    logging.CRITICAL: 2,
    logging.ERROR: 3,
    logging.WARNING: 4,
    logging.INFO: 6,
    logging.DEBUG: 7,
}
# Libraries that narrate every connection at INFO; their warnings are kept.
_CHATTY: Final = ("amqtt", "transitions")


def stream_is_journal(stream: TextIO, environ: dict[str, str] | None = None) -> bool:
    """True when ``stream`` is the journal stream systemd connected (``JOURNAL_STREAM``)."""
    value = (os.environ if environ is None else environ).get("JOURNAL_STREAM", "")
    device, _, inode = value.partition(":")
    if not (device.isdigit() and inode.isdigit()):
        return False
    try:
        stat = os.fstat(stream.fileno())
    except (OSError, ValueError):  # no file descriptor (a test's StringIO)
        return False
    return (stat.st_dev, stat.st_ino) == (int(device), int(inode))


def priority(levelno: int) -> int:
    """The syslog priority of a logging level (levels between the named ones round down)."""
    for level in sorted(_PRIORITY, reverse=True):
        if levelno >= level:
            return _PRIORITY[level]
    return _PRIORITY[logging.DEBUG]


def _utc(record: logging.LogRecord) -> str:
    moment = datetime.fromtimestamp(record.created, UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


class LogfmtFormatter(Logfmter):
    """logfmt with the level in lower case and the time in UTC (when asked for)."""

    def __init__(self, with_time: bool) -> None:
        super().__init__(keys=["level", "logger"], mapping={"level": "levelname", "logger": "name"})
        self._with_time = with_time

    def format(self, record: logging.LogRecord) -> str:
        level = record.levelname
        record.levelname = level.lower()
        try:
            line = str(super().format(record))
        finally:
            record.levelname = level
        return f"ts={_utc(record)} {line}" if self._with_time else line


class JsonFormatter(logging.Formatter):
    def __init__(self, with_time: bool) -> None:
        super().__init__()
        self._with_time = with_time

    def format(self, record: logging.LogRecord) -> str:
        document: dict[str, object] = {}
        if self._with_time:
            document["ts"] = _utc(record)
        document |= {
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if record.exc_info:
            document["exc"] = self.formatException(record.exc_info)
        return json.dumps(document, ensure_ascii=False, default=str)


class _JournalPriority(logging.Formatter):
    """Prefix every line of the wrapped formatter with ``<priority>``."""

    def __init__(self, inner: logging.Formatter) -> None:
        super().__init__()
        self._inner = inner

    def format(self, record: logging.LogRecord) -> str:
        return f"<{priority(record.levelno)}>{self._inner.format(record)}"


def configure(level: str, fmt: str = "logfmt", stream: TextIO | None = None) -> None:
    """(Re)configure the root logger: called at start, again once the config is read."""
    out = sys.stderr if stream is None else stream
    journal = stream_is_journal(out)
    inner: logging.Formatter = (
        JsonFormatter(with_time=not journal)
        if fmt == "json"
        else LogfmtFormatter(with_time=not journal)
    )
    handler = logging.StreamHandler(out)
    handler.setFormatter(_JournalPriority(inner) if journal else inner)
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    for chatty in _CHATTY:
        logging.getLogger(chatty).setLevel(max(logging.WARNING, root.level))
