"""The live page in a real headless Chromium against a running demo: figures appear, change."""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.support.agent import wait_http_ready
from tests.support.broker import free_port
from tests.support.services import missing_service

FIGURE = re.compile(r'id="(\w+)" data-figure="\w+">([^<]*)<')


def chromium_binary() -> str:
    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    if binary is None:
        missing_service("Chromium is not installed (Debian package chromium)")
    assert binary is not None
    return binary


def run_chromium(binary: str, profile: Path, *args: str) -> str:
    result = subprocess.run(
        [
            binary,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            f"--user-data-dir={profile}",
            "--virtual-time-budget=5000",
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=90,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


def figures(dom: str) -> dict[str, int]:
    found = dict(FIGURE.findall(dom))
    return {
        name: int(value.replace(",", ""))
        for name, value in found.items()
        if value.replace(",", "").isdigit()
    }


def test_live_page_shows_live_figures_in_chromium(tmp_path: Path) -> None:
    binary = chromium_binary()
    http_port = free_port()
    demo = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "edge_agent.cli",
            "--log-level",
            "WARNING",
            "demo",
            "--duration",
            "120",
            "--http-port",
            str(http_port),
            "--data-dir",
            str(tmp_path / "demo"),
            "--rate",
            "40",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    url = f"http://127.0.0.1:{http_port}/"
    try:
        wait_http_ready(url + "readyz", 90)
        time.sleep(3)
        first_dom = run_chromium(binary, tmp_path / "p1", "--dump-dom", url)
        time.sleep(4)
        second_dom = run_chromium(binary, tmp_path / "p2", "--dump-dom", url)
        shot = tmp_path / "phone.png"
        run_chromium(
            binary,
            tmp_path / "p3",
            f"--screenshot={shot}",
            "--window-size=412,915",
            "--hide-scrollbars",
            url,
        )
        demo.send_signal(signal.SIGINT)  # Ctrl-C: an orderly stop and a summary
        out, _ = demo.communicate(timeout=60)
    finally:
        if demo.poll() is None:
            demo.kill()
            demo.wait(10)
    first, second = figures(first_dom), figures(second_dom)
    assert {"accepted", "total", "pending", "shown", "taken"} <= set(first), first_dom[-3000:]
    assert first["accepted"] > 0
    assert first["total"] > 0
    assert second["accepted"] > first["accepted"], (first, second)
    assert second["total"] > first["total"]
    assert "healthy" in second_dom or "needs attention" in second_dom
    sources_table = second_dom.split('<table id="sources">')[1].split("</table>")[0]
    assert "connected" in sources_table
    assert "DISCONNECTED" not in sources_table
    recent_rows = second_dom.split('id="recent"')[1].count("<tr>")
    assert recent_rows >= 2  # the header and at least one suggestion
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert demo.returncode == 0
    summary = json.loads(out[out.index("{") :])
    assert summary["events_collected"] > 0
    assert summary["suggestions_shown"] > 0
    assert summary["synced"] > 0
