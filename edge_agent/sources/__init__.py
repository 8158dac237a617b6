"""Input sources: each turns outside input into events and acknowledges only committed ones."""

from edge_agent.sources.base import Emit, Source, SourceStats

__all__ = ["Emit", "Source", "SourceStats"]
