"""The live page's layout in a real headless Chromium against a running demo, at 1280 and 390 px.

Chromium is driven over its DevTools protocol (aiohttp's websocket client): the test measures
the DOM (no horizontal overflow, the badge's text colour differs from its background, trends
drawn, times carry a zone) and keeps a screenshot per width for a person to look at.
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import aiohttp

from tests.edge_agent.test_live_page import chromium_binary
from tests.support.agent import wait_http_ready
from tests.support.broker import free_port

MEASURE = """(() => {
  const state = document.getElementById("state");
  const style = getComputedStyle(state);
  // The "needs attention" look, measured on a copy of the badge (the demo is healthy).
  const bad = state.cloneNode(true);
  bad.className = "state bad";
  state.parentNode.appendChild(bad);
  const badStyle = getComputedStyle(bad);
  const badLook = [badStyle.color, badStyle.backgroundColor];
  bad.remove();
  const lines = [...document.querySelectorAll(".trend polyline")];
  const times = [...document.querySelectorAll("time")];
  return JSON.stringify({
    scrollWidth: document.documentElement.scrollWidth,
    clientWidth: document.documentElement.clientWidth,
    badgeText: state.textContent,
    badgeColor: style.color,
    badgeBackground: style.backgroundColor,
    badBadge: badLook,
    trendsDrawn: lines.filter((l) => l.getAttribute("points").split(" ").length >= 2)
      .map((l) => l.closest(".trend").dataset.trend),
    times: times.map((t) => [t.textContent, t.title]),
    devices: document.querySelectorAll("#devices tbody tr").length,
    modelShare: document.getElementById("model-share").textContent,
  });
})()"""


class DevTools:
    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws = ws
        self.ids = itertools.count(1)

    async def call(self, method: str, **params: Any) -> dict[str, Any]:
        call_id = next(self.ids)
        await self.ws.send_json({"id": call_id, "method": method, "params": params})
        for _ in range(10_000):  # events arrive between answers; bounded by count and timeout
            message = await asyncio.wait_for(self.ws.receive_json(), 30)
            if message.get("id") == call_id:
                assert "error" not in message, message
                result: dict[str, Any] = message["result"]
                return result
        raise AssertionError(f"no answer to {method}")


def devtools_port(profile: Path, deadline_s: float) -> int:
    marker = profile / "DevToolsActivePort"
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        if marker.exists() and marker.read_text().strip():
            return int(marker.read_text().splitlines()[0])
        time.sleep(0.2)
    raise AssertionError("Chromium did not open its DevTools port")


async def measure(port: int, url: str, width: int, shot: Path) -> dict[str, Any]:
    async with aiohttp.ClientSession() as session:
        async with session.get(f"http://127.0.0.1:{port}/json/list") as answer:
            pages = [t for t in await answer.json(content_type=None) if t["type"] == "page"]
        ws = await session.ws_connect(pages[0]["webSocketDebuggerUrl"], max_msg_size=0)
        tools = DevTools(ws)
        await tools.call(
            "Emulation.setDeviceMetricsOverride",
            width=width,
            height=900,
            deviceScaleFactor=1,
            mobile=width < 600,
        )
        await tools.call("Page.navigate", url=url)
        figures: dict[str, Any] = {}
        for _ in range(40):  # the page polls every 2 s; wait for its first render
            await asyncio.sleep(0.5)
            reply = await tools.call("Runtime.evaluate", expression=MEASURE)
            figures = json.loads(reply["result"]["value"])
            if figures["trendsDrawn"] and figures["devices"]:
                break
        picture = await tools.call("Page.captureScreenshot", format="png")
        shot.write_bytes(base64.b64decode(picture["data"]))
        await ws.close()
        return figures


def wait_for_trends(url: str, deadline_s: float) -> None:
    """The status server samples every 10 s; a rate needs two samples to be drawn."""
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        with urllib.request.urlopen(url + "status", timeout=10) as answer:
            series = json.load(answer)["trends"]["series"]["ingest_per_s"]
        if sum(1 for _, value in series if value is not None) >= 2:
            return
        time.sleep(1)
    raise AssertionError("no ingest trend after the deadline")


def test_live_page_layout_at_desktop_and_phone_width(tmp_path: Path) -> None:
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
            "150",
            "--http-port",
            str(http_port),
            "--data-dir",
            str(tmp_path / "demo"),
            "--rate",
            "40",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{http_port}/"
    profile = tmp_path / "profile"
    browser: subprocess.Popen[bytes] | None = None
    results: dict[int, dict[str, Any]] = {}
    try:
        wait_http_ready(url + "readyz", 90)
        wait_for_trends(url, 60)
        browser = subprocess.Popen(
            [
                binary,
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--hide-scrollbars",
                f"--user-data-dir={profile}",
                "--remote-debugging-port=0",
                "about:blank",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        port = devtools_port(profile, 60)
        for width in (1280, 390):
            shot = tmp_path / f"live-{width}.png"
            results[width] = asyncio.run(measure(port, url, width, shot))
            assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        demo.send_signal(signal.SIGINT)
        demo.wait(60)
    finally:
        for process in (browser, demo):
            if process is not None and process.poll() is None:
                process.kill()
                process.wait(10)
    for width, figures in results.items():
        assert figures["scrollWidth"] <= figures["clientWidth"], (width, figures)
        assert figures["badgeText"] in {"healthy", "needs attention"}, figures
        assert figures["badgeColor"] != figures["badgeBackground"], figures
        assert figures["badBadge"][0] != figures["badBadge"][1], figures  # was red on red
        assert "ingest_per_s" in figures["trendsDrawn"], figures
        assert figures["devices"] >= 1, figures
        assert "from the model" in figures["modelShare"], figures
        assert figures["times"], figures
        for shown, hover in figures["times"]:
            # Local time with its zone name or offset (e.g. "UTC", "GMT+1", "CET"), UTC on hover.
            assert any(c.isalpha() for c in shown.split()[-1]), shown
            assert hover.endswith(" UTC"), hover
