"""The live page's trend rings and device list: bounded, honest about gaps, store devices only."""

from __future__ import annotations

from typing import Any

from edge_agent.events import Event
from edge_agent.status.trends import SERIES, Devices, Trends


def _status(
    accepted: int, shown: int = 0, taken: int = 0, lag: float | None = None
) -> dict[str, Any]:
    return {
        "sources": {"mqtt": {"accepted": accepted}},
        "sync": {"lag_s": lag},
        "model": {"latency_ms": {"samples": 3, "p50": 0.5}},
        "suggestions": {"shown": shown, "accepted": taken},
    }


def _event(device: str | None, source: str) -> Event:
    return Event(
        event_id="e",
        type="product.pickup",
        ts="2026-11-27T10:00:00Z",
        store_id="store-001",
        device_id=device,
        customer_id=None,
        source=source,
        data={},
        received_at="2026-11-27T10:00:00Z",
    )


def test_rings_hold_at_most_their_points_and_rates_come_from_two_samples() -> None:
    trends = Trends(points=5)
    for i in range(12):
        trends.sample(_status(accepted=100 * i, shown=10, taken=4, lag=1.5), now=10.0 * i)
    series = trends.as_status()["series"]
    assert set(series) == set(SERIES)
    assert all(len(points) == 5 for points in series.values())
    assert [value for _, value in series["ingest_per_s"]] == [10.0] * 5
    assert series["acceptance"][-1][1] == 0.4
    assert series["sync_lag_s"][-1][1] == 1.5
    assert series["suggestion_p50_ms"][-1][1] == 0.5
    assert series["ingest_per_s"][-1][0].endswith("Z")  # UTC


def test_unknown_figures_are_gaps_and_a_counter_reset_is_no_negative_rate() -> None:
    trends = Trends()
    trends.sample(_status(accepted=500), now=0.0)
    trends.sample(_status(accepted=20), now=10.0)  # a source restarted its counter
    series = trends.as_status()["series"]
    assert series["ingest_per_s"][0][1] is None  # one sample is no rate
    assert series["ingest_per_s"][1][1] == 0.0
    assert series["acceptance"][1][1] is None  # nothing shown yet
    assert series["sync_lag_s"][1][1] is None


def test_devices_are_bounded_and_only_the_stores_own() -> None:
    devices = Devices(limit=3)
    devices.observe(
        [_event(f"shelf-{i}", f"mqtt:edge/store-001/devices/shelf-{i}/events") for i in range(5)]
    )
    devices.observe([_event("shelf-serial-01", "serial:shelf-serial-01")])
    devices.observe([_event("kiosk-01", "personalizer"), _event(None, "mqtt:edge/x/telemetry")])
    devices.observe([_event("shelf-3", "mqtt:edge/store-001/devices/shelf-3/events")])
    listed = devices.as_status()
    assert [d["device_id"] for d in listed["list"]] == ["shelf-3", "shelf-serial-01", "shelf-4"]
    assert listed["list"][0]["events"] == 2
    assert listed["list"][1]["source"] == "serial"
    assert listed["forgotten"] == 3
