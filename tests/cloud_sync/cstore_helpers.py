"""Envelope builders for the central store's tests (plain functions, no fixtures)."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

BASE_TS = datetime(2026, 11, 22, 8, 0, tzinfo=UTC)
DEFAULT_DATA: dict[str, dict[str, Any]] = {
    "telemetry": {"values": {"temp_c": 4.1}},
    "product.pickup": {"sku": "SKU-000001", "weight_g": 412},
    "kiosk.view": {"sku": "SKU-000002", "page": "offers"},
    "basket.add": {"sku": "SKU-000003", "qty": 1},
    "suggestion.shown": {"suggestion_id": "s-1", "items": ["SKU-000004"], "source": "model"},
    "suggestion.accepted": {"suggestion_id": "s-1", "sku": "SKU-000004"},
}


def ts_text(offset_s: float) -> str:
    moment = BASE_TS + timedelta(seconds=offset_s)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def envelope(
    event_type: str = "product.pickup",
    *,
    customer_id: str | None = "c-000001",
    store_id: str = "store-001",
    device_id: str | None = "shelf-07",
    channel: str = "mqtt",
    offset_s: float = 0.0,
    data: dict[str, Any] | None = None,
    event_id: str | None = None,
) -> dict[str, Any]:
    source = (
        f"mqtt:edge/{store_id}/devices/{device_id}/events"
        if channel == "mqtt"
        else f"{channel}:{device_id}"
    )
    return {
        "event_id": event_id or str(uuid.uuid4()),
        "type": event_type,
        "ts": ts_text(offset_s),
        "store_id": store_id,
        "device_id": device_id,
        "customer_id": customer_id,
        "source": source,
        "schema": 1,
        "data": DEFAULT_DATA.get(event_type, {}) if data is None else data,
        "received_at": ts_text(offset_s + 0.5),
    }


def consent(customer_id: str, *, partner: bool, offset_s: float, **kw: Any) -> dict[str, Any]:
    flags = {"personalization": True, "profile_sharing": True, "partner_sharing": partner}
    return envelope("consent.update", customer_id=customer_id, offset_s=offset_s, data=flags, **kw)


def batch(count: int, *, store_id: str = "store-001", customers: int = 10) -> list[dict[str, Any]]:
    return [
        envelope(
            "product.pickup",
            customer_id=f"c-{i % customers:06d}",
            store_id=store_id,
            offset_s=i,
            data={"sku": f"SKU-{i:06d}"},
        )
        for i in range(count)
    ]
