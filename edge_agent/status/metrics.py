"""Prometheus exposition of the status snapshot (the same figures as /status)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector


class _SnapshotCollector(Collector):
    def __init__(self, snapshot: dict[str, Any]) -> None:
        self._snapshot = snapshot

    def collect(self) -> Iterator[Metric]:
        status = self._snapshot
        yield _gauge(
            "edge_agent_uptime_seconds", "Seconds since the agent started", status["uptime_s"]
        )
        yield from _source_metrics(status["sources"])
        buffer = status["buffer"]
        yield _gauge("edge_buffer_pending_events", "Events not yet synced", buffer["pending"])
        yield _gauge("edge_buffer_events", "Events held, synced or not", buffer["total"])
        yield _gauge("edge_buffer_bytes", "Bytes in live database pages", buffer["bytes"])
        yield _gauge("edge_buffer_max_bytes", "The disk budget", buffer["max_bytes"])
        yield _gauge(
            "edge_buffer_oldest_pending_age_seconds",
            "Age of the oldest unsynced event",
            buffer["oldest_pending_age_s"],
        )
        yield _gauge(
            "edge_buffer_backpressure",
            "1 while not acknowledging input",
            int(buffer["backpressure"]),
        )
        yield _gauge(
            "edge_buffer_damaged_files",
            "Damaged buffer files moved aside and kept for inspection",
            buffer["damaged_files"],
        )
        yield _counter("edge_buffer_commits", "Buffer transactions since start", buffer["commits"])
        yield _counter(
            "edge_buffer_duplicates", "Redelivered events already held", buffer["duplicates"]
        )
        yield _by_reason(
            "edge_quarantined", "Inputs quarantined", status["quarantine"]["by_reason"]
        )
        yield _by_reason("edge_dropped", "Data dropped, by reason", status["drops"]["by_reason"])
        sync = status["sync"]
        yield _counter("edge_sync_sent", "Events acknowledged by the central store", sync["sent"])
        if sync.get("lag_s") is not None:
            yield _gauge("edge_sync_lag_seconds", "Age of the oldest unsynced event", sync["lag_s"])
        suggestions = status["suggestions"]
        yield _counter("edge_suggestions_shown", "Suggestions shown", suggestions["shown"])
        yield _counter("edge_suggestions_accepted", "Suggestions accepted", suggestions["accepted"])


def render(snapshot: dict[str, Any]) -> bytes:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_SnapshotCollector(snapshot))
    return generate_latest(registry)


def _source_metrics(sources: dict[str, Any]) -> Iterator[Metric]:
    received = CounterMetricFamily("edge_source_received", "Inputs taken in", labels=["source"])
    accepted = CounterMetricFamily("edge_source_accepted", "Events committed", labels=["source"])
    quarantined = CounterMetricFamily(
        "edge_source_quarantined", "Inputs quarantined", labels=["source"]
    )
    connected = GaugeMetricFamily("edge_source_connected", "1 when connected", labels=["source"])
    for name, figures in sources.items():
        received.add_metric([name], figures["received"])
        accepted.add_metric([name], figures["accepted"])
        quarantined.add_metric([name], figures["quarantined"])
        connected.add_metric([name], int(figures["connected"]))
    yield from (received, accepted, quarantined, connected)


def _gauge(name: str, documentation: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, documentation, value=value)


def _counter(name: str, documentation: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, documentation, value=value)


def _by_reason(name: str, documentation: str, by_reason: dict[str, int]) -> CounterMetricFamily:
    family = CounterMetricFamily(name, documentation, labels=["reason"])
    for reason, count in sorted(by_reason.items()):
        family.add_metric([reason], count)
    return family
