"""The NATS downlink with every part a real process: ``edge-agent run`` (``transport = "nats"``,
``nats_downlink = true``), ``customer-store serve``, ``customer-store announce``,
``customer-store ingest``, nats-server and mosquitto, all on loopback; the store on SQLite and
on PostgreSQL.

An admin erases a customer over HTTP: the notice reaches the agent over NATS and its buffered
rows of that customer are gone. The agent is killed with -9, another customer is erased, the
agent restarts and applies it. The announcer is killed with -9 and restarted: nothing is
announced twice (the agent's count of notices grows by exactly the new ones).
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import sqlite3
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

from sync_helpers import StoreProcess, store_cli

from cloud_sync.store.nats_shards import DEFAULT_SHARDS
from tests.conftest import agent_config_dict
from tests.support.agent import (
    AgentProcess,
    Publisher,
    event_topic,
    http_get,
    pickup,
    wait_http_ready,
    write_config,
)
from tests.support.broker import AmqttBroker, MosquittoBroker, free_port
from tests.support.nats import nats_server, wait_jetstream_ready

BOUND_S = 60.0


class CliProcess:
    """A ``customer-store`` subcommand that prints one ready word, stopped by its pid."""

    def __init__(self, args: list[str], ready_word: str, log_path: Path) -> None:
        command = [sys.executable, "-m", "cloud_sync.store", *args]
        with log_path.open("ab") as log:
            self.proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=log)
        self.log_path = log_path
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], 60)
        line = self.proc.stdout.readline().decode() if ready else ""
        assert line.strip() == ready_word, log_path.read_text(errors="replace")[-3000:]

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
        self._close()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        self._close()

    def _close(self) -> None:
        if self.proc.stdout is not None:
            self.proc.stdout.close()


def held_customers(db_path: Path) -> set[str]:
    if not db_path.exists():
        return set()
    with contextlib.closing(sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, timeout=10)) as db:
        try:
            rows = db.execute(
                "SELECT DISTINCT customer_id FROM events WHERE customer_id IS NOT NULL"
            )
            return {row[0] for row in rows}
        except sqlite3.OperationalError:
            return set()


def wait_for(probe: Callable[[], bool], what: str, log: Path, within: float = BOUND_S) -> None:
    deadline = time.monotonic() + within
    while not probe():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not within {within}s\n{log.read_text()[-4000:]}")
        time.sleep(0.2)


def nats_status(http_port: int) -> dict[str, object]:
    status, body = http_get(f"http://127.0.0.1:{http_port}/status")
    assert status == 200
    document = json.loads(body)["sync"]["nats_downlink"]
    assert isinstance(document, dict)
    return document


def erase(store_url: str, admin: str, customer_id: str) -> None:
    request = urllib.request.Request(
        f"{store_url}/v1/customers/{customer_id}",
        method="DELETE",
        headers={"Authorization": f"Bearer {admin}"},
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        assert response.status == 200


def test_real_agent_erased_over_nats_through_kills_and_restarts(
    tmp_path: Path, store_id: str, mqtt_broker: MosquittoBroker | AmqttBroker, db_url: str
) -> None:
    token = store_cli(db_url, "token", "create", "--store", store_id)
    admin = store_cli(db_url, "admin", "create")
    store = StoreProcess(db_url, tmp_path / "store.log")
    http_port = free_port()
    # A hub that shards the events by store, as the ingest workers expect by default.
    with nats_server(tmp_path / "nats", shards=DEFAULT_SHARDS) as node:
        wait_jetstream_ready(node.url)
        store.start()
        announce_args = ["announce", "--db", db_url, "--to", node.url, "--interval-s", "0.2"]
        ingest_args = ["ingest", "--from", node.url, "--db", db_url, "--batch", "50"]
        announcer = CliProcess(announce_args, "announcing", tmp_path / "announce.log")
        worker = CliProcess(ingest_args, "ingesting", tmp_path / "ingest.log")
        document = agent_config_dict(
            tmp_path,
            store_id,
            mqtt_broker,
            http={"port": http_port},
            sync={
                "transport": "nats",
                "url": node.url,
                "downlink_url": store.url,
                "token": token,
                "nats_downlink": True,
                "interval_s": 0.3,
                "timeout_s": 3.0,
                "backoff_initial_s": 0.1,
                "backoff_max_s": 0.5,
            },
            model={"enabled": False},
        )
        agent = AgentProcess(write_config(tmp_path / "agent.toml", document))
        publisher = Publisher(mqtt_broker.host, mqtt_broker.port)
        buffer_path = tmp_path / "data" / "buffer.db"
        try:
            agent.start()
            wait_http_ready(f"http://127.0.0.1:{http_port}/readyz")
            for customer in ("c-1", "c-2", "c-3"):
                for n in range(3):
                    publisher.publish(event_topic(store_id), pickup(f"{customer}-{n}", customer))
            publisher.wait_all(60)
            wait_for(
                lambda: held_customers(buffer_path) == {"c-1", "c-2", "c-3"},
                "events buffered",
                agent.log,
            )
            wait_for(lambda: bool(nats_status(http_port)["connected"]), "connected", agent.log)

            erase(store.url, admin, "c-1")
            wait_for(lambda: "c-1" not in held_customers(buffer_path), "c-1 erased", agent.log)
            assert held_customers(buffer_path) == {"c-2", "c-3"}
            assert nats_status(http_port)["notices"] == 1

            agent.kill()  # -9; the store erases c-2 while the agent is down
            erase(store.url, admin, "c-2")
            announcer.kill()  # and the announcer dies too, after or before announcing it
            announcer = CliProcess(announce_args, "announcing", tmp_path / "announce.log")
            agent.start()
            wait_http_ready(f"http://127.0.0.1:{http_port}/readyz")
            wait_for(lambda: "c-2" not in held_customers(buffer_path), "c-2 erased", agent.log)
            assert held_customers(buffer_path) == {"c-3"}
            time.sleep(1.0)  # anything announced twice would arrive meanwhile
            status = nats_status(http_port)
            assert status["notices"] == 1  # since this start: only the c-2 notice
            assert status["refused"] == 0
        finally:
            publisher.close()
            if agent.process is not None and agent.process.poll() is None:
                agent.terminate()
            agent.ensure_dead()
            announcer.stop()
            worker.stop()
            store.stop()
    assert node.process is None
