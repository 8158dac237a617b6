"""Shared fixtures: a private MQTT broker, agent configs on real files in tmp_path."""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from edge_agent.sources.mqtt_select import awscrt_available
from tests.support.broker import AmqttBroker, MosquittoBroker, start_broker
from tests.support.services import missing_service

# The MQTT client the agent under test runs on (``[mqtt] client``); set by ``mqtt_client``.
# An environment override, so agents started as processes run on it too.
MQTT_CLIENT_ENV = "EDGE_AGENT__MQTT__CLIENT"


@pytest.fixture(scope="session")
def mqtt_broker(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[MosquittoBroker | AmqttBroker]:
    broker = start_broker(tmp_path_factory.mktemp("broker"))
    yield broker
    if isinstance(broker, AmqttBroker):
        broker.close()
    else:
        broker.stop()


@pytest.fixture
def private_broker(tmp_path: Path) -> Iterator[MosquittoBroker | AmqttBroker]:
    """A broker of the test's own, for tests that restart or stop it."""
    broker = start_broker(tmp_path / "broker")
    yield broker
    if isinstance(broker, AmqttBroker):
        broker.close()
    else:
        broker.stop()


@pytest.fixture(params=["paho", "awscrt"])
def mqtt_client(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run the test once per MQTT client: the existing MQTT suite is the proof of both."""
    client = str(request.param)
    if client == "awscrt":
        if not awscrt_available():
            missing_service("awscrt is not installed (pip install awscrt)")
        if not shutil.which("mosquitto"):
            missing_service("awscrt speaks MQTT 5 only; amqtt (no mosquitto here) speaks 3.1.1")
    monkeypatch.setenv(MQTT_CLIENT_ENV, client)
    return client


@pytest.fixture
def store_id() -> str:
    # One store id per test: its topics never see another test's messages.
    return f"store-{uuid.uuid4().hex[:10]}"


# The core tests count exactly what they publish: no suggestion.shown events beside it.
COLLECT_ONLY = {"enabled": False}


def agent_config_dict(
    tmp_path: Path, store_id: str, broker: MosquittoBroker | AmqttBroker, **sections: Any
) -> dict[str, Any]:
    document: dict[str, Any] = {
        "agent": {"store_id": store_id, "data_dir": str(tmp_path / "data")},
        "mqtt": {
            "host": broker.host,
            "port": broker.port,
            "reconnect_min_s": 0.1,
            "reconnect_max_s": 1.0,
            # amqtt (the fallback where mosquitto is absent) speaks MQTT 3.1.1 only.
            "protocol": "auto" if isinstance(broker, MosquittoBroker) else "3.1.1",
        },
        "http": {"host": "127.0.0.1", "port": 0},
    }
    if client := os.environ.get(MQTT_CLIENT_ENV):  # under the mqtt_client fixture
        document["mqtt"]["client"] = client
    for name, values in sections.items():
        document.setdefault(name, {}).update(values)
    return document
