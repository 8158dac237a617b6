"""Health means progress: is the writer alive and moving, does input reach the disk?

Answered from figures in memory only (the writer's state, the pipeline's waiting emits),
so a wedged writer cannot wedge the answer. Waiting for room or for disk space is not a
fault of the process (a restart would not help): it makes the agent not ready, not unhealthy.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from edge_agent.buffer import Buffer
from edge_agent.buffer.faults import Fault
from edge_agent.buffer.store import ROOM
from edge_agent.pipeline import Pipeline

# Holds that wait for something outside the process (sync, an operator freeing space).
_EXPECTED_HOLDS = frozenset({ROOM, Fault.DISK_FULL.value})


@dataclass(frozen=True)
class Health:
    buffer: Buffer
    pipeline: Pipeline | None
    stall_after_s: float

    def problems(self) -> list[str]:
        """Why the agent is not making progress; empty when it is (or has nothing to do)."""
        now = time.monotonic()
        buffer = self.buffer
        counters = buffer.counters
        problems: list[str] = []
        if not buffer.writer_alive:
            problems.append(f"buffer writer is not running ({buffer.writer_error or 'stopped'})")
            return problems
        busy = buffer.busy_since
        if busy is not None and now - busy > self.stall_after_s:
            problems.append(f"buffer writer stuck on one job for {now - busy:.0f}s")
        held, since = counters.held, counters.held_since_monotonic
        if held == Fault.DAMAGED.value:
            problems.append(
                f"buffer file is damaged ({counters.last_fault}); a restart moves it aside "
                "and salvages it"
            )
        elif (
            held is not None
            and held not in _EXPECTED_HOLDS
            and since is not None
            and now - since > self.stall_after_s
        ):
            problems.append(
                f"buffer cannot write for {now - since:.0f}s: {held} ({counters.last_fault})"
            )
        if self.pipeline is not None and held not in _EXPECTED_HOLDS:
            for source, began in sorted(self.pipeline.waiting_since().items()):
                if now - began > self.stall_after_s:
                    problems.append(
                        f"source {source or 'internal'} has input waiting {now - began:.0f}s "
                        "with no commit"
                    )
        return problems

    def not_ready(self) -> list[str]:
        """Reasons beyond health that input is not being acknowledged now."""
        counters = self.buffer.counters
        reasons: list[str] = []
        if counters.held == ROOM:
            reasons.append(
                "backpressure: buffer is full of unsynced customer events (not acknowledging)"
            )
        elif counters.held == Fault.DISK_FULL.value:
            reasons.append(
                f"disk_full: the disk refused a write ({counters.last_fault}); not "
                "acknowledging, retrying until space is freed"
            )
        elif counters.held is not None:
            reasons.append(f"{counters.held}: buffer write held ({counters.last_fault})")
        return reasons
