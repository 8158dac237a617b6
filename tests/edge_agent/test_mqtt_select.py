"""``[mqtt] client``: which MQTT client the sources run on, and what the config refuses."""

from __future__ import annotations

from pathlib import Path

import pytest

from cloud_sync.envelope_schema import default_registry
from edge_agent.config import config_from_dict
from edge_agent.decode import make_context
from edge_agent.errors import ConfigError
from edge_agent.sources.mqtt import MqttSource
from edge_agent.sources.mqtt_select import awscrt_available, make_mqtt_source, mqtt_client_for


def _config(tmp_path: Path, **mqtt: object) -> dict[str, object]:
    return {"agent": {"store_id": "s-1", "data_dir": str(tmp_path)}, "mqtt": mqtt}


@pytest.mark.parametrize(
    ("mqtt", "expected"),
    [
        ({"client": "paho"}, "paho"),
        ({"client": "awscrt"}, "awscrt"),
        ({"protocol": "3.1.1"}, "paho"),  # auto: awscrt speaks MQTT 5 only
        ({"protocol": "3.1.1", "qos": 0}, "paho"),
    ],
)
def test_the_client_follows_the_config(
    tmp_path: Path, mqtt: dict[str, object], expected: str
) -> None:
    assert mqtt_client_for(config_from_dict(_config(tmp_path, **mqtt)).mqtt) == expected


def test_auto_is_awscrt_where_it_is_installed(tmp_path: Path) -> None:
    settings = config_from_dict(_config(tmp_path)).mqtt
    assert mqtt_client_for(settings) == ("awscrt" if awscrt_available() else "paho")


@pytest.mark.parametrize(
    ("mqtt", "problem"),
    [
        ({"client": "gmqtt"}, "must be auto, awscrt or paho"),
        ({"client": "awscrt", "protocol": "3.1.1"}, "awscrt speaks MQTT 5 only"),
    ],
)
def test_a_bad_client_is_refused_naming_the_key(
    tmp_path: Path, mqtt: dict[str, object], problem: str
) -> None:
    with pytest.raises(ConfigError) as refused:
        config_from_dict(_config(tmp_path, **mqtt))
    assert refused.value.key == "mqtt.client"
    assert problem in refused.value.problem


def test_make_mqtt_source_builds_the_configured_client(tmp_path: Path) -> None:
    config = config_from_dict(_config(tmp_path, client="paho"))
    context = make_context("s-1", default_registry(), config.input, b"test-id-key")
    assert isinstance(make_mqtt_source(config.mqtt, "c-1", context), MqttSource)
    if not awscrt_available():
        return
    from edge_agent.sources.mqtt_crt import MqttCrtSource

    config = config_from_dict(_config(tmp_path, client="awscrt"))
    assert isinstance(make_mqtt_source(config.mqtt, "c-1", context), MqttCrtSource)
