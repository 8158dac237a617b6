"""``[mqtt] client``: which MQTT client the sources run on, and what the config refuses."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import pytest

from cloud_sync.envelope_schema import default_registry
from edge_agent.config import config_from_dict
from edge_agent.decode import make_context
from edge_agent.errors import ConfigError
from edge_agent.sources.mqtt import MqttSource
from edge_agent.sources.mqtt_select import awscrt_available, make_mqtt_source, mqtt_client_for
from tests.conftest import COLLECT_ONLY, agent_config_dict
from tests.support.agent import (
    Publisher,
    agent_running,
    buffered_event_ids,
    event_topic,
    pickup,
    wait_until,
)
from tests.support.broker import AmqttBroker
from tests.support.services import missing_service


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


async def test_auto_falls_back_to_paho_on_a_broker_without_mqtt5(
    tmp_path: Path, store_id: str
) -> None:
    # amqtt speaks MQTT 3.1.1 only and does not answer an MQTT 5 CONNECT at all.
    if not awscrt_available():
        missing_service("awscrt is not installed (pip install awscrt)")
    broker = AmqttBroker()
    try:
        document = agent_config_dict(tmp_path, store_id, broker, model=COLLECT_ONLY)
        document["mqtt"]["protocol"] = "auto"  # and client auto: awscrt first
        publisher = Publisher(broker.host, broker.port)
        try:
            async with agent_running(document) as agent:
                await wait_until(lambda: all(s.stats.connected for s in agent.sources), 30)
                for n in range(20):
                    publisher.publish(event_topic(store_id), pickup(f"ev-{n}"))
                await asyncio.to_thread(publisher.wait_all)
                await wait_until(lambda: agent.buffer.counters.committed == 20, 20)
                assert agent.sources[0].stats.accepted == 20
                assert type(agent.sources[0]).__name__ == "MqttCrtSource"  # it started on awscrt
        finally:
            publisher.close()
    finally:
        broker.close()
    assert len(buffered_event_ids(tmp_path / "data" / "buffer.db")) == 20


@pytest.mark.skipif(not awscrt_available(), reason="the [awscrt] extra is not installed")
def test_an_agent_on_awscrt_does_not_import_paho() -> None:
    """paho is loaded only when the awscrt source falls back to MQTT 3.1.1 (memory, issue
    11): the agent's wiring and the awscrt source, imported in a fresh interpreter, leave it
    out; the paho source itself still pulls it in (the probe can see an import)."""
    probe = (
        "import sys, edge_agent.app, edge_agent.sources.mqtt_crt\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'paho'))\n"
        "import edge_agent.sources.mqtt\n"
        "print('paho.mqtt.client' in sys.modules)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=60
    ).stdout.splitlines()
    assert out == ["[]", "True"]
