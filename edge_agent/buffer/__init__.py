"""The durable local buffer (SQLite): commit first, acknowledge after."""

from edge_agent.buffer.store import Buffer, BufferCounters

__all__ = ["Buffer", "BufferCounters"]
