"""Helpers for the uploader's tests: the store as a real process, a TCP proxy to cut the link.

Everything listens on loopback; every process is started here and stopped by its own pid.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import select
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg

STARTUP_TIMEOUT_S = 20.0


def store_cli(db_url: str, *args: str) -> str:
    """Run ``customer-store ARGS --db URL``; return the last line of stdout."""
    done = subprocess.run(
        [sys.executable, "-m", "cloud_sync.store", *args, "--db", db_url],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return done.stdout.strip().splitlines()[-1]


def store_events(db_url: str) -> int:
    return int(json.loads(store_cli(db_url, "stats"))["events"])


@dataclass
class StoreProcess:
    """``customer-store serve``: port 0 the first time, then the same port after a kill."""

    db_url: str
    log_path: Path
    port: int = 0
    extra: tuple[str, ...] = ()
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        command = [sys.executable, "-m", "cloud_sync.store", "serve", "--db", self.db_url]
        command += ["--port", str(self.port), "--pool-size", "4", *self.extra]
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=log)
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], STARTUP_TIMEOUT_S)
        line = self.proc.stdout.readline().decode() if ready else ""
        assert line.startswith("listening http://"), f"store did not start: {line!r}"
        self.port = int(line.strip().rsplit(":", 1)[1])

    def kill(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=10)
        self._close()

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
        self._close()

    def _close(self) -> None:
        if self.proc is not None and self.proc.stdout is not None:
            self.proc.stdout.close()


@dataclass
class TcpProxy:
    """A loopback TCP relay on the test's loop; ``cut()`` drops every link and stops listening."""

    target_port: int
    port: int = 0
    stalled: bool = False  # accept connections but relay nothing: a store that hangs
    _server: asyncio.Server | None = None
    _writers: set[asyncio.StreamWriter] = field(default_factory=set)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._relay, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def cut(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        for writer in list(self._writers):
            writer.transport.abort()
        self._writers.clear()

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        while self.stalled:
            if writer.transport.is_closing():
                return
            await asyncio.sleep(0.05)
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.transport.abort()
            return
        self._writers |= {writer, up_writer}
        try:
            await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))
        finally:
            for one in (writer, up_writer):
                self._writers.discard(one)
                one.transport.abort()


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(OSError, ConnectionError):
        while chunk := await reader.read(65536):
            writer.write(chunk)
            await writer.drain()
    with contextlib.suppress(OSError, RuntimeError):
        writer.write_eof()


async def eventually(
    probe: Callable[[], Awaitable[bool]] | Callable[[], bool], within_s: float, every: float = 0.1
) -> None:
    deadline = time.monotonic() + within_s
    while True:
        outcome = probe()
        if isinstance(outcome, Awaitable):
            outcome = await outcome
        if outcome:
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"condition not met within {within_s}s")
        await asyncio.sleep(every)


def sync_section(url: str, token: str, **overrides: Any) -> dict[str, Any]:
    """Fast settings for tests: short interval, small batches, quick retries."""
    return {
        "url": url,
        "token": token,
        "interval_s": 0.3,
        "batch_size": 40,
        "timeout_s": 3.0,
        "backoff_max_s": 0.5,
        **overrides,
    }


async def stored_count(db_url: str) -> int:
    """Distinct events in the store, read through its own backend (cheaper than the CLI)."""
    from cloud_sync.store.backend import open_backend

    backend = await open_backend(db_url, pool_size=1)
    try:
        return (await backend.stats()).events
    finally:
        await backend.close()


def store_event_ids(db_url: str) -> list[str]:
    """Every event id the store holds, read from its database (SQLite or PostgreSQL)."""
    if db_url.startswith("sqlite://"):
        path = db_url.removeprefix("sqlite://")
        with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as db:
            return [row[0] for row in db.execute("SELECT event_id FROM events")]
    with psycopg.connect(db_url) as conn:
        return [row[0] for row in conn.execute("SELECT event_id FROM events")]


def store_rows(db_url: str) -> list[tuple[str, str | None, str]]:
    """(event_id, customer_id, data as text) of every stored event."""
    query = "SELECT event_id, customer_id, CAST(data AS TEXT) FROM events"
    if db_url.startswith("sqlite://"):
        path = db_url.removeprefix("sqlite://")
        with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as db:
            return list(db.execute(query))
    with psycopg.connect(db_url) as conn:
        return list(conn.execute(query))
