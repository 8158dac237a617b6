"""Prometheus exposition of the status snapshot (the same figures as /status).

Rules that keep ``promtool check metrics`` and alerting honest:
- units in the name, base units only (seconds, bytes); counters end in ``_total``;
- every labelled counter starts at 0 for each known reason (``reasons``), so an alert on
  the first increase can fire;
- each thing is counted by one family: suggestions shown are
  ``edge_suggestions_shown_total{model_version,source}``, summed for the total;
- a figure that does not apply is absent, not a number that means nothing: without sync
  there is no ``edge_sync_lag_seconds`` (``edge_buffer_oldest_pending_age_seconds`` is
  the age of what waits).
"""

from __future__ import annotations

import math
import platform
from collections.abc import Iterator, Mapping
from typing import Any, Final

from prometheus_client import (
    GC_COLLECTOR,
    PLATFORM_COLLECTOR,
    PROCESS_COLLECTOR,
    CollectorRegistry,
    generate_latest,
)
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from edge_agent.status import reasons

# process_* (CPU, memory, open fds), python_info and python_gc_*: the same collectors the
# client library registers by default, here beside the snapshot's figures.
_RUNTIME_COLLECTORS: Final = (PROCESS_COLLECTOR, PLATFORM_COLLECTOR, GC_COLLECTOR)


class _SnapshotCollector(Collector):
    def __init__(self, snapshot: dict[str, Any]) -> None:
        self._snapshot = snapshot

    def collect(self) -> Iterator[Metric]:
        status = self._snapshot
        info = GaugeMetricFamily(
            "edge_agent_build_info",
            "1, labelled with the agent's version and Python",
            labels=["version", "python"],
        )
        info.add_metric([str(status["version"]), platform.python_version()], 1)
        yield info
        yield _gauge(
            "edge_agent_uptime_seconds", "Seconds since the agent started", status["uptime_s"]
        )
        yield _gauge(
            "edge_agent_healthy",
            "1 while the pipeline makes progress (the /healthz answer)",
            int(status["health"]["ok"]),
        )
        yield from _source_metrics(status["sources"])
        yield from _buffer_metrics(status["buffer"])
        yield _by_reason(
            "edge_quarantined",
            "Inputs quarantined, by reason",
            status["quarantine"]["by_reason"],
            reasons.QUARANTINE_REASONS,
        )
        yield _by_reason(
            "edge_dropped",
            "Data dropped, by reason (buffer evictions; <source>.<reason> for a source's own)",
            status["drops"]["by_reason"],
            reasons.drop_reasons(list(status["sources"])),
        )
        yield from _sync_metrics(status["sync"])
        if "schema" in status:
            yield _counter(
                "edge_undeclared_fields_dropped",
                "Data fields dropped because the schema registry does not declare them",
                status["schema"]["undeclared_fields_dropped"],
            )
        yield from _clock_metrics(status.get("clock"))
        yield from _heartbeat_metrics(status.get("heartbeat"))
        yield from _model_metrics(status["model"])
        yield from _suggestion_metrics(status["suggestions"])
        yield from _profile_metrics(status.get("profiles"))


def render(snapshot: dict[str, Any]) -> bytes:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_SnapshotCollector(snapshot))
    for collector in _RUNTIME_COLLECTORS:
        registry.register(collector)
    return generate_latest(registry)


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
        received.add_metric([name], figures["received"])
        accepted.add_metric([name], figures["accepted"])
        quarantined.add_metric([name], figures["quarantined"])
        connected.add_metric([name], int(figures["connected"]))
        sessions_lost.add_metric([name], figures.get("sessions_lost", 0))
    yield from (received, accepted, quarantined, connected, sessions_lost)


def _buffer_metrics(buffer: dict[str, Any]) -> Iterator[Metric]:
    yield _gauge("edge_buffer_pending_events", "Events not yet synced", buffer["pending"])
    yield _gauge("edge_buffer_events", "Events held, synced or not", buffer["total"])
    yield _gauge("edge_buffer_bytes", "Bytes in live database pages", buffer["bytes"])
    yield _gauge("edge_buffer_max_bytes", "The disk budget in bytes", buffer["max_bytes"])
    yield _gauge(
        "edge_buffer_oldest_pending_age_seconds",
        "Age of the oldest unsynced event (0 when none waits)",
        buffer["oldest_pending_age_s"],
    )
    yield _gauge(
        "edge_buffer_backpressure",
        "1 while the budget is full of unsynced customer events (not acknowledging)",
        int(buffer["backpressure"]),
    )
    yield _gauge(
        "edge_buffer_disk_full",
        "1 while the disk refuses writes (not acknowledging, retrying)",
        int(buffer["disk_full"]),
    )
    yield _by_reason(
        "edge_buffer_holds",
        "Times a batch was held, by reason",
        buffer["holds"],
        reasons.HOLD_REASONS,
    )
    yield _gauge(
        "edge_buffer_writer_alive",
        "1 while the buffer's writer thread runs",
        int(buffer["writer_alive"]),
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


def _sync_metrics(sync: dict[str, Any]) -> Iterator[Metric]:
    enabled = bool(sync.get("enabled"))
    yield _gauge("edge_sync_enabled", "1 when the agent uploads to a central store", int(enabled))
    yield _counter("edge_sync_sent", "Events acknowledged by the central store", sync["sent"])
    if not enabled:
        return
    if sync.get("lag_s") is not None:
        yield _gauge(
            "edge_sync_lag_seconds",
            "Age of the oldest event not yet uploaded (0 when drained)",
            sync["lag_s"],
        )
    if "backlog" in sync:
        yield _gauge("edge_sync_backlog_events", "Events waiting for upload", sync["backlog"])
        yield _counter("edge_sync_errors", "Failed sync attempts", sync["errors"])
        yield _counter("edge_sync_rejected", "Events the store refused for good", sync["rejected"])
        yield _counter(
            "edge_sync_erasures_applied", "Erasure requests applied", sync["erasures_applied"]
        )


def _clock_metrics(clock: Mapping[str, Any] | None) -> Iterator[Metric]:
    """The clock-skew alarm of the device-time judge (issue 9): 0 while nothing raised it."""
    yield _gauge(
        "edge_clock_suspect_skew",
        "1 while many device clocks are ahead of the agent's (check NTP)",
        int(bool(clock and clock.get("suspect_skew"))),
    )
    if not clock:
        return
    if clock.get("skew_s") is not None:
        yield _gauge(
            "edge_clock_skew_seconds", "Device clocks minus the agent's clock", clock["skew_s"]
        )
    if "device_time_replaced" in clock:
        yield _counter(
            "edge_device_time_replaced",
            "Device timestamps outside the tolerance, replaced by the receive time",
            clock["device_time_replaced"],
        )


def _heartbeat_metrics(heartbeat: Mapping[str, Any] | None) -> Iterator[Metric]:
    """This box's clock against the central store's, measured by the heartbeat (sync on)."""
    if not heartbeat or heartbeat.get("store_clock_skew_s") is None:
        return
    yield _gauge(
        "edge_store_clock_skew_seconds",
        "This box's wall clock minus the central store's (positive: ahead)",
        heartbeat["store_clock_skew_s"],
    )


def _model_metrics(model: dict[str, Any]) -> Iterator[Metric]:
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


def _suggestion_metrics(suggestions: dict[str, Any]) -> Iterator[Metric]:
    """One family per outcome, labelled by what answered; absent figures, no lines."""
    labels = ["model_version", "source"]
    shown = CounterMetricFamily("edge_suggestions_shown", "Suggestions shown", labels=labels)
    accepted = CounterMetricFamily(
        "edge_suggestions_accepted", "Suggestions accepted", labels=labels
    )
    rate = GaugeMetricFamily(
        "edge_suggestion_acceptance_rate",
        "Accepted / shown, per model version (or fallback)",
        labels=["model_version"],
    )
    for version, figures in sorted(suggestions.get("by_model_version", {}).items()):
        source = version if version in reasons.FALLBACK_SOURCES else "model"
        shown.add_metric([version, source], figures["shown"])
        accepted.add_metric([version, source], figures["accepted"])
        rate.add_metric([version], figures["acceptance_rate"])
    yield from (shown, accepted, rate)
    if "dismissed" in suggestions:
        yield _counter(
            "edge_suggestions_dismissed", "Suggestions dismissed", suggestions["dismissed"]
        )
    if "dropped" in suggestions:
        yield _by_reason(
            "edge_suggestions_dropped",
            "Triggers without a suggestion, by reason",
            suggestions["dropped"],
            reasons.SUGGESTION_DROP_REASONS,
        )
    histogram = suggestions.get("latency_histogram")
    if histogram:
        family = HistogramMetricFamily(
            "edge_suggestion_latency_seconds", "Trigger to published suggestion"
        )
        family.add_metric(
            [],
            [(_bound(le), count) for le, count in histogram["buckets"]],
            histogram["sum_s"],
        )
        yield family


def _profile_metrics(profiles: Mapping[str, Any] | None) -> Iterator[Metric]:
    """The central profiles at the edge (personalize/profiles.py), when that part runs."""
    if not profiles:
        return
    fetches = CounterMetricFamily(
        "edge_profile_fetches", "Central profile fetches, by outcome", labels=["outcome"]
    )
    for outcome, count in sorted(profiles["fetches"].items()):
        fetches.add_metric([outcome], count)
    yield fetches
    yield _by_reason(
        "edge_profiles_rejected",
        "Central profile bodies refused, by reason",
        profiles["rejected"],
        sorted(profiles["rejected"]),
    )
    yield _gauge("edge_profiles_cached", "Central profiles held in memory", profiles["cached"])
    yield _gauge(
        "edge_profile_cache_bytes", "Bytes of the central profiles held", profiles["cache_bytes"]
    )
    yield _counter(
        "edge_profiles_evicted", "Central profiles evicted from the cache", profiles["evicted"]
    )
    histogram = profiles["fetch_latency_histogram"]
    family = HistogramMetricFamily(
        "edge_profile_fetch_latency_seconds", "Central profile fetch, request to parsed answer"
    )
    family.add_metric(
        [], [(_bound(le), count) for le, count in histogram["buckets"]], histogram["sum_s"]
    )
    yield family


def _bound(le: float | str) -> str:
    return "+Inf" if le == "+Inf" or (isinstance(le, float) and math.isinf(le)) else str(le)


def _gauge(name: str, documentation: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, documentation, value=value)


def _counter(name: str, documentation: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, documentation, value=value)


def _by_reason(
    name: str, documentation: str, by_reason: Mapping[str, int], known: tuple[str, ...] | list[str]
) -> CounterMetricFamily:
    family = CounterMetricFamily(name, documentation, labels=["reason"])
    counts = dict.fromkeys(known, 0) | dict(by_reason)
    for reason, count in sorted(counts.items()):
        family.add_metric([reason], count)
    return family
