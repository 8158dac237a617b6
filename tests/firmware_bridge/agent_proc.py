"""A minimal agent process for crash tests: one serial source, a durable JSON Lines "buffer".

    python agent_proc.py URL FILE

Each committed event is appended to FILE and fsynced before emit returns, so whatever this
process acknowledged is on disk when it is killed with SIGKILL.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from collections.abc import Sequence
from typing import TextIO

from edge_agent.events import Event, Rejected
from firmware_bridge.serial_source import SerialPortConfig, SerialSource


async def run(url: str, log: TextIO) -> None:
    async def emit(items: Sequence[Event | Rejected]) -> None:
        for item in items:
            if isinstance(item, Event):
                log.write(json.dumps({"event_id": item.event_id}) + "\n")
        log.flush()
        os.fsync(log.fileno())  # committed means on disk: only then is it acknowledged

    config = SerialPortConfig(url=url, store_id="store-001", reconnect_initial_s=0.05)
    await SerialSource(config).run(emit)


if __name__ == "__main__":
    with open(sys.argv[2], "a", encoding="utf-8") as committed_log:
        asyncio.run(run(sys.argv[1], committed_log))
