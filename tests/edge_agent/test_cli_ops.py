"""The operator's side of the CLI and the config loader: conf.d drop-ins, systemd
credentials, ``status`` without a config, ``check-config``'s machine warnings, ``--version``.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from edge_agent import __version__
from edge_agent.cli import main
from edge_agent.config import DEFAULT_CONFIG_PATH, load_config
from edge_agent.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_drop_ins_merge_over_the_file_in_name_order(tmp_path: Path) -> None:
    config = _write(
        tmp_path / "agent.toml",
        '[agent]\nstore_id = "store-001"\n[mqtt]\nport = 1883\nhost = "broker.local"\n'
        '[[serial.ports]]\nurl = "/dev/ttyUSB0"\n',
    )
    _write(tmp_path / "conf.d/20-mqtt.toml", "[mqtt]\nport = 1884\n")
    _write(tmp_path / "conf.d/10-store.toml", '[agent]\nstore_id = "store-042"\n[mqtt]\nport = 1')
    _write(
        tmp_path / "conf.d/30-serial.toml",
        '[[serial.ports]]\nurl = "/dev/ttyACM0"\n[[serial.ports]]\nurl = "/dev/ttyACM1"\n',
    )
    _write(tmp_path / "conf.d/README", "not a drop-in: only *.toml files are read")
    loaded = load_config(config, {})
    assert loaded.agent.store_id == "store-042"
    assert loaded.mqtt.port == 1884  # 20- comes after 10-: the later file wins
    assert loaded.mqtt.host == "broker.local"  # keys a drop-in does not name are kept
    assert [port.url for port in loaded.serial.ports] == ["/dev/ttyACM0", "/dev/ttyACM1"]


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("[mqtt]\nprot = 1884\n", "mqtt.prot: unknown key"),
        ("[mqtt]\nport = true\n", "mqtt.port: must be an integer"),
        ("[mqtt\n", "not valid TOML"),
    ],
)
def test_an_error_in_a_drop_in_names_its_file(tmp_path: Path, text: str, problem: str) -> None:
    config = _write(tmp_path / "agent.toml", '[agent]\nstore_id = "store-042"\n')
    dropin = _write(tmp_path / "conf.d/40-broken.toml", text)
    with pytest.raises(ConfigError) as raised:
        load_config(config, {})
    assert str(dropin) in str(raised.value)
    assert problem in str(raised.value)


def test_secrets_come_from_systemd_credentials(tmp_path: Path) -> None:
    config = _write(
        tmp_path / "agent.toml",
        '[agent]\nstore_id = "store-042"\n[sync]\nurl = "https://customers.example.com"\n',
    )
    credentials = tmp_path / "credentials"
    _write(credentials / "sync-token", "token-from-credential\n")
    _write(credentials / "mqtt-password", "")  # empty: not set
    _write(credentials / "pseudonym-key", "a-pseudonym-key-of-some-length\n")
    environ = {"CREDENTIALS_DIRECTORY": str(credentials)}
    loaded = load_config(config, environ)
    assert loaded.sync.token == "token-from-credential"
    assert loaded.mqtt.password == ""
    assert loaded.governance.pseudonym_key == "a-pseudonym-key-of-some-length"
    # An environment override still wins (a one-off run by hand).
    overridden = load_config(config, {**environ, "EDGE_AGENT__SYNC__TOKEN": "by-hand"})
    assert overridden.sync.token == "by-hand"
    # Without the credential, a sync url with no token is refused as before.
    with pytest.raises(ConfigError, match=r"sync\.token"):
        load_config(config, {})


@pytest.mark.skipif(DEFAULT_CONFIG_PATH.exists(), reason="this machine has a real config")
def test_status_without_a_config_asks_the_default_port(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["status"])
    captured = capsys.readouterr()
    assert "store_id" not in captured.err  # no config needed (it was refused before)
    if code == 1:  # nothing listens on the default port here
        assert "http://127.0.0.1:8787/status" in captured.err
    else:  # an agent on this machine answered at the default port
        assert code == 0
        assert '"version"' in captured.out


def test_check_config_warns_about_the_machine_and_still_passes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    not_a_dir = _write(tmp_path / "a-file", "")
    config = _write(
        tmp_path / "agent.toml",
        f'[agent]\nstore_id = "store-042"\ndata_dir = "{not_a_dir}/data"\n'
        '[mqtt]\nhost = "no-such-broker.invalid"\n'
        f'[[serial.ports]]\nurl = "{tmp_path}/ttyUSB-missing"\n'
        '[[serial.ports]]\nurl = "socket://127.0.0.1:1"\n',
    )
    assert main(["check-config", "--config", str(config)]) == 0
    captured = capsys.readouterr()
    assert "ok: store_id=store-042" in captured.out
    warnings = [line for line in captured.err.splitlines() if line.startswith("warning: ")]
    assert len(warnings) == 3, captured.err
    assert f"agent.data_dir: {not_a_dir} is not a directory" in captured.err
    assert "serial.ports[0].url" in captured.err
    assert "serial.ports[1]" not in captured.err  # a pyserial URL is not a file
    assert "mqtt.host: no-such-broker.invalid cannot be resolved" in captured.err


def test_check_config_is_quiet_on_a_sound_machine(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = _write(
        tmp_path / "agent.toml",
        f'[agent]\nstore_id = "store-042"\ndata_dir = "{tmp_path}/new/data"\n',
    )
    assert main(["check-config", "--config", str(config)]) == 0
    assert "warning" not in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv",
    [
        ["--version"],
        ["status", "--version"],
        ["demo", "--version"],
        ["buffer", "export", "--version"],
    ],
)
def test_version_at_every_level(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(argv)
    assert exited.value.code == 0
    assert capsys.readouterr().out.strip() == __version__


@pytest.mark.parametrize("module", ["cloud_sync.store", "firmware_bridge.sim", "models.cli"])
def test_every_console_script_prints_its_version(module: str) -> None:
    ran = subprocess.run(
        [sys.executable, "-m", module, "--version"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert ran.returncode == 0, ran.stderr
    assert ran.stdout.strip() == __version__
