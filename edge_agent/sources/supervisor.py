"""Keep one source's failure to itself: the sources share the agent's TaskGroup.

A source that raises (a bug, a commit that failed) would cancel every other task of the
group: a crash in the telemetry connection would take customer events down with it. The
supervisor logs the failure, counts it, and runs that source again after a backoff; what
the source had not acknowledged is redelivered by its peer (broker, device).
"""

from __future__ import annotations

import asyncio
import logging

from edge_agent.backoff import Backoff
from edge_agent.sources.base import Emit, Source

log = logging.getLogger(__name__)


async def run_supervised(source: Source, emit: Emit, backoff: Backoff | None = None) -> None:
    """Run ``source`` until it returns (a requested stop); restart it when it raises."""
    backoff = backoff or Backoff(0.5, 30.0)
    while True:
        try:
            await source.run(emit)
        except Exception as exc:
            source.stats.connected = False
            source.stats.drops[f"source_failed:{type(exc).__name__}"] += 1
            delay = backoff.next_delay()
            log.exception("source.failed name=%s restart_in_s=%.2f", source.name, delay)
            await asyncio.sleep(delay)
        else:
            return
