"""Shared fixtures: a private MQTT broker, agent configs on real files in tmp_path."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.broker import AmqttBroker, MosquittoBroker, start_broker


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
    for name, values in sections.items():
        document.setdefault(name, {}).update(values)
    return document
