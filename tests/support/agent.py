"""Run the agent in-process or as a real process, publish to it, read its buffer."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
import tomllib
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Iterable
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from edge_agent.app import RunningAgent, run_agent
from edge_agent.config import config_from_dict


@contextlib.asynccontextmanager
async def agent_running(
    document: dict[str, Any], connect_timeout: float = 10.0
) -> AsyncIterator[RunningAgent]:
    config = config_from_dict(document)
    stop = asyncio.Event()
    ready: asyncio.Future[RunningAgent] = asyncio.get_running_loop().create_future()
    task = asyncio.create_task(run_agent(config, stop, on_ready=ready.set_result))
    try:
        agent = await asyncio.wait_for(asyncio.shield(ready), connect_timeout)
        await wait_until(lambda: all(s.stats.connected for s in agent.sources), connect_timeout)
        yield agent
    finally:
        stop.set()
        await asyncio.wait_for(task, 20)


async def wait_until(predicate: Any, within: float, interval: float = 0.02) -> None:
    deadline = time.monotonic() + within
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"condition not met within {within}s")
        await asyncio.sleep(interval)


class Publisher:
    """A paho client that publishes QoS 1 and can wait until the broker has every message."""

    def __init__(self, host: str, port: int, client_id: str | None = None) -> None:
        self.client = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=client_id or f"pub-{os.getpid()}-{time.monotonic_ns()}",
            clean_session=client_id is None,
        )
        self.client.max_inflight_messages_set(200)
        self.client.max_queued_messages_set(0)
        self.client.reconnect_delay_set(0.1, 1.0)  # type: ignore[arg-type]  # paho stubs say int; it takes seconds as float
        self.client.connect(host, port, 30)
        self.client.loop_start()
        self.pending: list[paho.MQTTMessageInfo] = []

    def publish(self, topic: str, payload: bytes | str, qos: int = 1) -> None:
        self.pending.append(self.client.publish(topic, payload, qos=qos))

    def wait_all(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        for info in self.pending:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError("broker did not acknowledge every publish in time")
            info.wait_for_publish(remaining)
            if not info.is_published():
                raise TimeoutError("broker did not acknowledge a publish in time")
        self.pending.clear()

    def close(self) -> None:
        self.client.disconnect()  # first: wakes paho's thread so loop_stop() cannot wait long
        self.client.loop_stop()


def event_topic(store_id: str, device_id: str = "shelf-01") -> str:
    return f"edge/{store_id}/devices/{device_id}/events"


def telemetry_topic(store_id: str, device_id: str = "fridge-01") -> str:
    return f"edge/{store_id}/devices/{device_id}/telemetry"


def pickup(event_id: str, customer_id: str = "c-1", sku: str = "SKU-1") -> bytes:
    return json.dumps(
        {
            "event_id": event_id,
            "type": "product.pickup",
            "customer_id": customer_id,
            "data": {"sku": sku},
        }
    ).encode()


def buffered_event_ids(db_path: Path) -> list[str]:
    if not db_path.exists():
        return []
    with contextlib.closing(sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, timeout=10)) as db:
        try:
            return [row[0] for row in db.execute("SELECT event_id FROM events")]
        except sqlite3.OperationalError:
            return []  # not created yet


def quarantine_reasons(db_path: Path) -> list[str]:
    with contextlib.closing(sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)) as db:
        return [row[0] for row in db.execute("SELECT reason FROM quarantine ORDER BY id")]


def write_config(path: Path, document: dict[str, Any]) -> Path:
    lines: list[str] = []
    for section, values in document.items():
        lines.append(f"[{section}]")
        for key, value in values.items():
            lines.append(f"{key} = {json.dumps(value)}")
    path.write_text("\n".join(lines) + "\n")
    tomllib.loads(path.read_text())  # the file we hand to the agent must be valid TOML
    return path


class AgentProcess:
    """``edge-agent run`` as a real child process, stopped with SIGTERM or killed with -9."""

    def __init__(self, config_path: Path, env: dict[str, str] | None = None) -> None:
        self.config_path = config_path
        self.env = {**os.environ, **(env or {})}
        self.process: subprocess.Popen[bytes] | None = None
        self.log = config_path.with_suffix(".log")

    def start(self) -> None:
        with self.log.open("ab") as log:  # the child keeps its own fd
            self.process = subprocess.Popen(
                [sys.executable, "-m", "edge_agent.cli", "run", "--config", str(self.config_path)],
                env=self.env,
                stdout=subprocess.DEVNULL,
                stderr=log,
            )

    def kill(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(10)

    def terminate(self, timeout: float = 20.0) -> int:
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout)

    def ensure_dead(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)


def http_get(url: str, timeout: float = 5.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def wait_http_ready(url: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError):
            status, _ = http_get(url, timeout=1.0)
            if status == 200:
                return
        time.sleep(0.05)
    raise TimeoutError(f"{url} not ready after {timeout}s")


def ids(prefix: str, count: int) -> Iterable[str]:
    return (f"{prefix}-{n:06d}" for n in range(count))
