"""Private nats-server processes (JetStream) on free loopback ports: one server or a cluster.

The binary is ``/usr/sbin/nats-server`` (Debian's ``nats-server`` package) or on PATH; when
it is absent the test is skipped with the reason, or fails under EDGE_REQUIRE_SERVICES=1.
Every process is ended by its pid (``kill`` sends SIGKILL to that one process).

``shards``: the hub's subject mapping of ``edge.events.*`` to N shard streams
(``cloud_sync.store.nats_shards.server_mapping``); a cluster has the default N unless told
otherwise, a single server none (the unsharded stream ``EDGE_EVENTS``).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

from benchmarks.local_broker import free_port, wait_for_port
from cloud_sync.store.nats_shards import DEFAULT_SHARDS, server_mapping
from tests.support.services import missing_service


def nats_server_binary() -> str:
    found = shutil.which("nats-server") or (
        "/usr/sbin/nats-server" if os.access("/usr/sbin/nats-server", os.X_OK) else None
    )
    if found is None:
        missing_service("nats-server is not installed (apt-get install nats-server)")
        raise AssertionError("unreachable")
    return found


class NatsNode:
    """One nats-server with JetStream, its own store dir and config file; restartable."""

    def __init__(
        self,
        workdir: Path,
        name: str,
        cluster_port: int | None = None,
        *,
        jetstream: bool = True,
        domain: str = "",
        extra: str = "",
    ) -> None:
        self.binary = nats_server_binary()
        self.name = name
        self.port = free_port()
        self.cluster_port = cluster_port
        self.jetstream = jetstream
        self.domain = domain  # a JetStream domain (a hub that leaf nodes reach)
        self.extra = extra  # more config text (leafnodes ...)
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.config = workdir / "nats.conf"
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def write_config(self, routes: list[int]) -> None:
        cluster = ""
        if self.cluster_port is not None:
            route_list = ", ".join(f"nats-route://127.0.0.1:{port}" for port in routes)
            cluster = (
                "cluster {\n  name: test-cluster\n"
                f"  listen: 127.0.0.1:{self.cluster_port}\n"
                f"  routes: [{route_list}]\n}}\n"
            )
        self.config.write_text(
            f"server_name: {self.name}\n"
            f"listen: 127.0.0.1:{self.port}\n"
            + (self._jetstream_block() if self.jetstream else "")
            + cluster
            + self.extra
        )

    def _jetstream_block(self) -> str:
        domain = f"  domain: {self.domain}\n" if self.domain else ""
        return f"jetstream {{\n  store_dir: {self.workdir / 'js'}\n{domain}}}\n"

    def start(self, wait: bool = True) -> None:
        if not self.config.exists():
            self.write_config([])
        with (self.workdir / "nats.log").open("ab") as log:
            self.process = subprocess.Popen(
                [self.binary, "-c", str(self.config)],
                stdout=subprocess.DEVNULL,
                stderr=log,
            )
        if wait:
            wait_for_port(self.port, timeout=15)

    def kill(self) -> None:
        """SIGKILL this server (by its pid) and reap it."""
        process = self.process
        if process is not None and process.poll() is None:
            os.kill(process.pid, signal.SIGKILL)
            process.wait(10)
        self.process = None

    def stop(self) -> None:
        process = self.process
        if process is not None and process.poll() is None:
            process.terminate()
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                os.kill(process.pid, signal.SIGKILL)
                process.wait(10)
        self.process = None

    def log_tail(self, chars: int = 3000) -> str:
        path = self.workdir / "nats.log"
        return path.read_text(errors="replace")[-chars:] if path.exists() else ""


def shard_mapping(shards: int) -> str:
    """Config text mapping ``edge.events.*`` to ``shards`` streams ("" for 0: no mapping)."""
    return server_mapping(shards) if shards else ""


@contextlib.contextmanager
def nats_server(workdir: Path, shards: int = 0) -> Iterator[NatsNode]:
    """One JetStream server (streams are R1 on it)."""
    node = NatsNode(workdir, "solo", extra=shard_mapping(shards))
    node.start()
    try:
        yield node
    finally:
        node.stop()


class NatsCluster:
    """Three JetStream servers routed to each other (R3 streams), all on loopback, each
    mapping ``edge.events.*`` to ``shards`` streams (0: no mapping, one stream)."""

    def __init__(self, workdir: Path, size: int = 3, shards: int = DEFAULT_SHARDS) -> None:
        self.shards = shards
        self.nodes = [
            NatsNode(
                workdir / f"n{index}",
                f"n{index}",
                cluster_port=free_port(),
                extra=shard_mapping(shards),
            )
            for index in range(size)
        ]
        ports = [node.cluster_port for node in self.nodes]
        for node in self.nodes:
            node.write_config([port for port in ports if port != node.cluster_port and port])

    @property
    def url(self) -> str:
        return ",".join(node.url for node in self.nodes)

    def start(self) -> None:
        for node in self.nodes:
            node.start(wait=False)
        for node in self.nodes:
            wait_for_port(node.port, timeout=15)

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()

    def pids(self) -> list[int]:
        return [n.process.pid for n in self.nodes if n.process is not None]

    def logs(self) -> str:
        return "\n".join(f"--- {node.name}\n{node.log_tail()}" for node in self.nodes)


@contextlib.contextmanager
def nats_cluster(workdir: Path, shards: int = DEFAULT_SHARDS) -> Iterator[NatsCluster]:
    cluster = NatsCluster(workdir, shards=shards)
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.stop()


async def jetstream_answers(url: str) -> bool:
    """Whether JetStream at ``url`` answers now (a cluster elects its meta leader first)."""
    import nats

    try:
        nc = await nats.connect(url.split(","), connect_timeout=1, allow_reconnect=False)
    except Exception:
        return False
    try:
        await nc.jetstream(timeout=1).account_info()
    except Exception:
        return False
    finally:
        await nc.close()
    return True


async def jetstream_ready(url: str, within: float = 30.0) -> None:
    import asyncio

    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if await jetstream_answers(url):
            return
        await asyncio.sleep(0.2)
    raise AssertionError(f"JetStream at {url} not ready within {within}s")


def wait_jetstream_ready(url: str, within: float = 30.0) -> None:
    """``jetstream_ready`` for synchronous tests and fixtures."""
    import asyncio

    asyncio.run(jetstream_ready(url, within))
