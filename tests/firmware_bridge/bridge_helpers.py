"""Helpers for the serial tests over real ptys: the simulator as a subprocess, a recording emit.

A module with a unique name, not conftest.py, so that ``import`` finds this one whichever
other test folders also have a conftest.
"""

from __future__ import annotations

import asyncio
import json
import sys
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from edge_agent.events import Event, Rejected
from firmware_bridge.serial_source import SerialPortConfig, SerialSource

SIM = Path(sys.executable).with_name("firmware-sim")


class Sim:
    def __init__(self, proc: asyncio.subprocess.Process, path: str) -> None:
        self.proc = proc
        self.path = path

    async def wait(self, limit_s: float = 20.0) -> tuple[int, dict[str, Any]]:
        """Wait for the sim to exit; its exit code and JSON summary (the last line)."""
        out, _ = await asyncio.wait_for(self.proc.communicate(), limit_s)
        assert self.proc.returncode is not None
        return self.proc.returncode, json.loads(out.decode().strip().splitlines()[-1])

    async def kill(self) -> None:
        """kill -9 this simulator (by its pid) and reap it."""
        self.proc.kill()
        await asyncio.wait_for(self.proc.wait(), 10)


class SimLauncher:
    def __init__(self) -> None:
        self.procs: list[asyncio.subprocess.Process] = []

    async def start(self, *args: str) -> Sim:
        proc = await asyncio.create_subprocess_exec(
            str(SIM), "--timeout", "30", *args, stdout=asyncio.subprocess.PIPE
        )
        self.procs.append(proc)
        assert proc.stdout is not None
        line = await asyncio.wait_for(proc.stdout.readline(), 10)
        return Sim(proc, line.decode().strip())

    async def kill_all(self) -> None:
        for proc in self.procs:  # only the processes this test started, by pid
            if proc.returncode is None:
                proc.kill()
                await asyncio.wait_for(proc.wait(), 10)


class Committed:
    """A fake buffer: commits events into a dict keyed by event_id (INSERT OR IGNORE)."""

    def __init__(self) -> None:
        self.events: dict[str, Event] = {}
        self.rejected: list[Rejected] = []
        self.emits: Counter[str] = Counter()

    async def __call__(self, items: Sequence[Event | Rejected]) -> None:
        await asyncio.sleep(0)  # a commit takes a turn of the loop, like a real one
        for item in items:
            if isinstance(item, Event):
                self.events.setdefault(item.event_id, item)
                self.emits[item.event_id] += 1
            else:
                self.rejected.append(item)


def port_config(url: str, **overrides: Any) -> SerialPortConfig:
    defaults: dict[str, Any] = {
        "reconnect_initial_s": 0.05,
        "reconnect_max_s": 0.4,
        "read_poll_s": 0.05,
    }
    return SerialPortConfig(url=url, store_id="store-001", **{**defaults, **overrides})


@asynccontextmanager
async def running(source: SerialSource, emit: Committed) -> AsyncIterator[asyncio.Task[None]]:
    task = asyncio.create_task(source.run(emit), name=f"test:{source.name}")
    try:
        yield task
    finally:
        source.request_stop()
        await asyncio.wait_for(task, 10)  # run() returns once what it holds is acked


async def until(condition: Any, limit_s: float = 15.0) -> None:
    """Poll a condition, bounded by time."""
    for _ in range(int(limit_s / 0.02)):
        if condition():
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"condition not met within {limit_s}s")
