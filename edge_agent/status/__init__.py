"""The local status endpoint: health, readiness, JSON status, Prometheus metrics, a live page."""

from edge_agent.status.server import StatusServer
from edge_agent.status.snapshot import StatusBoard

__all__ = ["StatusBoard", "StatusServer"]
