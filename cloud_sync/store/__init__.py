"""The central customer store: events from every agent, one profile per customer, partners.

It never imports ``edge_agent``; it shares only ``cloud_sync.envelope_schema`` with the agent.
"""

from cloud_sync.store.app import create_app
from cloud_sync.store.backend import Backend, open_backend
from cloud_sync.store.errors import BackendError, BadRequestError, StoreError
from cloud_sync.store.ingest import Limits

__all__ = [
    "Backend",
    "BackendError",
    "BadRequestError",
    "Limits",
    "StoreError",
    "create_app",
    "open_backend",
]
