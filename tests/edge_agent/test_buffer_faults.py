"""The writer never dies: unstorable rows, a bug in a call, a full disk, the sync deadlock."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from pathlib import Path

import pytest

from edge_agent.errors import StorageError
from edge_agent.events import Rejected
from tests.edge_agent.test_buffer import event, open_buffer
from tests.support.small_fs import fill, free, small_filesystem

BOUND_S = 10.0  # every wait is bounded: a regression fails, it never hangs the suite


def event_ids(connection: sqlite3.Connection) -> set[str]:
    return {row[0] for row in connection.execute("SELECT event_id FROM events")}


async def test_an_unstorable_row_is_quarantined_and_the_rest_committed(tmp_path: Path) -> None:
    path = tmp_path / "buffer.db"
    async with await open_buffer(path, commit_linger_ms=50) as buffer:
        lone_surrogate = event(2, data={"sku": "\ud800"})  # passes json, not UTF-8
        wide_customer = event(3, customer_id="c-\udfff")
        first = asyncio.ensure_future(buffer.commit([event(1), lone_surrogate]))
        second = asyncio.ensure_future(
            buffer.commit([event(4), wide_customer], [Rejected("mqtt:t", "not_json", b"{")])
        )
        await asyncio.wait_for(asyncio.gather(first, second), BOUND_S)
        # The writer is alive: later commits and calls are served.
        await asyncio.wait_for(buffer.commit([event(5)]), BOUND_S)
        stored = await buffer._call(event_ids)
        quarantined = await buffer._call(
            lambda c: c.execute("SELECT reason, detail, raw FROM quarantine ORDER BY id").fetchall()
        )
        assert buffer.writer_alive
    assert stored == {"ev-00000001", "ev-00000004", "ev-00000005"}
    reasons = sorted(reason for reason, _, _ in quarantined)
    assert reasons == ["not_json", "unstorable", "unstorable"]
    unstorable = [(detail, raw) for reason, detail, raw in quarantined if reason == "unstorable"]
    assert all("UnicodeEncodeError" in detail for detail, _ in unstorable)
    assert any(b"ev-00000002" in raw and b"\\ud800" in raw for _, raw in unstorable)
    assert buffer.counters.quarantined["unstorable"] == 2


async def test_a_failing_call_fails_only_itself(tmp_path: Path) -> None:
    async with await open_buffer(tmp_path / "buffer.db") as buffer:

        def broken(connection: sqlite3.Connection) -> None:
            connection.execute("BEGIN IMMEDIATE")
            connection.execute("INSERT INTO meta (key, value) VALUES ('x', 'y')")
            raise KeyError("a bug in a job")

        with pytest.raises(KeyError):
            await asyncio.wait_for(buffer._call(broken), BOUND_S)
        await asyncio.wait_for(buffer.commit([event(1)]), BOUND_S)
        left = await buffer._call(lambda c: c.execute("SELECT count(*) FROM meta").fetchone()[0])
        assert left == 0  # the broken call's transaction was rolled back
        assert buffer.writer_alive


async def test_sqlite_errors_leave_the_buffer_as_storage_errors(tmp_path: Path) -> None:
    async with await open_buffer(tmp_path / "buffer.db") as buffer:
        with pytest.raises(StorageError, match="OperationalError") as raised:
            await asyncio.wait_for(buffer._call(lambda c: c.execute("SELECT nope")), BOUND_S)
        assert isinstance(raised.value.__cause__, sqlite3.OperationalError)
        assert buffer.writer_alive


async def test_a_dead_writer_fails_calls_at_once_and_says_so(tmp_path: Path) -> None:
    async with await open_buffer(tmp_path / "buffer.db") as buffer:

        def stop_the_thread(connection: sqlite3.Connection) -> None:
            raise SystemExit("not a job's business")

        with pytest.raises(StorageError):
            await asyncio.wait_for(buffer._call(stop_the_thread), BOUND_S)
        await asyncio.wait_for(asyncio.to_thread(buffer._thread.join, BOUND_S), BOUND_S + 1)
        assert not buffer.writer_alive
        assert buffer.writer_error is not None
        assert "SystemExit" in buffer.writer_error
        with pytest.raises(StorageError, match="not running"):
            await asyncio.wait_for(buffer.commit([event(1)]), BOUND_S)


async def test_sync_mark_behind_a_held_commit_is_served(tmp_path: Path) -> None:
    """Issue 9 item 5: a mark that arrives within the linger window behind a commit that
    waits for room was held until that commit finished, which only the mark could do."""
    path = tmp_path / "buffer.db"
    async with await open_buffer(path, max_bytes=1024 * 1024, commit_linger_ms=100) as buffer:
        # Most of the budget in unsynced customer events: the batch below does not fit.
        await buffer.commit([event(n, size=400) for n in range(1000)])
        assert not buffer.counters.backpressure
        seqs = await buffer._call(
            lambda c: [r[0] for r in c.execute("SELECT seq FROM events ORDER BY seq")]
        )
        # Hold the writer with a job of the test's own, so that the commit and the mark
        # below are both queued before it picks up either: the mark lands in the commit's
        # linger window every time.
        release = threading.Event()
        blocker = asyncio.ensure_future(buffer._call(lambda c: release.wait(BOUND_S)))
        await asyncio.sleep(0)
        too_big = [event(100_000 + i, size=400) for i in range(400)]
        held = asyncio.ensure_future(buffer.commit(too_big))
        await asyncio.sleep(0)
        mark = asyncio.ensure_future(buffer.mark_synced(seqs))
        await asyncio.sleep(0)
        release.set()
        await asyncio.wait_for(blocker, BOUND_S)
        marked = await asyncio.wait_for(mark, BOUND_S)
        assert marked == len(seqs)
        await asyncio.wait_for(held, BOUND_S)  # the marked rows were evicted to make room
        assert buffer.counters.holds["backpressure"] >= 1  # it did wait for room
        stored = await buffer._call(event_ids)
    assert {e.event_id for e in too_big} <= stored
    assert buffer.counters.drops["synced_evicted"] > 0


async def test_full_disk_holds_then_resumes_by_itself(tmp_path: Path) -> None:
    with small_filesystem(tmp_path / "small", 8) as small:
        path = small / "buffer.db"
        async with await open_buffer(path) as buffer:
            await buffer.commit([event(n, size=300) for n in range(200)])
            filler = fill(small)
            held_batches = []
            n = 1000
            for _ in range(200):  # until the disk refuses (the WAL has some slack)
                batch = [event(n + i, size=2000) for i in range(50)]
                n += 50
                pending = asyncio.ensure_future(buffer.commit(batch))
                done, _ = await asyncio.wait([pending], timeout=2.0)
                if not done:
                    held_batches.append((pending, batch))
                    break
                pending.result()
            assert held_batches, "the disk never filled"
            assert buffer.counters.disk_full is True
            assert buffer.counters.held == "disk_full"
            assert buffer.writer_alive
            # Reads are served while the batch is held.
            assert await asyncio.wait_for(buffer._call(lambda c: 1), BOUND_S) == 1
            free(filler)
            for pending, _ in held_batches:
                await asyncio.wait_for(pending, BOUND_S)
            assert buffer.counters.disk_full is False
            stored = await buffer._call(event_ids)
            assert buffer.counters.holds["disk_full"] >= 1
        for _, batch in held_batches:
            assert {e.event_id for e in batch} <= stored
