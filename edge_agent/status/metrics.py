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
            "edge_buffer_disk_full",
            "1 while the disk refuses writes (not acknowledging, retrying)",
            int(buffer["disk_full"]),
        )
        yield _by_reason("edge_buffer_holds", "Times a batch was held, by reason", buffer["holds"])
        yield _gauge(
            "edge_buffer_writer_alive",
            "1 while the buffer's writer thread runs",
            int(buffer["writer_alive"]),
        )
        yield _gauge(
            "edge_agent_healthy",
            "1 while the pipeline makes progress (the /healthz answer)",
            int(status["health"]["ok"]),
        )
        salvage = buffer["salvage"] or {"salvaged": 0, "unreadable": 0}
        yield _gauge(
            "edge_buffer_salvaged_events",
            "Events salvaged from damaged buffer files (until cleared)",
            salvage["salvaged"],
        )
        yield _gauge(
            "edge_buffer_salvage_unreadable_events",
            "Events that could not be read from damaged buffer files (until cleared)",
            salvage["unreadable"],
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
        if "schema" in status:
            yield _counter(
                "edge_undeclared_fields_dropped",
                "Data fields dropped because the schema registry does not declare them",
                status["schema"]["undeclared_fields_dropped"],
            )
        yield from _clock_metrics(status.get("clock"))
        sync = status["sync"]
        yield _counter("edge_sync_sent", "Events acknowledged by the central store", sync["sent"])
        if sync.get("lag_s") is not None:
            yield _gauge("edge_sync_lag_seconds", "Age of the oldest unsynced event", sync["lag_s"])
        if "backlog" in sync:
            yield _gauge("edge_sync_backlog_events", "Events waiting for upload", sync["backlog"])
            yield _counter("edge_sync_errors", "Failed sync attempts", sync["errors"])
            yield _counter(
                "edge_sync_rejected", "Events the store refused for good", sync["rejected"]
            )
            yield _counter(
                "edge_sync_erasures_applied", "Erasure requests applied", sync["erasures_applied"]
            )
        suggestions = status["suggestions"]
        yield _counter("edge_suggestions_shown", "Suggestions shown", suggestions["shown"])
        yield _counter("edge_suggestions_accepted", "Suggestions accepted", suggestions["accepted"])
        yield from _suggestion_metrics(status["model"], suggestions)


def _suggestion_metrics(model: dict[str, Any], suggestions: dict[str, Any]) -> Iterator[Metric]:
    """The personalizer's figures; absent (no personalizer) means no lines."""
    info = GaugeMetricFamily(
        "edge_model_info", "1 for the model in use", labels=["version", "source"]
    )
    info.add_metric([str(model.get("version")), str(model.get("source"))], 1)
    yield info
    for key, name, text in (
        ("swaps", "edge_model_swaps", "Model switches since start (updates, rollbacks)"),
        ("refused", "edge_model_refused", "Model directories refused since start"),
        ("errors", "edge_model_errors", "Model calls that raised (answered by a fallback)"),
    ):
        if key in model:
            yield _counter(name, text, model[key])
    if "dismissed" in suggestions:
        yield _counter(
            "edge_suggestions_dismissed", "Suggestions dismissed", suggestions["dismissed"]
        )
    by_version = suggestions.get("by_model_version", {})
    shown = CounterMetricFamily(
        "edge_suggestions_shown_by_version", "Suggestions shown", labels=["model_version"]
    )
    accepted = CounterMetricFamily(
        "edge_suggestions_accepted_by_version", "Suggestions accepted", labels=["model_version"]
    )
    rate = GaugeMetricFamily(
        "edge_suggestion_acceptance_rate",
        "Accepted / shown, per model version (or fallback)",
        labels=["model_version"],
    )
    for version, figures in sorted(by_version.items()):
        shown.add_metric([version], figures["shown"])
        accepted.add_metric([version], figures["accepted"])
        rate.add_metric([version], figures["acceptance_rate"])
    yield from (shown, accepted, rate)
    yield _by_reason(
        "edge_suggestions_dropped", "Triggers without a suggestion", suggestions.get("dropped", {})
    )
    by_source = CounterMetricFamily(
        "edge_suggestions_by_source", "Suggestions by what ranked them", labels=["source"]
    )
    for source, count in sorted(suggestions.get("by_source", {}).items()):
        by_source.add_metric([source], count)
    yield by_source
    latency = suggestions.get("latency_ms")
    if latency:
        family = GaugeMetricFamily(
            "edge_suggestion_latency_ms",
            "Trigger to publish, recent window",
            labels=["quantile"],
        )
        family.add_metric(["0.5"], latency["p50"])
        family.add_metric(["0.99"], latency["p99"])
        yield family


def render(snapshot: dict[str, Any]) -> bytes:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_SnapshotCollector(snapshot))
    return generate_latest(registry)


def _clock_metrics(clock: dict[str, Any] | None) -> Iterator[Metric]:
    """The clock-skew alarm (edge_agent/device_time.py); absent without MQTT or serial."""
    if clock is None:
        return
    yield _gauge(
        "edge_clock_suspect_skew",
        "1 while many device clocks are ahead of the agent's (check NTP)",
        int(clock["suspect_skew"]),
    )
    if clock.get("skew_s") is not None:
        yield _gauge(
            "edge_clock_skew_seconds", "Device clocks minus the agent's clock", clock["skew_s"]
        )
    yield _counter(
        "edge_device_time_replaced",
        "Device timestamps outside the tolerance, replaced by the receive time",
        clock["device_time_replaced"],
    )


def _source_metrics(sources: dict[str, Any]) -> Iterator[Metric]:
    received = CounterMetricFamily("edge_source_received", "Inputs taken in", labels=["source"])
    accepted = CounterMetricFamily("edge_source_accepted", "Events committed", labels=["source"])
    quarantined = CounterMetricFamily(
        "edge_source_quarantined", "Inputs quarantined", labels=["source"]
    )
    connected = GaugeMetricFamily("edge_source_connected", "1 when connected", labels=["source"])
    sessions_lost = CounterMetricFamily(
        "edge_source_sessions_lost",
        "Reconnects where the broker had lost the agent's session (queued messages gone)",
        labels=["source"],
    )
    for name, figures in sources.items():
        sessions_lost.add_metric([name], figures.get("sessions_lost", 0))
        received.add_metric([name], figures["received"])
        accepted.add_metric([name], figures["accepted"])
        quarantined.add_metric([name], figures["quarantined"])
        connected.add_metric([name], int(figures["connected"]))
    yield from (received, accepted, quarantined, connected, sessions_lost)


def _gauge(name: str, documentation: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, documentation, value=value)


def _counter(name: str, documentation: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, documentation, value=value)


def _by_reason(name: str, documentation: str, by_reason: dict[str, int]) -> CounterMetricFamily:
    family = CounterMetricFamily(name, documentation, labels=["reason"])
    for reason, count in sorted(by_reason.items()):
        family.add_metric([reason], count)
    return family
