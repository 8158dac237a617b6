"""``deploy/customer-store-ingest@.service`` and ``deploy/nats-hub.conf`` (issue 14).

The unit passes ``systemd-analyze verify`` (with its binary pointed at this venv's) and rates
low exposure; its command line parses with the real CLI. The hub config runs as a real
three-node cluster on loopback (ports and paths rewritten, nothing else): its mapping is
the one the workers check, an ingest worker with the config's ``ingest`` user creates the
four R3 streams, passes the layout probe and drains a store's event, and a store's user may
publish only its own subject.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import nats
import nats.errors
import pytest
from cstore_helpers import envelope
from sync_helpers import store_event_ids

from benchmarks.local_broker import free_port, wait_for_port
from cloud_sync.store.backend import open_backend
from cloud_sync.store.cli import build_parser
from cloud_sync.store.nats_ingest import STREAM, IngestSettings, IngestWorker
from cloud_sync.store.nats_shards import DEFAULT_SHARDS, server_mapping, shard_of, shard_stream
from cloud_sync.sync_nats import NatsEvents, inbox_prefix
from edge_agent.buffer.reads import PendingRow
from edge_agent.config import SyncSection
from edge_agent.governance import ConsentLedger
from tests.support.nats import (
    jetstream_ready,
    nats_server,
    nats_server_binary,
    wait_jetstream_ready,
)

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
UNIT = DEPLOY / "customer-store-ingest@.service"
HUB = DEPLOY / "nats-hub.conf"
ENV_FILE = DEPLOY / "ingest.env"
PASSWORDS = {
    "NATS_INGEST_PASSWORD": "ingest-pw",
    "NATS_STORE_001_PASSWORD": "s1-pw",
    "NATS_STORE_002_PASSWORD": "s2-pw",
    "NATS_ANNOUNCER_PASSWORD": "an-pw",
}


def unit_settings() -> dict[str, list[str]]:
    settings: dict[str, list[str]] = {}
    text = UNIT.read_text().replace("\\\n", " ")
    for line in text.splitlines():
        if "=" in line and not line.startswith(("#", "[")):
            key, _, value = line.partition("=")
            settings.setdefault(key.strip(), []).append(value.strip())
    return settings


def _systemd_analyze() -> str:
    found = shutil.which("systemd-analyze")
    if found is None:
        pytest.skip("systemd-analyze is not installed on this machine")
    return found


def _local_copy(tmp_path: Path, replace: tuple[str, str] = ("", "")) -> Path:
    """The unit with ExecStart's binary at this venv's customer-store (verify checks it)."""
    binary = Path(sys.executable).with_name("customer-store")
    text = UNIT.read_text().replace("/opt/customer-store/venv/bin/customer-store", str(binary))
    if replace[0]:
        assert replace[0] in text
        text = text.replace(*replace)
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / UNIT.name
    path.write_text(text)
    return tmp_path / "customer-store-ingest@2.service"  # an instance of the template


def test_the_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    analyze = _systemd_analyze()
    instance = _local_copy(tmp_path / "good")
    result = subprocess.run(
        [analyze, "verify", str(instance)], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip() == "", result.stderr
    # The check can fail: a broken copy makes verify speak.
    broken = _local_copy(tmp_path / "broken", ("Restart=on-failure", "Restart=sometimes"))
    result = subprocess.run(
        [analyze, "verify", str(broken)], capture_output=True, text=True, timeout=60, check=False
    )
    assert "restart specifier" in result.stderr


def test_the_unit_rates_low_exposure(tmp_path: Path) -> None:
    analyze = _systemd_analyze()
    instance = _local_copy(tmp_path)
    result = subprocess.run(
        [analyze, "security", "--offline=true", str(instance)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+) (\w+)", result.stdout)
    assert match, result.stdout[-2000:] + result.stderr[-2000:]
    assert float(match.group(1)) < 2.0
    assert match.group(2) in {"SAFE", "OK"}


def test_the_units_command_parses_and_pins_its_instance_shard() -> None:
    settings = unit_settings()
    assert settings["Restart"] == ["on-failure"]
    assert settings["RestartPreventExitStatus"] == ["2"]  # a layout mismatch: no restart loop
    assert {"db-url:/etc/customer-store/credentials/db-url"} <= set(settings["LoadCredential"])
    environment = dict(
        line.split("=", 1)
        for line in ENV_FILE.read_text().splitlines()
        if line and not line.startswith("#")
    )
    assert environment["CUSTOMER_STORE_SHARDS"] == str(DEFAULT_SHARDS)
    command = settings["ExecStart"][0].replace("%i", "3")
    for name, value in environment.items():
        command = command.replace("${" + name + "}", value)
    assert "${" not in command, command
    argv = shlex.split(command)
    assert argv[0].endswith("/customer-store")
    args = build_parser().parse_args(argv[1:])
    assert (args.command, args.shards, args.shard, args.workers) == ("ingest", 4, [3], 1)
    assert args.nats_url.count("nats://") == 3


def test_the_hub_configs_mapping_is_the_one_workers_check() -> None:
    mapping = server_mapping(DEFAULT_SHARDS).splitlines()[1].strip()
    assert mapping in HUB.read_text()
    # The CLI spells the default out (nats-py is an extra): the same N.
    assert build_parser().parse_args(["ingest", "--from", "nats://h:1"]).shards == DEFAULT_SHARDS


class HubCluster:
    """Three nats-servers from deploy/nats-hub.conf, ports and paths made local."""

    def __init__(self, workdir: Path) -> None:
        self.binary = nats_server_binary()
        self.ports = [free_port() for _ in range(3)]
        routes = [free_port() for _ in range(3)]
        self.processes: list[subprocess.Popen[bytes]] = []
        self.configs = []
        text = HUB.read_text()
        for index in range(3):
            node = workdir / f"hub-{index}"
            node.mkdir(parents=True)
            config = text.replace("server_name: hub-1", f"server_name: hub-{index}")
            config = config.replace("0.0.0.0:4222", f"127.0.0.1:{self.ports[index]}")
            config = config.replace("0.0.0.0:6222", f"127.0.0.1:{routes[index]}")
            config = config.replace("0.0.0.0:7422", f"127.0.0.1:{free_port()}")
            config = config.replace("127.0.0.1:8222", f"127.0.0.1:{free_port()}")
            config = config.replace("/var/lib/nats/jetstream", str(node / "js"))
            for hub in range(3):
                config = config.replace(
                    f"nats-route://hub-{hub + 1}.example.com:6222",
                    f"nats-route://127.0.0.1:{routes[hub]}",
                )
            assert "example.com" not in config
            assert "0.0.0.0" not in config
            path = node / "hub.conf"
            path.write_text(config)
            self.configs.append(path)

    def url(self, user: str, password: str) -> str:
        return ",".join(f"nats://{user}:{password}@127.0.0.1:{port}" for port in self.ports)

    def start(self) -> None:
        environment = {**os.environ, **PASSWORDS}
        for config in self.configs:
            with (config.parent / "nats.log").open("ab") as log:
                self.processes.append(
                    subprocess.Popen(
                        [self.binary, "-c", str(config)],
                        stdout=subprocess.DEVNULL,
                        stderr=log,
                        env=environment,
                    )
                )
        for port in self.ports:
            wait_for_port(port, timeout=15)

    def stop(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.terminate()
                try:
                    process.wait(10)
                except subprocess.TimeoutExpired:
                    os.kill(process.pid, signal.SIGKILL)
                    process.wait(10)


@pytest.fixture
def hub(tmp_path: Path) -> Iterator[HubCluster]:
    cluster = HubCluster(tmp_path / "hub")
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.stop()


async def test_the_hub_config_as_a_cluster_shards_and_confines_each_store(
    hub: HubCluster, sqlite_url: str
) -> None:
    ingest_url = hub.url("ingest", PASSWORDS["NATS_INGEST_PASSWORD"])
    await jetstream_ready(ingest_url, within=60)
    backend = await open_backend(sqlite_url, pool_size=1)
    settings = IngestSettings(
        url=",".join(f"nats://127.0.0.1:{port}" for port in hub.ports),
        user="ingest",
        password=PASSWORDS["NATS_INGEST_PASSWORD"],
        fetch_timeout_s=0.3,
    )
    worker = IngestWorker(settings, backend)
    ready = asyncio.Event()
    task = asyncio.create_task(worker.run(ready))
    # Store 002 listens for everyone's replies, as a compromised box would try to.
    violations: list[str] = []

    async def refused(exc: Exception) -> None:
        violations.append(str(exc).lower())

    snoop = await nats.connect(
        hub.url("store-002", PASSWORDS["NATS_STORE_002_PASSWORD"]).split(","),
        error_cb=refused,
        allow_reconnect=False,
    )
    overheard: list[bytes] = []

    async def heard(message: Any) -> None:
        overheard.append(message.data)

    await snoop.subscribe("_INBOX.>", cb=heard)
    await snoop.subscribe(inbox_prefix("store-001") + ".>", cb=heard)
    await snoop.flush()
    # Store 001 sends through the agent's own sink, with only the config's permissions.
    sink_settings = SyncSection(
        transport="nats",
        url=",".join(f"nats://127.0.0.1:{port}" for port in hub.ports),
        nats_user="store-001",
        nats_password=PASSWORDS["NATS_STORE_001_PASSWORD"],
        timeout_s=10.0,
    )
    item = envelope(store_id="store-001", event_id="from-001")
    row = PendingRow(1, json.dumps(item, separators=(",", ":")), True, None)
    store = await nats.connect(
        hub.url("store-001", PASSWORDS["NATS_STORE_001_PASSWORD"]).split(","),
        inbox_prefix=inbox_prefix("store-001"),
    )
    try:
        await asyncio.wait_for(ready.wait(), 90)  # streams created, the probe agreed
        async with NatsEvents(sink_settings, "store-001") as sink:
            result = await sink.post_rows(
                [row], ConsentLedger(require_consent=True), b"k" * 32, compress=False
            )
        assert (result.accepted, result.duplicates) == (1, 0)
        js = store.jetstream(timeout=5)
        second = json.dumps(envelope(store_id="store-001", event_id="from-001b")).encode()
        ack = await js.publish("edge.events.store-001", second)
        assert ack.stream == shard_stream(STREAM, shard_of("store-001", DEFAULT_SHARDS))
        # Another store's subject, before or after the mapping: refused by the server.
        forged = json.dumps(envelope(store_id="store-002", event_id="forged")).encode()
        for subject in ("edge.events.store-002", "edge.shard.0.store-002"):
            with pytest.raises(nats.errors.TimeoutError):
                await js.publish(subject, forged, timeout=2)
        deadline = time.monotonic() + 30
        while worker.stats.accepted < 2:
            if time.monotonic() > deadline:
                raise AssertionError("the store's event was not ingested within 30 s")
            await asyncio.sleep(0.1)
        await asyncio.sleep(1.0)  # room for a forged event to arrive, were it let through
    finally:
        await store.close()
        await snoop.close()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await backend.close()
    assert sorted(store_event_ids(sqlite_url)) == ["from-001", "from-001b"]
    # Neither the default inbox nor store 001's: both subscriptions refused, nothing heard.
    assert overheard == []
    assert sum("permissions violation" in text for text in violations) >= 2, violations
    manager = await nats.connect(ingest_url.split(","))
    try:
        for shard in range(DEFAULT_SHARDS):
            info = await manager.jetstream().stream_info(shard_stream(STREAM, shard))
            assert info.config.num_replicas == 3
            assert info.config.subjects == [f"edge.shard.{shard}.*"]
    finally:
        await manager.close()


def test_the_worker_takes_its_database_from_the_units_credential(tmp_path: Path) -> None:
    """Under the unit, --db is absent: the db-url credential names the database."""
    credentials = tmp_path / "credentials"
    credentials.mkdir()
    db_path = tmp_path / "from-credential.db"
    (credentials / "db-url").write_text(f"sqlite:///{db_path}\n")
    for unused in ("nats-password", "nats-creds"):  # present and empty: not used
        (credentials / unused).write_text("")
    environment = {**os.environ, "CREDENTIALS_DIRECTORY": str(credentials)}
    environment.pop("CUSTOMER_STORE_DB", None)
    with nats_server(tmp_path / "nats", shards=DEFAULT_SHARDS) as node:
        wait_jetstream_ready(node.url)
        command = [sys.executable, "-m", "cloud_sync.store", "ingest", "--from", node.url]
        with (tmp_path / "worker.log").open("ab") as log:
            proc = subprocess.Popen(
                command, stdout=subprocess.PIPE, stderr=log, env=environment, cwd=tmp_path
            )
        try:
            assert proc.stdout is not None
            assert proc.stdout.readline().decode().strip() == "ingesting"

            async def send() -> None:
                nc = await nats.connect(node.url)
                try:
                    item = envelope(store_id="store-001", event_id="cred-1")
                    await nc.jetstream().publish("edge.events.store-001", json.dumps(item).encode())
                finally:
                    await nc.close()

            asyncio.run(send())
            deadline = time.monotonic() + 30
            while not (db_path.exists() and store_event_ids(f"sqlite://{db_path}")):
                assert time.monotonic() < deadline, (tmp_path / "worker.log").read_text()
                time.sleep(0.2)
        finally:
            proc.terminate()
            proc.wait(30)
            if proc.stdout is not None:
                proc.stdout.close()
    assert store_event_ids(f"sqlite://{db_path}") == ["cred-1"]
    assert proc.returncode == 0
    assert not (tmp_path / "customer-store.db").exists()  # not the default database
