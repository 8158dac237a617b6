"""Decode a quarantined input again, exactly as live input is decoded (for
``edge-agent quarantine replay``; the SQL side is ``edge_agent.buffer.quarantine``).

MQTT inputs replay: their topic is in ``source`` (``mqtt:<topic>``) and their raw bytes are
the whole payload, so the decoder sees what it saw live, with the original receive time, and
an event without an ``event_id`` gets the same derived id it would have had live. Serial
frames do not: their raw bytes are the frame the bridge could not take apart, and a shelf
resends what it was not acknowledged for, so they are skipped as ``not_replayable``.
"""

from __future__ import annotations

from datetime import UTC, datetime

from cloud_sync.envelope_schema import default_registry
from edge_agent.buffer.quarantine import QuarantineRow, Redecode
from edge_agent.config import Config
from edge_agent.decode import DecodeContext, decode_message, make_context, parse_topic
from edge_agent.events import Event, Rejected, parse_ts
from edge_agent.governance import event_id_key

MQTT_PREFIX = "mqtt:"


def redecoder(config: Config) -> Redecode:
    """The live decoder with the installed registry and this config's input limits."""
    context = make_context(
        config.agent.store_id, default_registry(), config.input, event_id_key(config)
    )
    return lambda row: redecode(context, config.mqtt.topic_prefix, row)


def redecode(
    context: DecodeContext, prefix: str, row: QuarantineRow
) -> list[Event | Rejected] | str:
    """The items live decoding makes of this row, or why it cannot be replayed."""
    if not row.source.startswith(MQTT_PREFIX):
        return "not_replayable"
    topic = parse_topic(row.source.removeprefix(MQTT_PREFIX), prefix, context.store_id)
    if topic is None:
        return "bad_topic"
    received = parse_ts(row.received_at) or datetime.now(UTC)
    return decode_message(context, topic, row.source, row.raw, received)
