"""The agent's heartbeat: its health and figures to the central store, on a timer.

Every ``sync.heartbeat_interval_s`` (and once at start) the component reads the agent's
figures through the status board, the same snapshot ``/status`` answers with, and posts
them to ``POST /v1/heartbeat``: version, model version and source, backlog, lag, drops,
quarantined inputs, health, the last error, uptime, and the box's own time. The store keeps
the latest per agent (``customer-store fleet``, ``GET /v1/fleet``) and answers with the
clock skew it measured, which this component shows on ``/status``
(``heartbeat.store_clock_skew_s``) and ``/metrics`` (``edge_store_clock_skew_seconds``).
A heartbeat that fails is retried at the next tick; it never holds up the uploader, which
has its own connection.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Final

from cloud_sync.sync_client import StoreClient
from edge_agent.config import Config
from edge_agent.errors import SyncError
from edge_agent.events import format_ts

if TYPE_CHECKING:
    from edge_agent.component import Ports, StatusReader

log = logging.getLogger(__name__)

_MAX_ERROR_TEXT: Final = 500


@dataclass
class HeartbeatStats:
    sent: int = 0
    errors: int = 0
    last_success: str | None = None
    last_error: str | None = None
    clock_skew_s: float | None = None  # this box minus the store, as the store measured it
    skew_measured_at: str | None = None


def report(status: dict[str, Any], not_ready: list[str]) -> dict[str, Any]:
    """The heartbeat document from a status snapshot and the readiness reasons."""
    problems: list[str] = list(status["health"]["problems"])
    health = "unhealthy" if problems else "not_ready" if not_ready else "ok"
    sync, model = status["sync"], status["model"]
    last_error = next(iter(problems + not_ready), None) or sync.get("last_error")
    return {
        "version": status["version"],
        "model_version": model.get("version"),
        "model_source": model.get("source"),
        "backlog": status["buffer"]["pending"],
        "lag_s": sync.get("lag_s"),
        "drops": status["drops"]["total"],
        "quarantined": status["quarantine"]["total"],
        "last_error": None if last_error is None else str(last_error)[:_MAX_ERROR_TEXT],
        "health": health,
        "uptime_s": status["uptime_s"],
        "sent_at": format_ts(datetime.now(UTC)),
    }


class Heartbeat:
    """The heartbeat component (``name = "heartbeat"``); runs while sync is configured."""

    name = "heartbeat"

    def __init__(self, config: Config) -> None:
        self.settings = config.sync
        self.stats = HeartbeatStats()

    def status(self) -> dict[str, dict[str, Any]]:
        stats = self.stats
        return {
            "heartbeat": {
                "interval_s": self.settings.heartbeat_interval_s,
                "sent": stats.sent,
                "errors": stats.errors,
                "last_success": stats.last_success,
                "last_error": stats.last_error,
                # This box's wall clock minus the store's (the device-time judge's "clock"
                # section compares device clocks with this box's instead).
                "store_clock_skew_s": stats.clock_skew_s,
                "store_clock_measured_at": stats.skew_measured_at,
            },
        }

    async def run(self, ports: Ports) -> None:
        if ports.status is None:
            log.warning("heartbeat.disabled reason=no_status_board")
            return
        settings = self.settings
        async with StoreClient(settings.http_url, settings.token, settings.timeout_s, 1) as client:
            while True:
                await self.beat(client, ports.status)
                await asyncio.sleep(settings.heartbeat_interval_s)

    async def beat(self, client: StoreClient, status: StatusReader) -> None:
        document = report(await status.snapshot(), status.not_ready())
        stats = self.stats
        try:
            answer = await client.heartbeat(document)
        except SyncError as exc:
            stats.errors += 1
            if stats.last_error is None:  # once per outage: the uploader reports it too
                log.warning("heartbeat.failed error=%s", exc)
            stats.last_error = str(exc)[:_MAX_ERROR_TEXT]
            return
        if stats.last_error is not None:
            log.info("heartbeat.resumed after_errors=%d", stats.errors)
        stats.sent += 1
        stats.last_error = None
        stats.last_success = document["sent_at"]
        skew = answer.get("clock_skew_s")
        if isinstance(skew, int | float) and not isinstance(skew, bool):
            stats.clock_skew_s = float(skew)
            stats.skew_measured_at = document["sent_at"]
