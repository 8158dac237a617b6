"""Ingest benchmark: the agent's publish-to-commit rate against bare MQTT receivers.

In one run, on one private mosquitto, with the same payloads and the same publisher
(``mosquitto_pub -l``, a C client reading one message per line; the payloads are
``product.putback`` customer events, which the agent buffers but does not answer with a
suggestion — the suggestion path has its own benchmark, benchmarks/suggest.py):
  * QoS 0: a bare paho client that only counts messages, and the agent (publish → committed);
  * QoS 1: ``mosquitto_sub -q 1`` (acknowledges on receipt), and the agent (acknowledges after
    its commit, synchronous=FULL);
plus the agent's peak RSS. Each figure is the median of --repeats runs; rates count from the
publisher's start to the last message received (or committed).

Targets (issue 2): QoS 0 ≥ 75% of the bare paho rate; QoS 1 ≥ 90% of mosquitto_sub -q 1;
RSS < 80 MB.

    .venv/bin/python -m benchmarks.ingest [--messages 30000] [--repeats 3] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from benchmarks.figures import Figures, add_png_argument
from benchmarks.local_broker import free_port, mosquitto, wait_for_port

RUN_TIMEOUT_S = 180.0


def write_payloads(path: Path, count: int, store_id: str) -> None:
    run = uuid.uuid4().hex[:8]
    with path.open("w") as out:
        for n in range(count):
            out.write(
                json.dumps(
                    {
                        "event_id": f"{run}-{n:08d}",
                        "type": "product.putback",  # a customer event that triggers no suggestion
                        "customer_id": f"c-{n % 5000:06d}",
                        "data": {"sku": f"SKU-{n % 2000:06d}", "weight_g": 100 + n % 800},
                    }
                )
                + "\n"
            )


def publish(
    port: int, topic: str, payloads: Path, qos: int
) -> tuple[float, subprocess.Popen[bytes]]:
    started = time.monotonic()
    with payloads.open("rb") as stdin:
        process = subprocess.Popen(
            ["mosquitto_pub", "-p", str(port), "-t", topic, "-q", str(qos), "-l"],
            stdin=stdin,
        )
    return started, process


_COUNTER = r"""
import sys, time
import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion
port, topic, qos, count = int(sys.argv[1]), sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
state = {"n": 0, "last": 0.0}
def on_message(client, userdata, message):
    state["n"] += 1
    if state["n"] == count:
        state["last"] = time.monotonic()
        client.disconnect()
def on_connect(client, userdata, flags, reason, properties):
    client.subscribe(topic, qos)
client = paho.Client(CallbackAPIVersion.VERSION2)
client.on_message = on_message
client.on_connect = on_connect
client.connect("127.0.0.1", port)
client.loop_start()
deadline = time.monotonic() + 5
while not client.is_connected() and time.monotonic() < deadline:
    time.sleep(0.01)
time.sleep(0.3)
print("ready", flush=True)
deadline = time.monotonic() + float(sys.argv[5])
while state["n"] < count and time.monotonic() < deadline:
    time.sleep(0.01)
client.loop_stop()
print(state["n"], repr(state["last"]), flush=True)
"""


def run_bare_paho(port: int, payloads: Path, count: int, qos: int) -> float:
    topic = f"bench/{uuid.uuid4().hex[:8]}"
    counter = subprocess.Popen(
        [
            sys.executable,
            "-c",
            _COUNTER,
            str(port),
            topic,
            str(qos),
            str(count),
            str(RUN_TIMEOUT_S),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert counter.stdout is not None
    assert counter.stdout.readline().strip() == "ready"
    started, publisher = publish(port, topic, payloads, qos)
    received, last = counter.stdout.readline().split()
    counter.wait(10)
    publisher.wait(30)
    if int(received) < count:
        raise RuntimeError(f"bare paho received {received}/{count}")
    return count / (float(last) - started)


def run_mosquitto_sub(port: int, payloads: Path, count: int) -> float:
    topic = f"bench/{uuid.uuid4().hex[:8]}"
    sub = subprocess.Popen(
        [
            "mosquitto_sub",
            "-p",
            str(port),
            "-t",
            topic,
            "-q",
            "1",
            "-C",
            str(count),
            "-W",
            str(int(RUN_TIMEOUT_S)),
        ],
        stdout=subprocess.DEVNULL,
    )
    time.sleep(0.5)  # subscribed
    started, publisher = publish(port, topic, payloads, 1)
    sub.wait(RUN_TIMEOUT_S + 10)
    finished = time.monotonic()
    publisher.wait(30)
    if sub.returncode != 0:
        raise RuntimeError(f"mosquitto_sub exited {sub.returncode}")
    return count / (finished - started)


def committed(db: Path) -> int:
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5) as connection:
            return int(connection.execute("SELECT count(*) FROM events").fetchone()[0])
    except sqlite3.OperationalError:
        return 0


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def run_agent(
    port: int, payloads: Path, count: int, qos: int, store_id: str, no_model: bool
) -> tuple[float, float]:
    workdir = Path(tempfile.mkdtemp(prefix="bench-agent-"))
    http_port = free_port()
    config = workdir / "agent.toml"
    config.write_text(
        f'[agent]\nstore_id = "{store_id}"\ndata_dir = "{workdir}"\n'
        f'[mqtt]\nport = {port}\nqos = {qos}\nclient_id = "bench-{uuid.uuid4().hex[:8]}"\n'
        f"[http]\nport = {http_port}\n"
        f"[model]\nenabled = {'false' if no_model else 'true'}\n"
    )
    env = {**os.environ, "EDGE_AGENT_LOG_LEVEL": "WARNING"}
    agent = subprocess.Popen(
        [sys.executable, "-m", "edge_agent.cli", "run", "--config", str(config)], env=env
    )
    try:
        wait_for_port(http_port, 30)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:  # ready: the MQTT source is connected
            try:
                import urllib.request

                with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/readyz", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                time.sleep(0.05)
        time.sleep(0.3)
        topic = f"edge/{store_id}/devices/bench-01/events"
        started, publisher = publish(port, topic, payloads, qos)
        db = workdir / "buffer.db"
        deadline = time.monotonic() + RUN_TIMEOUT_S
        while committed(db) < count and time.monotonic() < deadline:
            time.sleep(0.01)
        finished = time.monotonic()
        publisher.wait(30)
        done = committed(db)
        if done < count:
            raise RuntimeError(f"agent committed {done}/{count}")
        rss = peak_rss_mb(agent.pid)
        return count / (finished - started), rss
    finally:
        agent.terminate()
        agent.wait(30)
        shutil.rmtree(workdir, ignore_errors=True)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--messages", type=int, default=30_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path, default=None)
    add_png_argument(parser)
    parser.add_argument(
        "--no-model", action="store_true", help="a collect-only agent ([model] enabled = false)"
    )
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="bench-ingest-"))
    with mosquitto(workdir) as port:
        return _run_all(args, workdir, port)


def _run_all(args: argparse.Namespace, workdir: Path, port: int) -> int:
    store_id = "bench-store"
    payloads = workdir / "payloads.txt"
    write_payloads(payloads, args.messages, store_id)
    samples: dict[str, list[float]] = {
        k: []
        for k in ("bare_paho_qos0", "agent_qos0", "mosquitto_sub_qos1", "agent_qos1", "rss_mb")
    }
    try:
        for _ in range(args.repeats):  # interleaved, so drift in machine load hits all alike
            samples["bare_paho_qos0"].append(run_bare_paho(port, payloads, args.messages, 0))
            rate, rss = run_agent(port, payloads, args.messages, 0, store_id, args.no_model)
            samples["agent_qos0"].append(rate)
            samples["rss_mb"].append(rss)
            samples["mosquitto_sub_qos1"].append(run_mosquitto_sub(port, payloads, args.messages))
            rate, rss = run_agent(port, payloads, args.messages, 1, store_id, args.no_model)
            samples["agent_qos1"].append(rate)
            samples["rss_mb"].append(rss)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    median = {k: statistics.median(v) for k, v in samples.items()}
    result: dict[str, Any] = {
        "messages": args.messages,
        "repeats": args.repeats,
        "median": median,
        "samples": samples,
        "qos0_ratio": median["agent_qos0"] / median["bare_paho_qos0"],
        "qos1_ratio": median["agent_qos1"] / median["mosquitto_sub_qos1"],
        "peak_rss_mb": max(samples["rss_mb"]),
    }
    print(f"messages per run: {args.messages}, runs: {args.repeats} (medians)")
    print(f"QoS 0  bare paho receive     {median['bare_paho_qos0']:>10,.0f} msg/s")
    print(
        f"QoS 0  agent publish→commit  {median['agent_qos0']:>10,.0f} msg/s"
        f"   ratio {result['qos0_ratio']:.2f} (target ≥ 0.75)"
    )
    print(f"QoS 1  mosquitto_sub -q 1    {median['mosquitto_sub_qos1']:>10,.0f} msg/s")
    print(
        f"QoS 1  agent commit→PUBACK   {median['agent_qos1']:>10,.0f} msg/s"
        f"   ratio {result['qos1_ratio']:.2f} (target ≥ 0.90)"
    )
    print(f"agent peak RSS               {result['peak_rss_mb']:>10.1f} MB (target < 80)")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    if args.png:
        figures = Figures("Ingest: agent vs bare MQTT receivers (medians)", "messages/s")
        figures.add("QoS 0 bare paho", median["bare_paho_qos0"])
        figures.add("QoS 0 agent (committed)", median["agent_qos0"])
        figures.add("QoS 1 mosquitto_sub -q 1", median["mosquitto_sub_qos1"])
        figures.add("QoS 1 agent (commit, PUBACK)", median["agent_qos1"])
        figures.write_png(args.png)
    return 0


if __name__ == "__main__":
    sys.exit(main())
