"""The fleet view: the latest heartbeat of every agent, and which ones have gone quiet.

An agent posts ``POST /v1/heartbeat`` on a timer (``cloud_sync.heartbeat``); the store keeps
one row per store (the agent token's store), replaced by each newer report. The store also
measures the box's clock against its own: ``clock_skew_s`` = the agent's ``sent_at`` minus
the store's receive time (network time is milliseconds; a skew worth an alarm is minutes).
A report is checked field by field: a wrong type is a 400 naming the field, never stored.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final

from cloud_sync.store.errors import BadRequestError
from cloud_sync.store.records import format_ts, parse_ts

DEFAULT_STALE_AFTER_S: Final = 300.0  # five missed heartbeats at the agent's default 60 s
MAX_TEXT: Final = 500
HEALTH_STATES: Final = ("ok", "not_ready", "unhealthy")

# field -> the check a value must pass; every field may be null (not known yet).
_NUMBER: Final = "number"
_TEXT: Final = "text"
FIELDS: Final[dict[str, str]] = {
    "version": _TEXT,
    "model_version": _TEXT,
    "model_source": _TEXT,
    "backlog": _NUMBER,
    "lag_s": _NUMBER,
    "drops": _NUMBER,
    "quarantined": _NUMBER,
    "last_error": _TEXT,
    "health": _TEXT,
    "uptime_s": _NUMBER,
    "sent_at": _TEXT,
}


@dataclass(frozen=True, slots=True)
class Heartbeat:
    store_id: str
    credential_id: int | None
    received_at: datetime
    clock_skew_s: float | None
    report: dict[str, Any]  # the checked fields of FIELDS, as sent

    def as_json(self, now: datetime, stale_after_s: float) -> dict[str, Any]:
        age = max(0.0, (now - self.received_at).total_seconds())
        return {
            "store_id": self.store_id,
            **{name: self.report.get(name) for name in FIELDS},
            "received_at": format_ts(self.received_at),
            "age_s": round(age, 1),
            "stale": age > stale_after_s,
            "clock_skew_s": self.clock_skew_s,
        }


def parse_heartbeat(
    body: Mapping[str, Any], store_id: str, credential_id: int | None, now: datetime
) -> Heartbeat:
    """The report as stored; BadRequestError (400) names the first field that is wrong."""
    report: dict[str, Any] = {}
    for name, kind in FIELDS.items():
        value = body.get(name)
        if value is None:
            report[name] = None
        elif kind == _NUMBER:
            ok = isinstance(value, int | float) and not isinstance(value, bool)
            if not ok or not math.isfinite(value) or abs(value) > 1e15:
                raise BadRequestError(400, "bad_heartbeat", f"{name} must be a finite number")
            report[name] = value
        else:
            if not isinstance(value, str) or "\x00" in value:
                raise BadRequestError(400, "bad_heartbeat", f"{name} must be a string")
            report[name] = value.encode("utf-8", "replace").decode("utf-8")[:MAX_TEXT]
    if report["health"] is not None and report["health"] not in HEALTH_STATES:
        raise BadRequestError(400, "bad_heartbeat", f"health must be one of {HEALTH_STATES}")
    skew = None
    if report["sent_at"] is not None:
        sent = parse_ts(report["sent_at"])
        if sent is None:
            raise BadRequestError(400, "bad_heartbeat", "sent_at must be an RFC 3339 time")
        skew = round((sent - now).total_seconds(), 3)
    return Heartbeat(store_id, credential_id, now, skew, report)


def fleet_view(
    heartbeats: Sequence[Heartbeat], now: datetime, stale_after_s: float
) -> list[dict[str, Any]]:
    """Stale agents first (the oldest silence first), then the rest by store id."""
    entries = [hb.as_json(now, stale_after_s) for hb in heartbeats]

    def stale_first(entry: dict[str, Any]) -> tuple[bool, float, str]:
        return (not entry["stale"], -entry["age_s"] if entry["stale"] else 0.0, entry["store_id"])

    return sorted(entries, key=stale_first)


def table(entries: Sequence[Mapping[str, Any]]) -> str:
    """``customer-store fleet``: one line per agent, aligned columns, stale ones marked."""
    columns = (
        ("STORE", "store_id"),
        ("STATE", None),
        ("SEEN_S_AGO", "age_s"),
        ("HEALTH", "health"),
        ("VERSION", "version"),
        ("MODEL", "model_version"),
        ("BACKLOG", "backlog"),
        ("LAG_S", "lag_s"),
        ("DROPS", "drops"),
        ("SKEW_S", "clock_skew_s"),
        ("LAST_ERROR", "last_error"),
    )
    rows = [[title for title, _ in columns]]
    for entry in entries:
        row = []
        for _, key in columns:
            if key is None:
                row.append("STALE" if entry["stale"] else "live")
                continue
            value = entry.get(key)
            text = (
                "-" if value is None else f"{value:g}" if isinstance(value, float) else str(value)
            )
            row.append(text.replace("\n", " ")[:60])
        rows.append(row)
    widths = [max(len(row[i]) for row in rows) for i in range(len(columns))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in rows
    )
