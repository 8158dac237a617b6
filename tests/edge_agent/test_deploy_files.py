"""``deploy/agent.toml``: the example config lists every key of the code, with its default."""

from __future__ import annotations

import dataclasses
import os
import re
import tomllib
from pathlib import Path
from typing import Any

import pytest

from edge_agent.cli import main
from edge_agent.config import (
    ENV_PREFIX,
    Config,
    SerialPort,
    SerialSection,
    config_from_dict,
    load_config,
)

EXAMPLE = Path(__file__).resolve().parents[2] / "deploy" / "agent.toml"
# [[serial.ports]] is an array: the example shows one, commented out (a port that does not
# exist on the box would keep /readyz at 503), as lines "# key = value" under "# [[serial.ports]]".
_COMMENTED_TABLE = "# [[serial.ports]]"
_COMMENTED_KEY = re.compile(r"^# (\w+ = .+)$")


@pytest.fixture(autouse=True)
def _no_overrides(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith(ENV_PREFIX):
            monkeypatch.delenv(name)


def _sections() -> dict[str, type[Any]]:
    """Every section of Config by name, with its dataclass (the serial section aside)."""
    defaults = _default_config()
    sections = {f.name: type(getattr(defaults, f.name)) for f in dataclasses.fields(Config)}
    return {name: cls for name, cls in sections.items() if cls is not SerialSection}


def _default_config() -> Config:
    return config_from_dict({"agent": {"store_id": "store-001"}})


def _commented_serial_port() -> dict[str, Any]:
    lines = EXAMPLE.read_text("utf-8").splitlines()
    assert _COMMENTED_TABLE in lines, "the example must show a commented [[serial.ports]]"
    start = lines.index(_COMMENTED_TABLE) + 1
    body = []
    for line in lines[start : start + 20]:
        match = _COMMENTED_KEY.match(line)
        if match is None:
            break
        body.append(match.group(1))
    return tomllib.loads("\n".join(body))


def test_every_key_of_every_section_is_in_the_example() -> None:
    document = tomllib.loads(EXAMPLE.read_text("utf-8"))
    load_config(EXAMPLE, environ={})  # valid as it stands
    sections = _sections()
    assert set(sections) | {"serial"} == {f.name for f in dataclasses.fields(Config)}
    missing = [
        f"{name}.{key.name}"
        for name, section_type in sections.items()
        for key in dataclasses.fields(section_type)
        if key.name not in document.get(name, {})
    ]
    assert missing == [], f"deploy/agent.toml lacks {missing}"


def test_the_example_values_are_the_defaults() -> None:
    """The comments say "default X": the values written must be those defaults."""
    loaded = load_config(EXAMPLE, environ={})
    defaults = _default_config()
    for name in _sections():
        assert getattr(loaded, name) == getattr(defaults, name), name


def test_every_key_is_commented() -> None:
    """Each key, or the group of keys it belongs to, has a comment right above it."""
    lines = EXAMPLE.read_text("utf-8").splitlines()
    key = re.compile(r"^\w+ = ")
    for number, line in enumerate(lines):
        if key.match(line):
            above = number - 1
            while above > 0 and key.match(lines[above]):
                above -= 1
            assert lines[above].startswith("#"), f"uncommented key: {line}"


def test_the_commented_serial_port_has_every_key_and_is_valid() -> None:
    port = _commented_serial_port()
    assert set(port) == {f.name for f in dataclasses.fields(SerialPort)}
    config = config_from_dict({"agent": {"store_id": "store-001"}, "serial": {"ports": [port]}})
    assert config.serial.ports[0].url.startswith("/dev/serial/by-id/")
    assert config.serial.ports[0].baud == SerialPort(url="x").baud


def test_check_config_accepts_the_example(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check-config", "--config", str(EXAMPLE)]) == 0
    assert capsys.readouterr().out.startswith("ok: store_id=store-001 ")


def test_check_config_rejects_a_typo_in_a_copy(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The check above can fail: the same command on a broken copy exits 2 naming the key."""
    broken = tmp_path / "agent.toml"
    broken.write_text(EXAMPLE.read_text("utf-8").replace("top_k = 5", "top_kk = 5"), "utf-8")
    assert main(["check-config", "--config", str(broken)]) == 2
    assert "model.top_kk" in capsys.readouterr().err


OPERATIONS = Path(__file__).resolve().parents[2] / "docs" / "operations.md"


def test_operations_guide_names_only_real_config_keys() -> None:
    """Every "[section] key" the guide names is a key of the code."""
    text = OPERATIONS.read_text("utf-8")
    named = set(re.findall(r"\[(\w+)\] (\w+)", text))
    assert len(named) >= 5, named  # the pattern still finds what the guide writes
    known = {
        (name, key.name) for name, cls in _sections().items() for key in dataclasses.fields(cls)
    }
    assert named - known == set()


def test_operations_guide_names_only_real_commands(capsys: pytest.CaptureFixture[str]) -> None:
    """Every "edge-agent <command> [<subcommand>]" the guide names parses."""
    text = OPERATIONS.read_text("utf-8")
    commands = set(re.findall(r"edge-agent ([a-z][a-z-]*)(?: ([a-z][a-z-]*))?", text))
    assert ("model", "rollback") in commands
    for command, sub in sorted(commands):
        words = [command, sub] if command in ("buffer", "model") else [command]
        with pytest.raises(SystemExit) as exited:
            main([*words, "--help"])
        assert exited.value.code == 0, words
    capsys.readouterr()
