"""A private MQTT broker per test session: mosquitto when installed, else embedded amqtt."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import threading
from pathlib import Path
from typing import Protocol

from benchmarks.local_broker import free_port as free_port  # noqa: PLC0414 (an explicit re-export, for mypy)
from benchmarks.local_broker import wait_for_port


class TestBroker(Protocol):
    host: str
    port: int
    persistent: bool  # keeps queued QoS 1 messages across a restart

    def stop(self) -> None: ...
    def restart(self) -> None: ...


class MosquittoBroker:
    """mosquitto on a free port with its own config and persistence file."""

    host = "127.0.0.1"
    persistent = True

    def __init__(self, workdir: Path) -> None:
        self.port = free_port()
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        # mosquitto started as root drops to its own user, which could not save the
        # persistence file in pytest's private tmp dirs: a restart would forget every session.
        stay_as = "user root\n" if os.geteuid() == 0 else ""
        self.config = workdir / "mosquitto.conf"
        # A store box's broker must queue enough for the agent's downtime: mosquitto's
        # default of 1000 queued messages per offline client would drop the rest.
        self.config.write_text(
            f"listener {self.port} 127.0.0.1\n"
            "allow_anonymous true\n"
            "persistence true\n"
            f"persistence_location {workdir}/\n"
            "autosave_interval 1\n"
            "max_queued_messages 0\n"
            "max_queued_bytes 0\n"
            "max_inflight_messages 100\n"
            "log_type error\n" + stay_as
        )
        self.process: subprocess.Popen[bytes] | None = None
        self.start()

    def start(self) -> None:
        with (self.workdir / "mosquitto.log").open("ab") as log:  # the child keeps its own fd
            self.process = subprocess.Popen(
                [shutil.which("mosquitto") or "mosquitto", "-c", str(self.config)],
                stdout=subprocess.DEVNULL,
                stderr=log,
            )
        wait_for_port(self.port)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)  # saves the persistence file
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        self.process = None

    def restart(self) -> None:
        self.stop()
        self.start()


class AmqttBroker:
    """The embedded amqtt broker on its own loop thread (no persistence across restarts)."""

    host = "127.0.0.1"
    persistent = False

    def __init__(self) -> None:
        self.port = free_port()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        self._broker: object | None = None
        self.start()

    def start(self) -> None:
        from edge_agent.embedded_broker import EmbeddedBroker

        broker = EmbeddedBroker(port=self.port)
        # Listening once __aenter__ returns. No probe connection: amqtt leaks the socket of a
        # client that connects and says nothing, which fails a later test on a ResourceWarning.
        asyncio.run_coroutine_threadsafe(broker.__aenter__(), self._loop).result(10)
        self._broker = broker

    def stop(self) -> None:
        from edge_agent.embedded_broker import EmbeddedBroker

        broker = self._broker
        if isinstance(broker, EmbeddedBroker):
            coro = broker.__aexit__(None, None, None)
            asyncio.run_coroutine_threadsafe(coro, self._loop).result(10)
        self._broker = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def close(self) -> None:
        self.stop()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        if not self._thread.is_alive():
            self._loop.close()  # its self-pipe sockets, else a ResourceWarning in a later test


def start_broker(workdir: Path) -> MosquittoBroker | AmqttBroker:
    if shutil.which("mosquitto"):
        return MosquittoBroker(workdir)
    return AmqttBroker()
