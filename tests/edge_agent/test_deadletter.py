"""Poison messages are dead-lettered, never looped (issue 9): the journal on real files, and
a real agent process killed -9 while it handles one message, restarted by the test the way
systemd would, until the message is quarantined as "poison" and acknowledged."""

from __future__ import annotations

import contextlib
import json
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from edge_agent.deadletter import HandlingJournal, fingerprint
from tests.conftest import COLLECT_ONLY, agent_config_dict
from tests.support.agent import (
    AgentProcess,
    Publisher,
    buffered_event_ids,
    event_topic,
    http_get,
    pickup,
    quarantine_reasons,
    wait_http_ready,
    write_config,
)
from tests.support.broker import AmqttBroker, MosquittoBroker, free_port
from tests.support.services import missing_service


def test_unfinished_bursts_count_a_death_and_finished_ones_do_not(tmp_path: Path) -> None:
    poison, innocent, done = fingerprint("t", b"p"), fingerprint("t", b"i"), fingerprint("t", b"d")
    first = HandlingJournal(tmp_path, "mqtt", max_deaths=2)
    finished = first.begin([done, None])
    first.end(finished, [done, None])
    first.begin([poison, innocent, None])  # the process "dies" here: no end mark
    first.close()

    second = HandlingJournal(tmp_path, "mqtt", max_deaths=2)
    assert (second.verdict(poison), second.verdict(innocent), second.verdict(done)) == (1, 1, 0)
    assert not second.is_poison(poison)
    # Handled alone after the restart: the innocent one survives and is forgotten...
    batch = second.begin([innocent])
    second.end(batch, [innocent])
    second.begin([poison])  # ...the poison one kills the process again.
    second.close()

    third = HandlingJournal(tmp_path, "mqtt", max_deaths=2)
    assert third.verdict(innocent) == 0
    assert third.is_poison(poison)
    batch = third.begin([poison])
    third.end(batch, [poison])  # dead-lettered and acknowledged: forgotten
    third.close()
    assert HandlingJournal(tmp_path, "mqtt", max_deaths=2).verdict(poison) == 0


def test_a_restart_within_the_process_is_not_a_death(tmp_path: Path) -> None:
    fp = fingerprint("t", b"x")
    journal = HandlingJournal(tmp_path, "mqtt", max_deaths=1)
    journal.begin([fp])
    journal.abandon()  # the source failed and runs again; the broker redelivers
    journal.close()
    assert HandlingJournal(tmp_path, "mqtt", max_deaths=1).verdict(fp) == 0


def test_a_damaged_counts_file_starts_over(tmp_path: Path) -> None:
    (tmp_path / "mqtt.deaths.json").write_bytes(b"\x00{not json")
    (tmp_path / "mqtt.journal").write_bytes(b"B 0 short\nE\ngarbage \xff\n")
    journal = HandlingJournal(tmp_path, "mqtt", max_deaths=3)
    assert journal.deaths == {}


@contextlib.contextmanager
def _buffer_write_locked(db: Path) -> Iterator[None]:
    """Hold the buffer's write lock: the agent's commit of what it handles waits (SQLite's
    busy timeout), so the message stays in hand until the test kills the process."""
    connection = sqlite3.connect(db, isolation_level=None, timeout=10)
    try:
        connection.execute("BEGIN IMMEDIATE")
        yield
    finally:
        connection.execute("ROLLBACK")
        connection.close()


def _wait_in_hand(journal: Path, fp: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if journal.exists() and fp in journal.read_text("ascii", errors="replace"):
            return
        time.sleep(0.01)
    raise TimeoutError(f"the agent never took the message in hand ({journal})")


@pytest.mark.usefixtures("mqtt_client")  # both clients: paho and awscrt
def test_a_message_that_kills_the_agent_is_dead_lettered_after_n_deaths(
    tmp_path: Path, store_id: str, private_broker: MosquittoBroker | AmqttBroker
) -> None:
    if not private_broker.persistent:
        missing_service("redelivery after kill -9 needs mosquitto's persistent sessions")
    max_deaths = 2
    http_port = free_port()
    document = agent_config_dict(
        tmp_path,
        store_id,
        private_broker,
        model=COLLECT_ONLY,
        http={"port": http_port},
        input={"poison_max_deaths": max_deaths},
    )
    config = write_config(tmp_path / "agent.toml", document)
    data = tmp_path / "data"
    db, journal = data / "buffer.db", data / "inflight" / "mqtt.journal"
    base = f"http://127.0.0.1:{http_port}"
    topic = event_topic(store_id)
    poison = pickup("poison-1")
    fp = fingerprint(topic, poison)
    agent = AgentProcess(config)
    publisher = Publisher(private_broker.host, private_broker.port)
    try:
        agent.start()  # first start: creates the buffer and the agent's broker session
        wait_http_ready(base + "/readyz")
        for death in range(max_deaths):
            with _buffer_write_locked(db):
                if death == 0:
                    publisher.publish(topic, poison)
                    publisher.wait_all(20)
                else:
                    agent.start()  # the restart systemd would do; the broker redelivers
                    wait_http_ready(base + "/healthz")  # its journal is a new one by now
                _wait_in_hand(journal, fp)
                agent.kill()  # the process dies while handling the message
        agent.start()
        deadline = time.monotonic() + 30
        while "poison" not in quarantine_reasons(db) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert quarantine_reasons(db) == ["poison"]  # dead-lettered, not looped
        publisher.publish(topic, pickup("after-1"))  # and the agent goes on
        publisher.wait_all(20)
        deadline = time.monotonic() + 30
        while "after-1" not in buffered_event_ids(db) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert buffered_event_ids(db) == ["after-1"]
        assert agent.terminate() == 0
        agent.start()  # acknowledged: the broker does not send it again
        wait_http_ready(base + "/readyz")
        time.sleep(1.0)
        status = json.loads(http_get(base + "/status")[1])
        assert status["sources"]["mqtt"]["received"] == 0
        assert agent.terminate() == 0
    finally:
        publisher.close()
        agent.ensure_dead()
    log = agent.log.read_text()
    assert log.count("deadletter.deaths.recorded") == max_deaths
    assert "mqtt.message.dead_lettered" in log
    assert quarantine_reasons(db) == ["poison"]
    assert json.loads((data / "inflight" / "mqtt.deaths.json").read_text()) == {}


def test_the_journal_stays_small_under_steady_load(tmp_path: Path) -> None:
    held = fingerprint("t", b"held")
    journal = HandlingJournal(tmp_path, "mqtt", max_deaths=3)
    journal.begin([held])  # in hand the whole time: the journal is never idle
    fps = [fingerprint("t", str(n).encode()) for n in range(2000)]
    for _ in range(40):  # ~2.7 MB of marks written in all
        batch = journal.begin(fps)
        journal.end(batch, fps)
    size = (tmp_path / "mqtt.journal").stat().st_size
    journal.close()
    assert size < 1024 * 1024 + 70_000  # compacted; no hole left behind by the truncation
    again = HandlingJournal(tmp_path, "mqtt", max_deaths=3)
    assert again.deaths == {held: 1}  # what was in hand survived the compaction
