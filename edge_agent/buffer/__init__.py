"""The durable local buffer (SQLite): commit first, acknowledge after."""

from edge_agent.buffer.counters import BufferCounters
from edge_agent.buffer.store import Buffer

__all__ = ["Buffer", "BufferCounters"]
