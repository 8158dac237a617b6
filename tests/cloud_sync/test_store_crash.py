"""The store as a real process, killed with -9 while agents post, then restarted.

Clients retry every batch until a 2xx, as the agent's uploader does; afterwards
``customer-store stats`` must count every event exactly once. Runs on SQLite and PostgreSQL.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest
from cstore_helpers import batch
from sync_helpers import StoreProcess

BATCHES = 48
BATCH_SIZE = 200
SENDERS = 4
KILLS = 2
DEADLINE_S = 40.0

pytestmark = pytest.mark.slow


def store_cli(*args: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "cloud_sync.store", *args],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    return done.stdout


@dataclass
class Tally:
    acknowledged: int = 0
    failures: int = 0


async def send_until_acknowledged(
    session: aiohttp.ClientSession, store: StoreProcess, body: bytes, token: str, tally: Tally
) -> None:
    headers = {
        "Authorization": f"Bearer {token}",
        "Content-Type": "application/json",
        "Content-Encoding": "gzip",
    }
    deadline = time.monotonic() + DEADLINE_S
    while time.monotonic() < deadline:
        url = f"http://127.0.0.1:{store.port}/v1/events"
        try:
            async with session.post(url, data=body, headers=headers) as response:
                if 200 <= response.status < 300:
                    answer = await response.json()
                    assert answer["rejected"] == []
                    tally.acknowledged += 1
                    return
                tally.failures += 1  # a 5xx while the database recovers: retry
        except (aiohttp.ClientError, TimeoutError):
            tally.failures += 1  # the store is down or was killed mid-request: retry
        await asyncio.sleep(0.05)
    raise AssertionError("a batch was never acknowledged before the deadline")


async def killer(store: StoreProcess, tally: Tally) -> int:
    kills = 0
    deadline = time.monotonic() + DEADLINE_S
    for round_ in range(1, KILLS + 1):
        while tally.acknowledged < round_ * BATCHES // (KILLS + 1):
            if time.monotonic() > deadline:
                return kills
            await asyncio.sleep(0.01)
        # Requests are in flight from every sender: this kill lands mid-batch.
        await asyncio.to_thread(store.kill)
        kills += 1
        await asyncio.sleep(0.2)
        await asyncio.to_thread(store.start)
    return kills


@pytest.mark.parametrize("backend_name", ["sqlite", "postgres"])
async def test_kill_9_mid_batch_loses_and_doubles_nothing(
    backend_name: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    db_url = str(request.getfixturevalue("sqlite_url" if backend_name == "sqlite" else "pg_url"))
    token = (
        (
            await asyncio.to_thread(
                store_cli, "token", "create", "--db", db_url, "--store", "store-001"
            )
        )
        .strip()
        .splitlines()[-1]
    )
    events = batch(BATCHES * BATCH_SIZE, customers=50)
    bodies = [
        gzip.compress(json.dumps(events[i : i + BATCH_SIZE]).encode())
        for i in range(0, len(events), BATCH_SIZE)
    ]
    store = StoreProcess(db_url, tmp_path / "store.log")
    await asyncio.to_thread(store.start)
    tally = Tally()
    try:
        queue: asyncio.Queue[bytes] = asyncio.Queue()
        for body in bodies:
            queue.put_nowait(body)

        async def sender(session: aiohttp.ClientSession) -> None:
            while not queue.empty():
                await send_until_acknowledged(session, store, queue.get_nowait(), token, tally)

        timeout = aiohttp.ClientTimeout(total=10)
        async with aiohttp.ClientSession(timeout=timeout) as session, asyncio.TaskGroup() as tg:
            kill_task = tg.create_task(killer(store, tally), name="killer")
            for n in range(SENDERS):
                tg.create_task(sender(session), name=f"sender-{n}")
    finally:
        await asyncio.to_thread(store.stop)

    assert kill_task.result() == KILLS
    assert tally.acknowledged == BATCHES
    assert tally.failures >= 1, "no request was interrupted: the kill did not land mid-batch"
    stats = json.loads(await asyncio.to_thread(store_cli, "stats", "--db", db_url))
    assert stats["events"] == BATCHES * BATCH_SIZE
    assert stats["customers"] == 50
