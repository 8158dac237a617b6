"""An embedded MQTT broker (amqtt) for the demo and for machines without mosquitto.

amqtt is the ``[demo]`` extra: it is imported only when a broker starts, so a store box
(which talks to its own mosquitto) never installs or loads it.
"""

from __future__ import annotations

import logging
import socket
from types import TracebackType
from typing import Any

from edge_agent.errors import MissingExtraError

log = logging.getLogger(__name__)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


class EmbeddedBroker:
    """``async with EmbeddedBroker() as broker:`` listens on 127.0.0.1:``broker.port``."""

    def __init__(self, host: str = "127.0.0.1", port: int | None = None) -> None:
        self.host = host
        self.port = port or free_port(host)
        self._broker: Any = None  # amqtt.broker.Broker, typed loosely: amqtt is optional

    async def __aenter__(self) -> EmbeddedBroker:
        try:
            from amqtt.broker import Broker
        except ModuleNotFoundError as exc:
            raise MissingExtraError("amqtt", "demo") from exc
        # Created here, not in __init__: amqtt 0.12 needs a running event loop to build one.
        self._broker = Broker(
            {
                "listeners": {"default": {"type": "tcp", "bind": f"{self.host}:{self.port}"}},
                "plugins": {
                    "amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}
                },
            }
        )
        await self._broker.start()
        log.info("broker.embedded.started host=%s port=%d", self.host, self.port)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        broker, self._broker = self._broker, None
        if broker is not None:
            await broker.shutdown()
