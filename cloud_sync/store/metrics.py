"""The store's own ``/metrics``: requests, ingest results, heartbeats, fleet size, stale agents.

One registry per application (tests run several stores in one process). Request labels are
the route's pattern (``/v1/customers/{customer_id}``), never the path a client sent, so a
scan of random URLs cannot grow the series without bound. Fleet figures are read from the
database at scrape time (one small query).
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Iterator
from datetime import UTC, datetime
from importlib import metadata
from typing import Final

from aiohttp import web
from prometheus_client import (
    GC_COLLECTOR,
    PLATFORM_COLLECTOR,
    PROCESS_COLLECTOR,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from cloud_sync.store.backend import Backend
from cloud_sync.store.errors import BackendError

INGEST_RESULTS: Final = ("accepted", "duplicate", "rejected", "erased")
HEARTBEAT_RESULTS: Final = ("recorded", "refused")
_UNMATCHED: Final = "unmatched"
_METHODS: Final = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _version() -> str:
    try:
        return metadata.version("edge-agent")
    except metadata.PackageNotFoundError:  # run from a source tree without an install
        return "unknown"


class _FleetCollector(Collector):
    """Fleet size and stale agents, from the figures the last scrape read."""

    def __init__(self) -> None:
        self.agents = 0
        self.stale = 0
        self.read_ok = True

    def collect(self) -> Iterator[Metric]:
        info = GaugeMetricFamily(
            "customer_store_build_info", "1, labelled with the store's version", labels=["version"]
        )
        info.add_metric([_version()], 1)
        yield info
        yield GaugeMetricFamily(
            "customer_store_fleet_agents", "Agents that ever sent a heartbeat", value=self.agents
        )
        yield GaugeMetricFamily(
            "customer_store_fleet_stale_agents",
            "Agents whose last heartbeat is older than the stale limit",
            value=self.stale,
        )
        yield GaugeMetricFamily(
            "customer_store_database_up",
            "1 when the last scrape could read the database",
            value=int(self.read_ok),
        )


class StoreMetrics:
    def __init__(self, stale_after_s: float) -> None:
        self.stale_after_s = stale_after_s
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "customer_store_http_requests",
            "HTTP requests answered, by route pattern, method and status",
            ["route", "method", "status"],
            registry=self.registry,
        )
        self.duration = Histogram(
            "customer_store_http_request_duration_seconds",
            "Time to answer a request, by route pattern",
            ["route"],
            registry=self.registry,
        )
        self.ingested = Counter(
            "customer_store_ingested_events",
            "Events in upload batches, by result",
            ["result"],
            registry=self.registry,
        )
        self.heartbeats = Counter(
            "customer_store_heartbeats",
            "Agent heartbeats received, by result",
            ["result"],
            registry=self.registry,
        )
        for result in INGEST_RESULTS:
            self.ingested.labels(result)
        for result in HEARTBEAT_RESULTS:
            self.heartbeats.labels(result)
        self._fleet = _FleetCollector()
        self.registry.register(self._fleet)
        for collector in (PROCESS_COLLECTOR, PLATFORM_COLLECTOR, GC_COLLECTOR):
            self.registry.register(collector)

    def count_ingest(self, accepted: int, duplicates: int, rejected: int, erased: int) -> None:
        for result, count in zip(
            INGEST_RESULTS, (accepted, duplicates, rejected, erased), strict=True
        ):
            if count:
                self.ingested.labels(result).inc(count)

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        route = request.match_info.route.resource
        pattern = route.canonical if route is not None else _UNMATCHED
        started = time.perf_counter()
        status = 500
        try:
            response = await handler(request)
        except web.HTTPException as exc:
            status = exc.status
            raise
        else:
            status = response.status
        finally:
            method = request.method if request.method in _METHODS else "other"
            self.requests.labels(pattern, method, str(status)).inc()
            self.duration.labels(pattern).observe(time.perf_counter() - started)
        return response

    async def render(self, backend: Backend) -> bytes:
        now = datetime.now(UTC)
        try:
            heartbeats = await backend.heartbeats()
        except BackendError:
            self._fleet.read_ok = False  # the fleet figures keep their last values
        else:
            self._fleet.read_ok = True
            self._fleet.agents = len(heartbeats)
            self._fleet.stale = sum(
                1
                for hb in heartbeats
                if (now - hb.received_at).total_seconds() > self.stale_after_s
            )
        return generate_latest(self.registry)
