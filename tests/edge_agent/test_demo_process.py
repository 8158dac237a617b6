"""``edge-agent demo`` as a user runs it: a real process, real ports, real signals.

Each run gets its own TMPDIR, so what the demo leaves behind (its temporary data
directory) is visible to the test; children are found by that directory in their argv.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _demo(tmp: Path, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "edge_agent.cli", "--log-level", "WARNING", "demo", *args],
        cwd=REPO,
        env={**os.environ, "TMPDIR": str(tmp)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _processes_mentioning(text: str) -> list[int]:
    """Live processes whose command line names ``text`` (the demo's children)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes()
        except OSError:  # gone meanwhile
            continue
        if text.encode() in argv:
            found.append(int(entry.name))
    return found


@pytest.fixture
def held_port() -> Iterator[int]:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield int(sock.getsockname()[1])


def test_a_taken_port_is_a_clear_error_and_exit_2(tmp_path: Path, held_port: int) -> None:
    demo = _demo(tmp_path, "--duration", "30", "--http-port", str(held_port))
    try:
        _, err = demo.communicate(timeout=90)  # before the fix: waited for good
    finally:
        if demo.poll() is None:
            demo.kill()
            demo.wait(10)
    assert demo.returncode == 2, err
    assert f"127.0.0.1:{held_port} is already in use" in err
    assert "--http-port" in err  # says what to do about it
    assert "Traceback" not in err
    assert list(tmp_path.glob("edge-demo-*")) == []  # no temporary data folder left behind


def test_sigterm_during_start_up_ends_it_and_cleans_up(tmp_path: Path) -> None:
    demo = _demo(tmp_path, "--duration", "60", "--http-port", "0")
    try:
        # The data folder appears first, then the central store and the serial shelf start.
        deadline = time.monotonic() + 60
        while not list(tmp_path.glob("edge-demo-*")) and time.monotonic() < deadline:
            assert demo.poll() is None, demo.stderr.read() if demo.stderr else ""
            time.sleep(0.05)
        (data_dir,) = tmp_path.glob("edge-demo-*")
        demo.send_signal(signal.SIGTERM)
        out, err = demo.communicate(timeout=60)
    finally:
        if demo.poll() is None:
            demo.kill()
            demo.wait(10)
    assert demo.returncode == 128 + signal.SIGTERM, (out, err)
    assert "interrupted by signal" in err
    assert "Traceback" not in err
    assert "live page" not in out  # it never went on to run
    assert not data_dir.exists()
    assert _processes_mentioning(str(data_dir)) == []  # the store and the shelf stopped too


def test_a_short_run_prints_figures_that_add_up_and_removes_its_data(tmp_path: Path) -> None:
    demo = _demo(tmp_path, "--duration", "8", "--http-port", "0", "--rate", "30")
    try:
        out, err = demo.communicate(timeout=180)
    finally:
        if demo.poll() is None:
            demo.kill()
            demo.wait(10)
    assert demo.returncode == 0, err[-3000:]
    assert "malformed on purpose" in out  # the injected bad input is explained
    summary = json.loads(out[out.index("{") :])
    sources = summary["sources"]
    for name, figures in sources.items():
        assert figures["received"] == figures["accepted"] + figures["quarantined"], name
    published = summary["mqtt_published"]
    mqtt_received = sum(f["received"] for name, f in sources.items() if name.startswith("mqtt"))
    assert mqtt_received == (
        published["by_products"]
        + published["shopper_reactions"]
        + published["cross_store_customer"]
    )
    assert summary["quarantined"] >= published["of_which_malformed_on_purpose"]
    accepted = sum(f["accepted"] for f in sources.values())
    assert summary["accepted_from_sources"] == accepted > 0
    assert summary["events_collected"] == accepted + summary["recorded_by_agent"]
    assert summary["recorded_by_agent"] >= summary["suggestions_shown"] > 0
    # The cross-store customer: history from the second store and the web shop shaped it.
    travelled = summary["cross_store_customer"]
    assert travelled["completed"], travelled
    assert travelled["history"]["central"] > 0
    assert travelled["suggestion_source"] == "model"
    assert "Cross-store customer c-journey-0001" in out
    assert summary["data_dir"] is None
    assert list(tmp_path.glob("edge-demo-*")) == []
