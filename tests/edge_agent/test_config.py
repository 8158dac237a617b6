from __future__ import annotations

from pathlib import Path

import pytest

from edge_agent.cli import main
from edge_agent.config import config_from_dict, load_config, public_keys
from edge_agent.errors import ConfigError


def test_defaults_follow_the_design(tmp_path: Path) -> None:
    config = config_from_dict({"agent": {"store_id": "store-001", "data_dir": str(tmp_path)}})
    assert (config.mqtt.host, config.mqtt.port, config.mqtt.topic_prefix) == (
        "127.0.0.1",
        1883,
        "edge",
    )
    assert (config.http.host, config.http.port) == ("127.0.0.1", 8787)
    assert config.buffer.max_bytes == 1073741824
    assert config.buffer_path == tmp_path / "buffer.db"
    assert config.model.top_k == 5
    assert config.governance.require_consent is True
    assert config.mqtt_client_id == "edge-agent-store-001"


def test_environment_overrides_keys_with_their_types(tmp_path: Path) -> None:
    path = tmp_path / "agent.toml"
    path.write_text('[agent]\nstore_id = "s1"\n[mqtt]\nport = 1883\n')
    config = load_config(
        path,
        {
            "EDGE_AGENT__MQTT__PORT": "1884",
            "EDGE_AGENT__GOVERNANCE__REQUIRE_CONSENT": "false",
            "EDGE_AGENT__SYNC__TOKEN": "secret",
            "UNRELATED": "x",
        },
    )
    assert config.mqtt.port == 1884
    assert config.governance.require_consent is False
    assert config.sync.token == "secret"


@pytest.mark.parametrize(
    ("document", "key"),
    [
        ({"agent": {}}, "agent.store_id"),
        ({"agent": {"store_id": "bad id!"}}, "agent.store_id"),
        ({"agent": {"store_id": "s"}, "mqtt": {"prot": 1}}, "mqtt.prot"),
        ({"agent": {"store_id": "s"}, "mqtt": {"port": "many"}}, "mqtt.port"),
        ({"agent": {"store_id": "s"}, "mqtt": {"port": 70000}}, "mqtt.port"),
        ({"agent": {"store_id": "s"}, "mqtt": {"qos": 2}}, "mqtt.qos"),
        ({"agent": {"store_id": "s"}, "buffer": {"max_bytes": 10}}, "buffer.max_bytes"),
        ({"agent": {"store_id": "s"}, "buffer": {"synchronous": "off"}}, "buffer.synchronous"),
        ({"agent": {"store_id": "s"}, "sync": {"url": "ftp://x"}}, "sync.url"),
        (
            {"agent": {"store_id": "s"}, "sync": {"url": "http://store.example", "token": "t"}},
            "sync.url",
        ),
        ({"agent": {"store_id": "s"}, "model": {"public_key": "not base64!"}}, "model.public_key"),
        ({"agent": {"store_id": "s"}, "model": {"public_key": "AAAA"}}, "model.public_key"),
        (
            {"agent": {"store_id": "s"}, "model": {"max_download_bytes": 10}},
            "model.max_download_bytes",
        ),
        (
            {"agent": {"store_id": "s"}, "serial": {"ports": [{"baud": 9600}]}},
            "serial.ports[0].url",
        ),
        ({"agent": {"store_id": "s"}, "nonsense": {}}, "nonsense"),
        (
            {"agent": {"store_id": "s"}, "governance": {"require_consent": "maybe"}},
            "governance.require_consent",
        ),
    ],
)
def test_invalid_config_names_the_key(document: dict[str, object], key: str) -> None:
    with pytest.raises(ConfigError) as caught:
        config_from_dict(document)  # type: ignore[arg-type]
    assert caught.value.key == key
    assert key in str(caught.value)


def test_serial_ports_are_read_in_order() -> None:
    config = config_from_dict(
        {
            "agent": {"store_id": "s"},
            "serial": {"ports": [{"url": "/dev/serial/by-id/a"}, {"url": "loop://", "baud": 9600}]},
        }
    )
    assert [(p.url, p.baud) for p in config.serial.ports] == [
        ("/dev/serial/by-id/a", 115200),
        ("loop://", 9600),
    ]


def test_check_config_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    good = tmp_path / "good.toml"
    good.write_text('[agent]\nstore_id = "store-9"\n')
    assert main(["check-config", "--config", str(good)]) == 0
    assert "store_id=store-9" in capsys.readouterr().out
    bad = tmp_path / "bad.toml"
    bad.write_text('[agent]\nstore_id = "store-9"\n[http]\nport = "eighty"\n')
    assert main(["check-config", "--config", str(bad)]) == 2
    assert "http.port" in capsys.readouterr().err
    assert main(["check-config", "--config", str(tmp_path / "missing.toml")]) == 2
    broken = tmp_path / "broken.toml"
    broken.write_text("[agent\n")
    assert main(["check-config", "--config", str(broken)]) == 2
    assert "not valid TOML" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("url", "allow"),
    [
        ("https://store.example", False),
        ("http://127.0.0.1:8700", False),
        ("http://[::1]:8700", False),
        ("http://localhost:8700", False),
        ("http://10.0.0.5:8700", True),
    ],
)
def test_plain_http_sync_only_on_loopback_or_when_allowed(url: str, allow: bool) -> None:
    sync = {"url": url, "token": "t", "allow_insecure_http": allow}
    config = config_from_dict({"agent": {"store_id": "s"}, "sync": sync})
    assert config.sync.url == url


def test_model_public_keys_accept_a_rotation_pair() -> None:
    first, second = "A" * 43 + "=", "B" * 43 + "="
    config = config_from_dict(
        {"agent": {"store_id": "s"}, "model": {"public_key": f"{first} {second}"}}
    )
    assert len(public_keys(config.model)) == 2
