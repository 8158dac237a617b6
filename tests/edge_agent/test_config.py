from __future__ import annotations

from pathlib import Path

import pytest

from edge_agent.cli import main
from edge_agent.config import config_from_dict, config_from_toml, load_config, public_keys
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
        config_from_dict(document)
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


S = 'store_id = "s"\n'


@pytest.mark.parametrize(
    ("text", "environ", "key"),
    [
        # Each raised something other than ConfigError (or nothing) before the loader was total.
        (f"[agent]\n{S}[sync]\ninterval_s = nan\n", {}, "sync.interval_s"),
        (f"[agent]\n{S}[input]\nmax_future_skew_s = inf\n", {}, "input.max_future_skew_s"),
        (f"[agent]\n{S}[input]\nmax_event_age_s = -1.0\n", {}, "input.max_event_age_s"),
        (f"[agent]\n{S}[input]\nmax_event_age_s = 1e300\n", {}, "input.max_event_age_s"),
        (f"[agent]\n{S}[buffer]\nmax_bytes = {10**30}\n", {}, "buffer.max_bytes"),
        (f"[agent]\n{S}", {"EDGE_AGENT__MQTT__PORT": "9" * 5000}, "mqtt.port"),
        (f"[agent]\n{S}", {"EDGE_AGENT__SYNC__TIMEOUT_S": "1e999"}, "sync.timeout_s"),
        (f"[agent]\n{S}", {"EDGE_AGENT__AGENT__DATA_DIR": "/var/\x00lib"}, "agent.data_dir"),
        (f"[agent]\n{S}", {"EDGE_AGENT__MQTT__PASSWORD": "p\udcff"}, "mqtt.password"),
        (
            f"[agent]\n{S}[model]\nsuggestion_topic = '{{prefix.x}}/{{device_id}}'\n",
            {},
            "model.suggestion_topic",
        ),
        (
            f"[agent]\n{S}[model]\nsuggestion_topic = '{{prefix:99999999}}/{{device_id}}'\n",
            {},
            "model.suggestion_topic",
        ),
        (f"[agent]\n{S}[mqtt]\ntls = true\nca_file = '{'x' * 5000}'\n", {}, "mqtt.ca_file"),
        (f"[agent]\n{S}[input]\npoison_max_deaths = 0\n", {}, "input.poison_max_deaths"),
        (f"[agent]\n{S}[input]\nclock_skew_min_events = 65\n", {}, "input.clock_skew_min_events"),
        ("x = " + "[" * 5000 + "]" * 5000 + "\n", {}, "config"),
    ],
)
def test_any_malformed_config_is_one_config_error_naming_the_key(
    text: str, environ: dict[str, str], key: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        config_from_toml(text, environ)
    assert caught.value.key == key


def test_an_unreadable_config_file_is_a_config_error(tmp_path: Path) -> None:
    binary = tmp_path / "binary.toml"
    binary.write_bytes(b"[agent]\nstore_id = '\xff\xfe'\n")
    for path in (binary, tmp_path):  # not UTF-8; a directory
        with pytest.raises(ConfigError) as caught:
            load_config(path, {})
        assert caught.value.key == str(path)
