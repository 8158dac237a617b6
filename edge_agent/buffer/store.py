"""The durable buffer: one owner thread for the SQLite file, group commit, then acknowledge.

Every write and read of the agent's database runs on one thread that owns the connection
(sqlite3 is blocking; the event loop never waits on it). ``commit()`` hands a job to that
thread and resolves once the job's transaction is committed; the thread gathers the jobs
that arrive within ``commit_linger_ms`` (up to ``max_batch`` events) into one transaction,
so throughput comes from batching while every acknowledgement still follows its commit.
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import queue
import sqlite3
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, TypeVar

from edge_agent.buffer import budget
from edge_agent.buffer.integrity import damaged_files, open_checked
from edge_agent.buffer.schema import migrate
from edge_agent.config import BufferSection
from edge_agent.errors import StorageError
from edge_agent.events import Event, Rejected

log = logging.getLogger(__name__)

T = TypeVar("T")
_BACKPRESSURE_RETRY_S: Final = 0.25


@dataclass
class BufferCounters:
    """Figures kept by the owner thread; read (never written) from the event loop."""

    total: int = 0  # events held, synced or not
    pending: int = 0  # events not yet acknowledged by the central store
    committed: int = 0  # events committed since start (duplicates excluded)
    duplicates: int = 0  # events already held (a redelivery), since start
    commits: int = 0  # transactions since start
    quarantined: Counter[str] = field(default_factory=Counter)  # since start, by reason
    drops: Counter[str] = field(default_factory=Counter)  # since start, by reason
    backpressure: bool = False  # full of what may not be dropped: not acknowledging
    last_commit_monotonic: float = 0.0


@dataclass
class _Commit:
    events: Sequence[Event]
    rejects: Sequence[Rejected]
    future: asyncio.Future[None]
    loop: asyncio.AbstractEventLoop


@dataclass
class _Call:
    function: Callable[[sqlite3.Connection], Any]
    future: asyncio.Future[Any]
    loop: asyncio.AbstractEventLoop


class _Stop:
    pass


class Buffer:
    """The agent's SQLite buffer. Open with ``await Buffer.open(...)``, close with ``aclose()``."""

    def __init__(self, path: Path, settings: BufferSection, opened: sqlite3.Connection) -> None:
        self.path = path
        self.settings = settings
        self.counters = BufferCounters()
        self.recovered_from: Path | None = None
        self._connection = opened
        self._jobs: queue.SimpleQueue[_Commit | _Call | _Stop] = queue.SimpleQueue()
        # Jobs taken off the queue while a batch waited for room; served first, in order.
        self._deferred: collections.deque[_Commit | _Call | _Stop] = collections.deque()
        self._thread = threading.Thread(target=self._own, name="buffer-writer", daemon=True)
        self._closed = False

    @classmethod
    async def open(cls, path: Path, settings: BufferSection) -> Buffer:
        opened = await asyncio.to_thread(open_checked, path, settings.synchronous)
        buffer = cls(path, settings, opened.connection)
        buffer.recovered_from = opened.recovered_from
        await asyncio.to_thread(buffer._prepare)
        buffer._thread.start()
        await buffer.recount()
        return buffer

    @property
    def damaged_files(self) -> int:
        return len(damaged_files(self.path))

    async def commit(self, events: Sequence[Event], rejects: Sequence[Rejected] = ()) -> None:
        """Return once the events are committed and the rejections quarantined."""
        if self._closed:
            raise StorageError("buffer is closed")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()
        self._jobs.put(_Commit(events, rejects, future, loop))
        await future

    async def call(self, function: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``function(connection)`` on the owner thread (reads, sync marks, erasure)."""
        if self._closed:
            raise StorageError("buffer is closed")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        self._jobs.put(_Call(function, future, loop))
        return await future

    async def mark_synced(self, seqs: Sequence[int]) -> int:
        """Mark rows as acknowledged by the central store, in one transaction."""

        def mark(connection: sqlite3.Connection) -> int:
            now = time.time()
            connection.execute("BEGIN IMMEDIATE")
            try:
                # One statement over a JSON array: about 2.5x faster than a row per execute.
                marked = connection.execute(
                    "UPDATE events SET synced_at = ? WHERE synced_at IS NULL "
                    "AND seq IN (SELECT value FROM json_each(?))",
                    (now, json.dumps(list(seqs))),
                ).rowcount
                connection.execute("COMMIT")
            except BaseException:
                connection.execute("ROLLBACK")
                raise
            self.counters.pending -= marked
            return marked

        return await self.call(mark)

    async def recount(self) -> None:
        """Set total and pending from the file: erasures (from the CLI or sync) delete rows
        the counters never saw. Runs on the owner thread, so no write slips in between."""

        def count(connection: sqlite3.Connection) -> None:
            self.counters.total = connection.execute("SELECT count(*) FROM events").fetchone()[0]
            self.counters.pending = connection.execute(
                "SELECT count(*) FROM events WHERE synced_at IS NULL"
            ).fetchone()[0]

        await self.call(count)

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._jobs.put(_Stop())
        # Shielded: a cancelled shutdown must still let the writer finish its transaction.
        await asyncio.shield(asyncio.to_thread(self._thread.join))

    async def __aenter__(self) -> Buffer:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    # ---- the owner thread -------------------------------------------------------------

    def _prepare(self) -> None:
        connection = self._connection
        migrate(connection)
        if self.recovered_from is not None:
            with connection:
                connection.execute(
                    "INSERT OR REPLACE INTO meta (key, value) VALUES ('recovered_from', ?)",
                    (str(self.recovered_from),),
                )

    def _own(self) -> None:
        try:
            self._serve()
        finally:
            self._connection.close()

    def _serve(self) -> None:
        linger = self.settings.commit_linger_ms / 1000.0
        while True:
            job = self._next_job(None)
            if job is None or isinstance(job, _Stop):
                return
            if isinstance(job, _Call):
                self._run_call(job)
                continue
            batch, held = self._gather(job, linger)
            self._commit_batch(batch)
            for other in held:
                if isinstance(other, _Stop):
                    return
                self._run_call(other)

    def _gather(self, first: _Commit, linger: float) -> tuple[list[_Commit], list[_Call | _Stop]]:
        """Take the commits that arrive within the linger window, up to max_batch events."""
        batch = [first]
        held: list[_Call | _Stop] = []
        size = len(first.events) + len(first.rejects)
        deadline = time.monotonic() + linger
        while size < self.settings.max_batch:
            remaining = deadline - time.monotonic()
            job = self._next_job(max(remaining, 0.0))
            if job is None:
                break
            if isinstance(job, _Commit):
                batch.append(job)
                size += len(job.events) + len(job.rejects)
            else:
                held.append(job)
                break  # keep order: a call or stop ends the batch
        return batch, held

    def _commit_batch(self, batch: list[_Commit]) -> None:
        events = [event for job in batch for event in job.events]
        rejects = [reject for job in batch for reject in job.rejects]
        now = time.time()
        rows = [_event_row(event, now) for event in events]
        incoming = budget.estimate_bytes(sum(len(row[6]) for row in rows), len(rows))
        if len(batch) > 1 and incoming > self.settings.max_bytes // 4:
            # A batch must fit the budget to be committed: split it near a small budget.
            middle = len(batch) // 2
            self._commit_batch(batch[:middle])
            self._commit_batch(batch[middle:])
            return
        try:
            while not self._write(rows, events, rejects, incoming):
                if not self._wait_for_room():
                    # Closing while full: the held batch was never acknowledged, so failing
                    # it loses nothing (the devices and the broker send it again).
                    closing = StorageError("buffer closed while waiting for room")
                    for job in batch:
                        job.loop.call_soon_threadsafe(_fail, job.future, closing)
                    return
        except sqlite3.Error as exc:
            error = StorageError(f"buffer write failed at {self.path}: {exc}")
            error.__cause__ = exc
            log.exception("buffer.write.failed path=%s", self.path)
            for job in batch:
                job.loop.call_soon_threadsafe(_fail, job.future, error)
            raise
        self.counters.last_commit_monotonic = time.monotonic()
        by_loop: dict[asyncio.AbstractEventLoop, list[asyncio.Future[None]]] = {}
        for job in batch:
            by_loop.setdefault(job.loop, []).append(job.future)
        for loop, futures in by_loop.items():
            loop.call_soon_threadsafe(_resolve_all, futures)

    def _write(
        self,
        rows: list[tuple[Any, ...]],
        events: list[Event],
        rejects: list[Rejected],
        incoming: int,
    ) -> bool:
        """One transaction: make room, insert, quarantine, record consent.

        Returns False when the rows do not fit (nothing new written: backpressure).
        """
        connection = self._connection
        connection.execute("BEGIN IMMEDIATE")
        try:
            eviction = budget.make_room(connection, incoming, self.settings.max_bytes)
            if not eviction.fits and rows:
                # Keep what the policy evicted (it was droppable anyway), write nothing new.
                self._persist_counters(connection, eviction.dropped, [])
                connection.execute("COMMIT")
                self._count(eviction, 0, 0, [])
                return False
            before = connection.total_changes
            connection.executemany(
                "INSERT OR IGNORE INTO events (event_id, type, customer, customer_id, ts, "
                "received_at, envelope) VALUES (?, ?, ?, ?, ?, ?, ?)",
                rows,
            )
            inserted = connection.total_changes - before
            self._quarantine(connection, rejects)
            self._record_consent(connection, events)
            self._persist_counters(connection, eviction.dropped, rejects)
            connection.execute("COMMIT")
        except BaseException:
            if connection.in_transaction:
                connection.execute("ROLLBACK")
            raise
        self._count(eviction, inserted, len(rows) - inserted, rejects)
        if self.counters.backpressure:
            self.counters.backpressure = False
            log.warning("buffer.backpressure.end pending=%d", self.counters.pending)
        return True

    def _count(
        self, eviction: budget.Eviction, inserted: int, duplicates: int, rejects: list[Rejected]
    ) -> None:
        counters = self.counters
        evicted = sum(n for reason, n in eviction.dropped.items() if reason != "quarantine_evicted")
        counters.total += inserted - evicted
        counters.pending += inserted - eviction.pending_dropped
        counters.committed += inserted
        counters.duplicates += duplicates
        counters.commits += 1
        counters.drops.update(eviction.dropped)
        counters.quarantined.update(reject.reason for reject in rejects)

    def _wait_for_room(self) -> bool:
        """Backpressure: hold the batch, keep serving calls (sync marks free space), retry.

        Returns False when the buffer is closing and the held batch must be given up.
        """
        if not self.counters.backpressure:
            self.counters.backpressure = True
            log.error(
                "buffer.backpressure.start pending=%d max_bytes=%d: the buffer is full of "
                "unsynced customer events; sources stop acknowledging until sync makes room",
                self.counters.pending,
                self.settings.max_bytes,
            )
        deadline = time.monotonic() + _BACKPRESSURE_RETRY_S
        while (remaining := deadline - time.monotonic()) > 0:
            if any(isinstance(job, _Stop) for job in self._deferred):
                return False
            try:
                job = self._jobs.get(timeout=remaining)
            except queue.Empty:
                return True
            if isinstance(job, _Call):
                self._run_call(job)
            else:
                self._deferred.append(job)  # commits and stop wait behind the held batch
        return True

    def _next_job(self, timeout: float | None) -> _Commit | _Call | _Stop | None:
        """The next job in arrival order; None when none came within ``timeout``."""
        if self._deferred:
            return self._deferred.popleft()
        try:
            if timeout is None:
                return self._jobs.get()
            return self._jobs.get(timeout=timeout) if timeout > 0 else self._jobs.get_nowait()
        except queue.Empty:
            return None

    def _run_call(self, job: _Call) -> None:
        try:
            result = job.function(self._connection)
        except BaseException as exc:
            if self._connection.in_transaction:
                self._connection.execute("ROLLBACK")
            job.loop.call_soon_threadsafe(_fail, job.future, exc)
            if not isinstance(exc, Exception):
                raise
        else:
            job.loop.call_soon_threadsafe(_resolve, job.future, result)

    def _quarantine(self, connection: sqlite3.Connection, rejects: list[Rejected]) -> None:
        if not rejects:
            return
        limit = self.settings.quarantine_raw_bytes
        connection.executemany(
            "INSERT INTO quarantine (received_at, source, reason, detail, raw, raw_len) "
            "VALUES (?, ?, ?, ?, ?, ?)",
            [
                (r.received_at, r.source, r.reason, r.detail[:500], r.raw[:limit], len(r.raw))
                for r in rejects
            ],
        )
        # Bounded by rows too: a flood of garbage cannot crowd out events.
        connection.execute(
            "DELETE FROM quarantine WHERE id <= (SELECT max(id) FROM quarantine) - ?",
            (self.settings.quarantine_max_rows,),
        )

    @staticmethod
    def _record_consent(connection: sqlite3.Connection, events: list[Event]) -> None:
        updates = [
            (
                event.customer_id,
                int(bool(event.data["personalization"])),
                int(bool(event.data["profile_sharing"])),
                int(bool(event.data["partner_sharing"])),
                event.ts,
                event.event_id,
            )
            for event in events
            if event.type == "consent.update" and event.customer_id
        ]
        if updates:
            # The latest consent (by event time) wins, whatever order they arrive in.
            connection.executemany(
                "INSERT INTO consent VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (customer_id) DO UPDATE "
                "SET personalization=excluded.personalization, "
                "profile_sharing=excluded.profile_sharing, "
                "partner_sharing=excluded.partner_sharing, "
                "ts=excluded.ts, event_id=excluded.event_id WHERE excluded.ts >= consent.ts",
                updates,
            )

    @staticmethod
    def _persist_counters(
        connection: sqlite3.Connection, dropped: Counter[str], rejects: list[Rejected]
    ) -> None:
        increments: Counter[str] = Counter({f"drop.{k}": v for k, v in dropped.items()})
        increments.update(f"quarantine.{reject.reason}" for reject in rejects)
        if increments:
            connection.executemany(
                "INSERT INTO counters (name, value) VALUES (?, ?) "
                "ON CONFLICT (name) DO UPDATE SET value = value + excluded.value",
                list(increments.items()),
            )


def _event_row(event: Event, written_at: float) -> tuple[Any, ...]:
    return (
        event.event_id,
        event.type,
        int(event.customer),
        event.customer_id,
        event.ts,
        written_at,  # within milliseconds of receipt; used for age figures only
        event.to_json(),
    )


def _resolve_all(futures: list[asyncio.Future[None]]) -> None:
    for future in futures:
        if not future.done():  # the awaiting task may have been cancelled meanwhile
            future.set_result(None)


def _resolve(future: asyncio.Future[Any], result: Any) -> None:
    if not future.done():
        future.set_result(result)


def _fail(future: asyncio.Future[Any], error: BaseException) -> None:
    if not future.done():
        future.set_exception(error)
