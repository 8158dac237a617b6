"""The status endpoint (default 127.0.0.1:8787) on aiohttp."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from importlib import resources
from typing import Final

from aiohttp import web

from edge_agent.status import metrics
from edge_agent.status.snapshot import StatusBoard
from edge_agent.status.trends import TREND_INTERVAL_S

log = logging.getLogger(__name__)

_PAGE: Final = resources.files("edge_agent.status").joinpath("page.html")
# A request still in flight at shutdown gets this long, then its connection is closed:
# stopping the agent is bounded by the unit's TimeoutStopSec, not by a slow client.
SHUTDOWN_TIMEOUT_S: Final = 2.0


class StatusServer:
    def __init__(self, board: StatusBoard, host: str, port: int) -> None:
        self.board = board
        self.host = host
        self.port = port  # the bound port once started (useful when configured as 0)
        self._runner: web.AppRunner | None = None
        self._sampler: asyncio.Task[None] | None = None

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/readyz", self._readyz)
        app.router.add_get("/status", self._status)
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/", self._page)
        self._runner = web.AppRunner(
            app, access_log=None, handle_signals=False, shutdown_timeout=SHUTDOWN_TIMEOUT_S
        )
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port, reuse_address=True)
        await site.start()
        addresses = self._runner.addresses  # the bound (host, port), also when port was 0
        if addresses:
            self.port = int(addresses[0][1])
        log.info("status.listening url=http://%s:%d/", self.host, self.port)
        self._sampler = asyncio.create_task(self._sample_trends(), name="status-trends")

    async def _sample_trends(self) -> None:
        # The first point at once, so a freshly opened page has something to draw.
        while True:
            try:
                await self.board.sample_trends()
            except Exception:
                # A section provider's bug costs one point of the trends, not the sampler.
                log.exception("status.trend_sample_failed")
            await asyncio.sleep(TREND_INTERVAL_S)

    async def stop(self) -> None:
        if self._sampler is not None:
            self._sampler.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sampler
            self._sampler = None
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _healthz(self, request: web.Request) -> web.Response:
        problems = self.board.health.problems()
        if problems:
            return web.json_response({"status": "stalled", "problems": problems}, status=503)
        return web.json_response({"status": "alive", "problems": []})

    async def _readyz(self, request: web.Request) -> web.Response:
        reasons = self.board.readiness()
        if reasons:
            return web.json_response({"ready": False, "reasons": reasons}, status=503)
        return web.json_response({"ready": True, "reasons": []})

    async def _status(self, request: web.Request) -> web.Response:
        return web.json_response(await self.board.snapshot())

    async def _metrics(self, request: web.Request) -> web.Response:
        body = metrics.render(await self.board.snapshot())
        return web.Response(
            body=body,
            content_type="text/plain",
            charset="utf-8",
            headers={"X-Content-Format": "prometheus-0.0.4"},
        )

    async def _page(self, request: web.Request) -> web.Response:
        return web.Response(text=_PAGE.read_text("utf-8"), content_type="text/html")
