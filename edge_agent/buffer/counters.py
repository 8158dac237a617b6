"""The buffer's figures: written by its owner thread only, read from the event loop."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from edge_agent.buffer import salvage


@dataclass
class BufferCounters:
    """Figures kept by the owner thread; read (never written) from the event loop.

    /status answers from these alone, so it never waits on the writer.
    """

    total: int = 0  # events held, synced or not
    pending: int = 0  # events not yet acknowledged by the central store
    committed: int = 0  # events committed since start (duplicates excluded)
    duplicates: int = 0  # events already held (a redelivery), since start
    commits: int = 0  # transactions since start
    quarantined: Counter[str] = field(default_factory=Counter)  # since start, by reason
    drops: Counter[str] = field(default_factory=Counter)  # since start, by reason
    backpressure: bool = False  # full of what may not be dropped: not acknowledging
    disk_full: bool = False  # the disk refused a write: holding, not acknowledging
    held: str | None = None  # why a batch is held now (backpressure, disk_full, locked, ...)
    held_since_monotonic: float | None = None
    holds: Counter[str] = field(default_factory=Counter)  # times a batch was held, by reason
    last_fault: str = ""  # the last error that held a batch, for a person to read
    bytes: int = 0  # live pages
    file_bytes: int = 0
    oldest_pending_at: float | None = None  # received_at of the oldest unsynced event
    salvage: salvage.SalvageRecord | None = None  # kept until an operator clears it
