from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

UNIT = Path(__file__).resolve().parents[2] / "deploy" / "edge-agent.service"


def unit_settings() -> dict[str, list[str]]:
    settings: dict[str, list[str]] = {}
    for line in UNIT.read_text().splitlines():
        if "=" in line and not line.startswith(("#", "[")):
            key, _, value = line.partition("=")
            settings.setdefault(key.strip(), []).append(value.strip())
    return settings


def test_unit_is_a_notify_service_with_watchdog_and_restart() -> None:
    settings = unit_settings()
    assert settings["Type"] == ["notify"]
    assert settings["Restart"] == ["on-failure"]
    assert int(settings["WatchdogSec"][0]) > 0
    assert settings["StateDirectory"] == ["edge-agent"]
    assert settings["ProtectSystem"] == ["strict"]
    assert settings["ExecStart"][0].endswith("edge-agent run --config /etc/edge-agent/agent.toml")
    assert "char-ttyUSB rw" in settings["DeviceAllow"]


def test_unit_limits_restarts_beyond_what_dead_lettering_needs() -> None:
    # Issue 9: a crash loop had no end. Dead-lettering needs poison_max_deaths + 1 starts.
    from edge_agent.config import InputSection

    settings = unit_settings()
    interval, burst = int(settings["StartLimitIntervalSec"][0]), int(settings["StartLimitBurst"][0])
    restart_s = float(settings["RestartSec"][0])
    assert burst > InputSection().poison_max_deaths + 1
    assert interval > burst * restart_s  # the limit can be reached by a real loop
    unit = UNIT.read_text()
    assert unit.index("StartLimitBurst") < unit.index("[Service]")  # a [Unit] setting


def test_systemd_rates_the_unit_low_exposure() -> None:
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed on this machine")
    result = subprocess.run(
        ["systemd-analyze", "security", "--offline=true", str(UNIT)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+) (\w+)", result.stdout)
    assert match, result.stdout[-2000:] + result.stderr[-2000:]
    assert float(match.group(1)) < 2.0
    assert match.group(2) in {"SAFE", "OK"}
