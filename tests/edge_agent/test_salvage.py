"""Salvage, don't strand: a damaged buffer's readable events reach the fresh one and export,
the unreadable ones are counted (persisted until cleared); `buffer salvage` is idempotent."""

from __future__ import annotations

import asyncio
import json
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from edge_agent.buffer.reads import CUSTOMER, TELEMETRY
from tests.conftest import COLLECT_ONLY, agent_config_dict
from tests.edge_agent.test_buffer import event, open_buffer
from tests.support.agent import AgentProcess, http_get, wait_http_ready, write_config
from tests.support.broker import AmqttBroker, MosquittoBroker, free_port

EVENTS = 2000
SYNCED = 500  # the first 500 were acknowledged by the store; the rest wait for upload


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real buffer file holding 2,000 acknowledged events, checkpointed and closed."""
    path = tmp_path_factory.mktemp("pristine") / "buffer.db"

    async def build() -> None:
        async with await open_buffer(path) as buffer:
            await buffer.commit([event(n, size=150) for n in range(EVENTS)])
            rows = await buffer.pending(EVENTS, {CUSTOMER: 0, TELEMETRY: 0})
            seqs = sorted(row.seq for row in rows)
            await buffer.mark_synced(seqs[:SYNCED])

    asyncio.run(build())
    return path


def originals() -> dict[str, dict[str, Any]]:
    return {
        e.event_id: json.loads(e.to_json()) for e in (event(n, size=150) for n in range(EVENTS))
    }


def cli(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "edge_agent.cli", *args, "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def exported(config: Path) -> tuple[list[dict[str, Any]], str]:
    done = cli(config, "buffer", "export", "--format", "jsonl")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    parsed = [json.loads(line) for line in lines]  # every line is JSON ...
    assert all(isinstance(item, dict) for item in parsed)  # ... and an object
    return parsed, done.stderr


def status_of(port: int) -> dict[str, Any]:
    code, body = http_get(f"http://127.0.0.1:{port}/status")
    assert code == 200
    result: dict[str, Any] = json.loads(body)
    return result


@pytest.mark.parametrize(
    ("size", "fractions"),
    [(4096, (0.35,)), (4096, (0.2, 0.55, 0.8)), (65536, (0.3,)), (65536, (0.15, 0.6))],
    ids=["4k-once", "4k-thrice", "64k-once", "64k-twice"],
)
def test_damaged_buffer_is_salvaged_by_a_real_agent(
    tmp_path: Path,
    store_id: str,
    mqtt_broker: MosquittoBroker | AmqttBroker,
    pristine: Path,
    size: int,
    fractions: tuple[float, ...],
) -> None:
    http_port = free_port()
    document = agent_config_dict(
        tmp_path, store_id, mqtt_broker, model=COLLECT_ONLY, http={"port": http_port}
    )
    config = write_config(tmp_path / "agent.toml", document)
    db = tmp_path / "data" / "buffer.db"
    db.parent.mkdir(parents=True)
    shutil.copy(pristine, db)
    data = bytearray(db.read_bytes())
    for fraction in fractions:  # overwrite whole runs of bytes, never the header page
        offset = max(4096, int(len(data) * fraction) // 1000 * 1000 + 123)
        data[offset : offset + size] = bytes((n * 37 + 11) % 251 for n in range(size))
    db.write_bytes(bytes(data))

    agent = AgentProcess(config)
    try:
        agent.start()
        wait_http_ready(f"http://127.0.0.1:{http_port}/readyz")
        buffer = status_of(http_port)["buffer"]
        assert agent.terminate() == 0
    finally:
        agent.ensure_dead()
    salvage = buffer["salvage"]
    assert salvage is not None, "the damage went unnoticed"
    assert salvage["salvaged"] + salvage["unreadable"] == EVENTS  # each row: one or the other
    assert salvage["salvaged"] > 0
    assert buffer["total"] == salvage["salvaged"]
    assert buffer["recovered_from"] is not None
    moved = Path(buffer["recovered_from"])
    assert moved.exists()

    rows, _ = exported(config)
    assert len(rows) == salvage["salvaged"]
    expected = originals()
    for row in rows:  # what was salvaged is exactly what was acknowledged
        assert row == expected[row["event_id"]]
    with sqlite3.connect(db) as connection:
        synced = dict(
            connection.execute("SELECT event_id, synced_at IS NOT NULL FROM events").fetchall()
        )
    # Rows keep their synced state: only the unsynced go to the store again.
    assert all(synced[f"ev-{n:08d}"] for n in range(SYNCED) if f"ev-{n:08d}" in synced)
    assert not any(synced[f"ev-{n:08d}"] for n in range(SYNCED, EVENTS) if f"ev-{n:08d}" in synced)
    assert buffer["pending"] == sum(1 for value in synced.values() if not value)

    # `buffer salvage` on the moved file again adds nothing and counts nothing twice.
    again = cli(config, "buffer", "salvage", str(moved))
    assert again.returncode == 0, again.stderr
    result = json.loads(again.stdout)
    assert result["inserted"] == 0
    assert result["readable"] == salvage["salvaged"]
    assert len(exported(config)[0]) == salvage["salvaged"]

    # The figures survive a restart, until an operator clears them.
    agent.start()
    try:
        wait_http_ready(f"http://127.0.0.1:{http_port}/readyz")
        kept = status_of(http_port)["buffer"]["salvage"]
        assert (kept["salvaged"], kept["unreadable"]) == (
            salvage["salvaged"],
            salvage["unreadable"],
        )
        code, metrics = http_get(f"http://127.0.0.1:{http_port}/metrics")
        assert code == 200
        assert f"edge_buffer_salvage_unreadable_events {float(salvage['unreadable'])}" in (
            metrics.decode()
        )
        assert agent.terminate() == 0
    finally:
        agent.ensure_dead()
    cleared = cli(config, "buffer", "clear-salvage")
    assert cleared.returncode == 0, cleared.stderr
    assert json.loads(cleared.stdout)["cleared"]["unreadable"] == salvage["unreadable"]
    agent.start()
    try:
        wait_http_ready(f"http://127.0.0.1:{http_port}/readyz")
        assert status_of(http_port)["buffer"]["salvage"] is None
        assert agent.terminate() == 0
    finally:
        agent.ensure_dead()


async def test_damage_inside_a_record_never_reaches_export(tmp_path: Path) -> None:
    """A few bytes changed inside one envelope pass quick_check; the row is quarantined."""
    path = tmp_path / "data" / "buffer.db"
    async with await open_buffer(path) as buffer:
        await buffer.commit([event(n, size=150) for n in range(50)])
    data = bytearray(path.read_bytes())
    needle = b'"event_id":"ev-00000017"'
    at = data.find(needle)
    assert at > 0
    data[at : at + 1] = b"\x01"  # the envelope is no longer JSON; the page is intact
    path.write_bytes(bytes(data))
    with sqlite3.connect(path) as connection:
        assert connection.execute("PRAGMA quick_check").fetchone()[0] == "ok"
    async with await open_buffer(path) as buffer:
        assert buffer.recovered_from is None  # the file is sound, one row is not
        assert buffer.counters.quarantined["damaged_row"] == 1
        assert buffer.counters.total == 49
    config = write_config(
        tmp_path / "agent.toml", {"agent": {"store_id": "s-1", "data_dir": str(path.parent)}}
    )
    rows, _ = exported(config)
    assert len(rows) == 49
    assert "ev-00000017" not in {row["event_id"] for row in rows}


async def test_a_salvage_cut_short_is_finished_at_the_next_open(
    tmp_path: Path, pristine: Path
) -> None:
    path = tmp_path / "buffer.db"
    moved = tmp_path / "buffer.db.damaged-20261127T000000000000Z"
    shutil.copy(pristine, moved)
    async with await open_buffer(path):
        pass
    # What a kill -9 during salvage leaves: the fresh file with the entry not yet complete.
    entry = {"salvaged": 0, "unreadable": 0, "complete": False, "error": "", "at": "x"}
    with sqlite3.connect(path) as connection:
        connection.execute(
            "INSERT INTO meta (key, value) VALUES ('salvage', ?)",
            (json.dumps({moved.name: entry}),),
        )
    async with await open_buffer(path) as buffer:
        record = buffer.counters.salvage
        assert record is not None
        assert record.files[moved.name]["complete"] is True
        assert record.salvaged == EVENTS
        assert buffer.counters.total == EVENTS
    async with await open_buffer(path) as buffer:  # finished: not run a third time
        assert buffer.counters.total == EVENTS


def test_export_of_a_damaged_file_prints_only_whole_envelopes(
    tmp_path: Path, pristine: Path
) -> None:
    db = tmp_path / "data" / "buffer.db"
    db.parent.mkdir()
    shutil.copy(pristine, db)
    data = bytearray(db.read_bytes())
    offset = len(data) // 2 // 4096 * 4096 + 700
    data[offset : offset + 4096] = b"\x07" * 4096
    db.write_bytes(bytes(data))
    config = write_config(
        tmp_path / "agent.toml", {"agent": {"store_id": "s-1", "data_dir": str(db.parent)}}
    )
    rows, stderr = exported(config)  # every line a JSON object (checked inside)
    skipped = int(stderr.split("skipped ")[1].split()[0])
    assert skipped > 0
    assert len(rows) + skipped == EVENTS
    expected = originals()
    assert all(row == expected[row["event_id"]] for row in rows)
