"""A real three-node NATS cluster (four R3 shard streams) into PostgreSQL, through kills.

Every node maps ``edge.events.*`` to four shard streams. Two ``customer-store ingest``
processes start at the same moment (both create the streams), and share each shard's
durable consumer. Events of 40 stores land in the stream their store id hashes to. While
events stream in, one NATS node and one worker are killed with -9: every event is stored
exactly once. Then a
real agent (``edge-agent run``) with ``sync.transport = "nats"`` syncs through the cluster;
with the whole hub down it keeps its rows unsynced, and catches up once the hub is back; then
one node and one of its two workers are killed with -9 while its events flow: each stored once.
"""

from __future__ import annotations

import asyncio
import json
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import nats
import nats.errors
import psycopg
import pytest
from cstore_helpers import envelope

from cloud_sync.store.nats_ingest import DURABLE, STREAM
from cloud_sync.store.nats_shards import DEFAULT_SHARDS, shard_of, shard_stream
from tests.conftest import agent_config_dict
from tests.support.agent import (
    AgentProcess,
    Publisher,
    buffered_event_ids,
    event_topic,
    http_get,
    pickup,
    wait_http_ready,
    write_config,
)
from tests.support.broker import AmqttBroker, MosquittoBroker, free_port
from tests.support.nats import NatsCluster, nats_cluster, wait_jetstream_ready

TOTAL = 2000
STORES = 40
BOUND_S = 120.0
SHARDS = DEFAULT_SHARDS  # what NatsCluster maps and the workers use by default


class IngestProcess:
    """``customer-store ingest`` as a child process, killed with -9 by its pid."""

    def __init__(
        self, nats_url: str, db_url: str, log_path: Path, *extra: str, wait: bool = True
    ) -> None:
        command = [sys.executable, "-m", "cloud_sync.store", "ingest", "--from", nats_url]
        command += ["--db", db_url, "--batch", "50", "--ack-wait-s", "3", "--pool-size", "2"]
        with log_path.open("ab") as log:
            self.proc = subprocess.Popen(command + list(extra), stdout=subprocess.PIPE, stderr=log)
        self.log_path = log_path
        if wait:
            self.wait_ready()

    def wait_ready(self) -> None:
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], 60)
        line = self.proc.stdout.readline().decode() if ready else ""
        assert line.strip() == "ingesting", f"worker did not start: {self.log_tail()}"

    def log_tail(self) -> str:
        return self.log_path.read_text(errors="replace")[-3000:]

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        if self.proc.stdout is not None:
            self.proc.stdout.close()


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[NatsCluster]:
    with nats_cluster(tmp_path / "cluster") as running:
        wait_jetstream_ready(running.url, within=60)
        yield running


def pending(http_port: int) -> int:
    status, body = http_get(f"http://127.0.0.1:{http_port}/status")
    assert status == 200
    return int(json.loads(body)["buffer"]["pending"])


def stored(db_url: str) -> tuple[int, int]:
    """(rows, distinct (store_id, event_id)) in the events table."""
    with psycopg.connect(db_url) as conn:
        row = conn.execute(
            "SELECT count(*), count(DISTINCT (store_id, event_id)) FROM events"
        ).fetchone()
    assert row is not None
    return int(row[0]), int(row[1])


def wait_stored(db_url: str, count: int, within: float = BOUND_S) -> tuple[int, int]:
    deadline = time.monotonic() + within
    seen = stored(db_url)
    while seen[1] < count and time.monotonic() < deadline:
        time.sleep(0.3)
        seen = stored(db_url)
    return seen


async def publish_until_acked(
    url: str, events: list[tuple[str, dict[str, object]]], streams: list[str] | None = None
) -> int:
    """Publish each event until its PubAck arrives (as an agent does); count retries and
    append the stream each PubAck names to ``streams``."""
    nc = await nats.connect(url.split(","), max_reconnect_attempts=-1, reconnect_time_wait=0.2)
    js = nc.jetstream(timeout=2)
    retries = 0
    try:
        for store_id, item in events:
            payload = json.dumps(item).encode()
            headers = {"Nats-Msg-Id": f"{store_id}:{item['event_id']}"}
            for _attempt in range(200):
                try:
                    ack = await js.publish(f"edge.events.{store_id}", payload, headers=headers)
                    if streams is not None:
                        streams.append(ack.stream)
                    break
                except (nats.errors.Error, TimeoutError):
                    retries += 1
                    await asyncio.sleep(0.1)
            else:
                raise AssertionError(f"no PubAck for {item['event_id']} after 200 tries")
    finally:
        await nc.close()
    return retries


def consumer_settled(url: str, shards: int = SHARDS) -> list[tuple[int, int, int]]:
    """Per shard stream: (pending, ack pending, the stream's replicas)."""

    async def ask() -> list[tuple[int, int, int]]:
        nc = await nats.connect(url.split(","))
        try:
            js = nc.jetstream(timeout=5)
            found = []
            for name in (shard_stream(STREAM, k) for k in range(shards)):
                info = await js.consumer_info(name, DURABLE)
                stream = await js.stream_info(name)
                replicas = int(stream.config.num_replicas or 0)
                found.append((info.num_pending, info.num_ack_pending, replicas))
            return found
        finally:
            await nc.close()

    return asyncio.run(ask())


def test_three_node_cluster_kill_a_node_and_a_worker_every_event_once(
    cluster: NatsCluster, pg_url: str, tmp_path: Path
) -> None:
    assert cluster.shards == SHARDS
    # Started together: both create the four R3 streams at once.
    workers = [
        IngestProcess(cluster.url, pg_url, tmp_path / f"worker-{n}.log", wait=False)
        for n in range(2)
    ]
    try:
        for worker in workers:
            worker.wait_ready()
        events = [
            (f"store-{n % STORES}", envelope(store_id=f"store-{n % STORES}", event_id=f"e{n:05d}"))
            for n in range(TOTAL)
        ]
        streams: list[str] = []
        third = TOTAL // 3
        asyncio.run(publish_until_acked(cluster.url, events[:third], streams))
        assert wait_stored(pg_url, 1, 30)[1] > 0  # the workers are taking events
        cluster.nodes[0].kill()  # a NATS node gone mid-stream (-9)
        asyncio.run(publish_until_acked(cluster.url, events[third : 2 * third], streams))
        workers[0].kill()  # a worker gone mid-batch (-9): its unacked batch is redelivered
        asyncio.run(publish_until_acked(cluster.url, events[2 * third :], streams))
        # Each event's PubAck came from the shard its store hashes to; all four got some.
        assert streams == [shard_stream(STREAM, shard_of(store, SHARDS)) for store, _ in events]
        assert len(set(streams)) == SHARDS
        rows, distinct = wait_stored(pg_url, TOTAL)
        assert distinct == TOTAL, (distinct, workers[1].log_tail(), cluster.logs())
        assert rows == TOTAL
        # Nothing left for anyone: no redelivery pending that could add a row later.
        settled = [(0, 0, 3)] * SHARDS  # R3 on the cluster
        deadline = time.monotonic() + 30
        while consumer_settled(cluster.url) != settled and time.monotonic() < deadline:
            time.sleep(0.3)
        assert consumer_settled(cluster.url) == settled
        assert stored(pg_url) == (TOTAL, TOTAL)
    finally:
        for worker in workers:
            worker.stop()


def test_a_worker_with_other_shards_than_the_cluster_exits_2(
    cluster: NatsCluster, pg_url: str, tmp_path: Path
) -> None:
    worker = IngestProcess(cluster.url, pg_url, tmp_path / "w.log", "--shards", "3", wait=False)
    try:
        assert worker.proc.wait(90) == 2, worker.log_tail()
        assert "this worker runs --shards 3, but the hub put edge.events._shardprobe-" in (
            worker.log_tail()
        )
        assert stored(pg_url) == (0, 0)
    finally:
        worker.stop()


def test_agent_syncs_through_the_cluster_and_catches_up_after_hub_outage(
    cluster: NatsCluster,
    pg_url: str,
    tmp_path: Path,
    store_id: str,
    mqtt_broker: MosquittoBroker | AmqttBroker,
) -> None:
    workers = [IngestProcess(cluster.url, pg_url, tmp_path / f"worker-{n}.log") for n in range(2)]
    http_port = free_port()
    document = agent_config_dict(
        tmp_path,
        store_id,
        mqtt_broker,
        http={"port": http_port},
        sync={
            "transport": "nats",
            "url": cluster.url,
            "interval_s": 0.3,
            "batch_size": 40,
            "timeout_s": 2.0,
            "backoff_max_s": 0.5,
        },
        model={"enabled": False},
    )
    agent = AgentProcess(write_config(tmp_path / "agent.toml", document))
    publisher = Publisher(mqtt_broker.host, mqtt_broker.port)
    db_path = tmp_path / "data" / "buffer.db"
    try:
        agent.start()
        wait_http_ready(f"http://127.0.0.1:{http_port}/readyz")
        first = [f"a-{n:04d}" for n in range(100)]
        for event_id in first:
            publisher.publish(event_topic(store_id), pickup(event_id))
        publisher.wait_all(60)
        assert wait_stored(pg_url, len(first)) == (len(first), len(first)), agent.log.read_text()

        for node in cluster.nodes:  # the whole hub down: the agent keeps collecting
            node.kill()
        second = [f"b-{n:04d}" for n in range(100)]
        for event_id in second:
            publisher.publish(event_topic(store_id), pickup(event_id))
        publisher.wait_all(60)
        deadline = time.monotonic() + 30
        while len(buffered_event_ids(db_path)) < 200 and time.monotonic() < deadline:
            time.sleep(0.2)
        deadline = time.monotonic() + 30  # the first rows' marks land just after their PubAcks
        while pending(http_port) != len(second) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert pending(http_port) == len(second)  # unsynced, kept
        assert stored(pg_url) == (len(first), len(first))

        for node in cluster.nodes:
            node.start(wait=False)
        total = len(first) + len(second)
        assert wait_stored(pg_url, total) == (total, total), agent.log.read_text()[-3000:]
        deadline = time.monotonic() + 30
        while pending(http_port) != 0 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert pending(http_port) == 0

        # The agent's own stream through a node and a worker killed with -9 mid-way.
        third = [f"c-{n:04d}" for n in range(150)]
        for event_id in third[:50]:
            publisher.publish(event_topic(store_id), pickup(event_id))
        publisher.wait_all(60)
        cluster.nodes[1].kill()
        for event_id in third[50:100]:
            publisher.publish(event_topic(store_id), pickup(event_id))
        workers[0].kill()
        for event_id in third[100:]:
            publisher.publish(event_topic(store_id), pickup(event_id))
        publisher.wait_all(60)
        total += len(third)
        assert wait_stored(pg_url, total, 90) == (total, total), agent.log.read_text()[-3000:]
        deadline = time.monotonic() + 30
        while pending(http_port) != 0 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert pending(http_port) == 0
        time.sleep(1.0)  # room for a redelivered batch to add a row, were it let through
        assert stored(pg_url) == (total, total)
    finally:
        publisher.close()
        if agent.process is not None and agent.process.poll() is None:
            agent.terminate()
        agent.ensure_dead()
        for worker in workers:
            worker.stop()
