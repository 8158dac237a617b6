"""Running the service: open the database, serve HTTP, stop cleanly on SIGTERM or SIGINT."""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
from datetime import UTC, datetime
from typing import Any, Final

from aiohttp import web

from cloud_sync.store import model_rollout
from cloud_sync.store.acceptance import DEFAULT_MIN_SHOWN
from cloud_sync.store.app import create_app
from cloud_sync.store.backend import Backend, open_backend
from cloud_sync.store.errors import StoreError
from cloud_sync.store.feed import FeedSettings
from cloud_sync.store.fleet import DEFAULT_STALE_AFTER_S
from cloud_sync.store.ingest import Limits

log = logging.getLogger(__name__)
SHUTDOWN_TIMEOUT_S = 10.0
# Request bodies are gunzipped by the ingest code, which bounds the inflated size; tests
# build their runner with the same options.
RUNNER_OPTIONS: Final[dict[str, Any]] = {"auto_decompress": False}


async def serve(
    db_url: str,
    host: str,
    port: int,
    *,
    limits: Limits | None = None,
    pool_size: int = 10,
    access_log: bool = False,
    reuse_port: bool = False,
    stale_after_s: float = DEFAULT_STALE_AFTER_S,
    feed_settings: FeedSettings | None = None,
    rollout_check_s: float = 300.0,
    min_shown: int = DEFAULT_MIN_SHOWN,
) -> None:
    """Serve until SIGTERM/SIGINT. Prints ``listening http://HOST:PORT`` once accepting.

    Every ``rollout_check_s`` seconds (0: never) a running canary is judged and rolled back
    when clearly worse than the promoted version (``model_rollout.check``)."""
    backend = await open_backend(db_url, pool_size=pool_size)
    try:
        app = create_app(backend, limits, feed_settings, stale_after_s=stale_after_s)
        runner = web.AppRunner(
            app,
            **RUNNER_OPTIONS,
            access_log=logging.getLogger("aiohttp.access") if access_log else None,
            shutdown_timeout=SHUTDOWN_TIMEOUT_S,
        )
        await runner.setup()
        try:
            # reuse_port: several instances on one host share a port; the kernel spreads
            # connections over them, one process per core.
            site = web.TCPSite(runner, host, port, reuse_port=reuse_port or None)
            await site.start()
            bound = _bound_port(runner, port)
            log.info("store.listening host=%s port=%d", host, bound)
            # One stdout line that scripts and tests read to learn the port (--port 0).
            sys.stdout.write(f"listening http://{host}:{bound}\n")
            sys.stdout.flush()
            async with asyncio.TaskGroup() as tasks:
                checker = None
                if rollout_check_s > 0:
                    checker = tasks.create_task(
                        _check_rollout(backend, rollout_check_s, min_shown), name="rollout-check"
                    )
                await _until_signalled()
                log.info("store.stopping")
                if checker is not None:
                    checker.cancel()
        finally:
            await runner.cleanup()
    finally:
        await backend.close()


async def _check_rollout(backend: Backend, every_s: float, min_shown: int) -> None:
    """Judge a running canary periodically; a failed check is logged and tried next time."""
    while True:
        await asyncio.sleep(every_s)
        try:
            result = await model_rollout.check(
                backend, min_shown, "server:rollout-check", datetime.now(UTC)
            )
        except StoreError as exc:
            log.warning("store.rollout.check_failed error=%s", exc)
            continue
        if result.verdict is not None:
            log.info(
                "store.rollout.checked canary=%s verdict=%s",
                result.state.canary_version,
                result.verdict.reason,
            )


def _bound_port(runner: web.AppRunner, requested: int) -> int:
    for address in runner.addresses:
        if isinstance(address, tuple) and len(address) >= 2:
            return int(address[1])
    return requested


async def _until_signalled() -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
