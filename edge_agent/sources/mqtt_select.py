"""Which MQTT client a source runs on: ``[mqtt] client`` (auto, awscrt, paho)."""

from __future__ import annotations

import importlib.util
from typing import Any

from edge_agent.config import MqttSection
from edge_agent.decode import DecodeContext
from edge_agent.errors import ConfigError
from edge_agent.sources.mqtt_consumer import MqttConsumer


def awscrt_available() -> bool:
    """Whether the optional ``[awscrt]`` extra is installed (not imported: 13 MB)."""
    try:
        return importlib.util.find_spec("awscrt") is not None
    except (ImportError, ValueError):  # ValueError: a module set to None in sys.modules
        return False


def mqtt_client_for(settings: MqttSection) -> str:
    """auto: awscrt (MQTT 5 only) unless the protocol is pinned to 3.1.1 or it's absent."""
    if settings.client != "auto":
        return settings.client
    if settings.protocol == "3.1.1" or not awscrt_available():
        return "paho"
    return "awscrt"


def make_mqtt_source(
    settings: MqttSection, client_id: str, decode_context: DecodeContext, **options: Any
) -> MqttConsumer:
    """An MQTT source on the configured client; ``options`` as MqttConsumer takes them."""
    client = mqtt_client_for(settings)
    if client == "awscrt":
        if not awscrt_available():
            raise ConfigError("mqtt.client", "awscrt is not installed (pip install awscrt)")
        from edge_agent.sources.mqtt_crt import MqttCrtSource

        return MqttCrtSource(settings, client_id, decode_context, **options)
    from edge_agent.sources.mqtt import MqttSource

    return MqttSource(settings, client_id, decode_context, **options)
