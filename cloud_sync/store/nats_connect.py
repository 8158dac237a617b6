"""How the central store's NATS services (ingest workers, the announcer) connect.

One place for the options both take from their command line or systemd credentials:
servers, credentials (a .creds file, user and password, or a token, in that order) and the
CA of a TLS hub. Reconnects never give up: a worker or announcer outlives a hub restart.
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class NatsAccess:
    """Where and as whom a service connects: the first fields of its settings."""

    url: str  # nats://HOST:PORT, several separated by commas
    creds: str = ""  # a .creds file (JWT + nkey)
    user: str = ""
    password: str = ""
    token: str = ""
    tls_ca: str = ""  # CA bundle of a TLS hub


def connect_options(access: NatsAccess, name: str) -> dict[str, Any]:
    """``nats.connect`` keyword arguments; ``name`` is the client name the server shows
    (``customer-store-ingest`` logs its NATS errors as ``ingest.nats.error``)."""
    options: dict[str, Any] = {
        "servers": [part.strip() for part in access.url.split(",") if part.strip()],
        "allow_reconnect": True,
        "max_reconnect_attempts": -1,
        "reconnect_time_wait": 0.5,
        "connect_timeout": 2,
        "name": name,
        # One log line per error, not nats-py's traceback on every retry.
        "error_cb": _error_logger(name.removeprefix("customer-store-")),
    }
    if access.creds:
        options["user_credentials"] = access.creds
    elif access.user:
        options["user"], options["password"] = access.user, access.password
    elif access.token:
        options["token"] = access.token
    if access.tls_ca:
        options["tls"] = ssl.create_default_context(cafile=access.tls_ca)
    return options


def _error_logger(service: str) -> Callable[[Exception], Awaitable[None]]:
    async def log_error(exc: Exception) -> None:
        log.warning("%s.nats.error kind=%s detail=%s", service, type(exc).__name__, exc)

    return log_error
