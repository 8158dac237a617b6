"""A minimal agent process for crash tests: one serial source, a durable JSON Lines "buffer".

    python agent_proc.py URL FILE [JOURNAL_DIR [hang]]

Each committed event is appended to FILE and fsynced before emit returns, so whatever this
process acknowledged is on disk when it is killed with SIGKILL. With JOURNAL_DIR the source
keeps a dead-letter journal there (two deaths make a frame poison); with ``hang`` the
emit of any event never returns, a stand-in (the test's own) for handling that kills the
process: the test kills it -9 while the frame is in hand.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TextIO

from edge_agent.deadletter import HandlingJournal
from edge_agent.events import Event, Rejected
from firmware_bridge.serial_source import SerialPortConfig, SerialSource


async def run(url: str, log: TextIO, journal_dir: str | None, hang: bool) -> None:
    async def emit(items: Sequence[Event | Rejected]) -> None:
        for item in items:
            if isinstance(item, Event):
                if hang:
                    await asyncio.Event().wait()
                log.write(json.dumps({"event_id": item.event_id}) + "\n")
            else:
                log.write(json.dumps({"quarantined": item.reason}) + "\n")
        log.flush()
        os.fsync(log.fileno())  # committed means on disk: only then is it acknowledged

    config = SerialPortConfig(url=url, store_id="store-001", reconnect_initial_s=0.05)
    journal = HandlingJournal(Path(journal_dir), "serial", 2) if journal_dir else None
    await SerialSource(config, journal=journal).run(emit)


if __name__ == "__main__":
    with open(sys.argv[2], "a", encoding="utf-8") as committed_log:
        journal_dir = sys.argv[3] if len(sys.argv) > 3 else None
        hang = len(sys.argv) > 4 and sys.argv[4] == "hang"
        asyncio.run(run(sys.argv[1], committed_log, journal_dir, hang))
