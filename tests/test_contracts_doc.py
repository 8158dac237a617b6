"""docs/contracts.md stays honest: it names every CLI subcommand, config key and HTTP route."""

from __future__ import annotations

import dataclasses
import re
import subprocess
import sys
from pathlib import Path

import pytest

from edge_agent.config import SerialPort, config_from_dict

ROOT = Path(__file__).resolve().parents[1]
CONTRACTS = (ROOT / "docs" / "contracts.md").read_text("utf-8")
ROUTE = re.compile(r'add_(get|post|put|delete)\(\s*"([^"]+)"')
CHOICES = re.compile(r"\{([a-z][a-z,-]*)\}")


def _subcommands(*argv: str) -> set[str]:
    out = subprocess.run(
        [sys.executable, "-m", *argv, "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    found = CHOICES.search(out)
    assert found, out
    return set(found.group(1).split(","))


@pytest.mark.parametrize(
    "argv",
    [
        ("edge_agent.cli",),
        ("edge_agent.cli", "buffer"),
        ("edge_agent.cli", "model"),
        ("cloud_sync.store.cli",),
        ("models.cli",),
    ],
)
def test_every_subcommand_is_named(argv: tuple[str, ...]) -> None:
    missing = {name for name in _subcommands(*argv) if f"`{name}`" not in CONTRACTS}
    assert not missing, f"docs/contracts.md does not name {sorted(missing)} of {argv}"


def test_every_config_key_is_named() -> None:
    config = config_from_dict({"agent": {"store_id": "store-001"}})
    missing = []
    for section in dataclasses.fields(config):
        value = getattr(config, section.name)
        if dataclasses.is_dataclass(value):
            line = next((ln for ln in CONTRACTS.splitlines() if f"`[{section.name}]`" in ln), "")
            missing += [
                f"{section.name}.{key.name}"
                for key in dataclasses.fields(value)
                if f"`{key.name}`" not in line
            ]
    port_line = next(ln for ln in CONTRACTS.splitlines() if "`[[serial.ports]]`" in ln)
    missing += [
        f"serial.ports.{k.name}"
        for k in dataclasses.fields(SerialPort)
        if f"`{k.name}`" not in port_line
    ]
    assert not missing, f"docs/contracts.md does not name {missing}"


@pytest.mark.parametrize("module", ["edge_agent/status/server.py", "cloud_sync/store/app.py"])
def test_every_http_route_is_named(module: str) -> None:
    routes = ROUTE.findall((ROOT / module).read_text("utf-8"))
    assert routes
    missing = [
        f"{method.upper()} {path}"
        for method, path in routes
        if f"{method.upper()} {path}" not in CONTRACTS
        and f"`{method.upper()} {path}`" not in CONTRACTS
    ]
    assert not missing, f"docs/contracts.md does not name {missing} of {module}"


def test_no_doc_points_outside_the_repository() -> None:
    docs = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    docs += sorted((ROOT / "cloud_sync").rglob("README.md"))
    outside = [str(d.relative_to(ROOT)) for d in docs if "../shared" in d.read_text("utf-8")]
    assert not outside, f"{outside} point outside the repository"
