"""Log lines of a real agent: journald priorities, strict logfmt, JSON by a config switch."""

from __future__ import annotations

import json
import logging
import os
import re
import time
from pathlib import Path

import pytest

from edge_agent import logs
from edge_agent.config import config_from_dict
from edge_agent.errors import ConfigError
from tests.conftest import agent_config_dict
from tests.support.agent import AgentProcess, wait_http_ready, write_config
from tests.support.broker import AmqttBroker, MosquittoBroker, free_port

Broker = MosquittoBroker | AmqttBroker
_PRIORITY = re.compile(r"^<([0-7])>")
_KEY = re.compile(r"[^\s=\"]+")
_BARE = re.compile(r"[^\s=\"]*")
_QUOTED = re.compile(r'"((?:[^"\\]|\\.)*)"')
_ESCAPES = {'"': '"', "\\": "\\", "n": "\n", "t": "\t", "r": "\r"}


def parse_logfmt(line: str) -> dict[str, str]:
    """A strict logfmt reader: ``key=value`` pairs split by one space; a value is bare (no
    space, quote or '=') or double-quoted with backslash escapes. Anything else raises."""
    pairs: dict[str, str] = {}
    at = 0
    while at < len(line):
        key = _KEY.match(line, at)
        if key is None or line[key.end() : key.end() + 1] != "=":
            raise ValueError(f"no key=value at {at}: {line[at : at + 40]!r}")
        at = key.end() + 1
        quoted = _QUOTED.match(line, at)
        if quoted is not None:
            value = re.sub(
                r"\\(u[0-9a-f]{4}|.)",
                lambda m: chr(int(m[1][1:], 16)) if m[1][0] == "u" else _ESCAPES[m[1]],
                quoted[1],
            )
            at = quoted.end()
        else:
            bare = _BARE.match(line, at)
            assert bare is not None  # matches the empty string at worst
            value, at = bare[0], bare.end()
        pairs[key[0]] = value
        if at < len(line):
            if line[at] != " ":
                raise ValueError(f"a value runs on at {at}: {line[at : at + 40]!r}")
            at += 1
    return pairs


def _run_agent(tmp_path: Path, store_id: str, broker: Broker, env: dict[str, str]) -> list[str]:
    """Start an agent whose uploader cannot reach its store (it warns), return its log."""
    http_port = free_port()
    document = agent_config_dict(
        tmp_path,
        store_id,
        broker,
        http={"port": http_port},
        model={"enabled": False},
        sync={"url": "http://127.0.0.1:1", "token": "t", "interval_s": 0.2, "timeout_s": 1.0},
    )
    config = write_config(tmp_path / "agent.toml", document)
    agent = AgentProcess(config, env=env)
    agent.log.touch()
    if "JOURNAL_STREAM" in env:  # systemd names the stream it connected to stderr
        stat = os.stat(agent.log)
        agent.env["JOURNAL_STREAM"] = f"{stat.st_dev}:{stat.st_ino}"
    agent.start()
    try:
        wait_http_ready(f"http://127.0.0.1:{http_port}/healthz", 60)
        deadline = time.monotonic() + 30
        while "sync.error" not in agent.log.read_text():
            assert time.monotonic() < deadline, "no sync.error warning logged"
            time.sleep(0.1)
        assert agent.terminate() == 0
    finally:
        agent.ensure_dead()
    return agent.log.read_text("utf-8").splitlines()


def test_under_journald_every_line_carries_its_priority_and_parses_as_logfmt(
    tmp_path: Path, store_id: str, mqtt_broker: Broker
) -> None:
    lines = _run_agent(tmp_path, store_id, mqtt_broker, {"JOURNAL_STREAM": "set below"})
    assert lines
    records = []
    for line in lines:
        priority = _PRIORITY.match(line)
        assert priority is not None, f"no journald priority: {line!r}"
        fields = parse_logfmt(line[priority.end() :])
        assert "ts" not in fields  # journald stamps the time itself
        records.append((int(priority[1]), fields))
    warnings = [fields for level, fields in records if level == 4]
    assert warnings, "the sync error is logged at priority 4 (warning)"
    assert all(fields["level"] == "warning" for fields in warnings)
    error = next(fields for fields in warnings if fields["msg"].startswith("sync.error "))
    assert error["logger"] == "cloud_sync.uploader"
    assert "127.0.0.1:1" in error["msg"]  # a message with spaces and colons stays one value
    assert any(level == 6 and f["msg"].startswith("agent.ready ") for level, f in records)


def test_json_lines_by_config_switch_with_time_outside_journald(
    tmp_path: Path, store_id: str, mqtt_broker: Broker
) -> None:
    lines = _run_agent(tmp_path, store_id, mqtt_broker, {"EDGE_AGENT__LOG__FORMAT": "json"})
    documents = [json.loads(line) for line in lines]
    assert all({"ts", "level", "logger", "msg"} <= set(d) for d in documents)
    assert any(d["level"] == "warning" and d["msg"].startswith("sync.error") for d in documents)


def test_logfmt_escapes_what_would_split_a_value() -> None:
    formatter = logs.LogfmtFormatter(with_time=True)
    nasty = 'detail=POST "x" a\\b\nnext line \x01 = end'
    record = logging.LogRecord("edge_agent.t", logging.ERROR, __file__, 1, "%s", (nasty,), None)
    fields = parse_logfmt(formatter.format(record))
    assert fields["msg"] == nasty
    assert fields["level"] == "error"
    assert fields["ts"].endswith("Z")


def test_priorities_follow_the_syslog_levels() -> None:
    assert [logs.priority(n) for n in (10, 20, 25, 30, 40, 50)] == [7, 6, 6, 4, 3, 2]


@pytest.mark.parametrize(
    ("section", "key", "value"),
    [("log", "format", "xml"), ("log", "level", "loud"), ("sync", "heartbeat_interval_s", 0.1)],
)
def test_log_and_heartbeat_keys_are_checked_at_load(section: str, key: str, value: object) -> None:
    base = {"agent": {"store_id": "store-1"}}
    config = config_from_dict({**base, "log": {"format": "json", "level": "debug"}})
    assert (config.log.format, config.log.level) == ("json", "debug")
    with pytest.raises(ConfigError, match=rf"{section}\.{key}"):
        config_from_dict({**base, section: {key: value}})
