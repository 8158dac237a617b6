"""The reasons each counter family knows, so /metrics starts every labelled series at 0.

An alert on ``increase(edge_quarantined_total{reason="poison"}[1h]) > 0`` only fires if the
series existed before its first increase: Prometheus sees nothing to compare with when a
label first appears already at 1. One list per family; a reason the code produces that is
missing here is still exported (from the moment it is first counted), just not from zero.
"""

from __future__ import annotations

from typing import Final

from edge_agent.buffer.faults import Fault
from edge_agent.buffer.store import ROOM
from edge_agent.buffer.writes import UNSTORABLE

# Inputs quarantined: decode (MQTT and serial), the registry's field checks, the buffer's
# writer, the store's refusals, and the guards of issue 9 (one message per unknown bug,
# a message redelivered after killing the process).
QUARANTINE_REASONS: Final = (
    "not_json",
    "not_object",
    "too_large",
    "too_deep",
    "empty_batch",
    "too_many_events",
    "wrong_type",
    "missing_field",
    "unknown_type",
    "schema_unsupported",
    "bad_number",
    "bad_unicode",
    "bad_timestamp",
    "absurd_timestamp",
    "bad_topic",
    "bad_payload",
    UNSTORABLE,
    "damaged_row",
    "store_rejected",
    "internal_error",
    "poison",
)

# The buffer's disk budget (edge_agent/buffer/budget.py), in its eviction order.
BUFFER_DROP_REASONS: Final = (
    "synced_evicted",
    "quarantine_evicted",
    "telemetry_evicted_unsynced",
    "retention_evicted",  # collect-only stores (no sync.url) only
)
# A source's own drops are exported as "<source>.<reason>".
MQTT_DROP_REASONS: Final = ("qos0_overflow",)
SERIAL_DROP_REASONS: Final = (
    "too_large",
    "bad_cobs",
    "too_short",
    "bad_crc",
    "bad_type",
    "bad_version",
    "unexpected_type",
    "bad_hello",
    "echo",
    "unidentified",
    "bad_result",
    "write_backlog",
    "internal_error",
)

HOLD_REASONS: Final = (ROOM, *(fault.value for fault in Fault))

# Triggers that got no suggestion (edge_agent/personalize).
SUGGESTION_DROP_REASONS: Final = (
    "no_device",
    "overload",
    "error",
    "record_queue_full",
    "serial_queue_full",
    "serial_unknown_device",
)

# Rankers other than the model; ``by_model_version`` counts their answers under these names.
FALLBACK_SOURCES: Final = ("store_popularity", "bestsellers")


def drop_reasons(source_names: list[str]) -> list[str]:
    """Every drop label of an agent with these sources."""
    labels = list(BUFFER_DROP_REASONS)
    for name in source_names:
        known = SERIAL_DROP_REASONS if name.startswith("serial") else MQTT_DROP_REASONS
        labels.extend(f"{name}.{reason}" for reason in known)
    return labels
