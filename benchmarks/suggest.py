"""Benchmark: event-to-suggestion latency of the agent against a bare MQTT floor.

One run, one private mosquitto on a free loopback port:

- floor: a bare paho client (its own process) that republishes each trigger it receives;
  a second client publishes the trigger (QoS 1, as devices do) and times the republished
  message coming back (QoS 0, as suggestions go);
- agent: ``edge-agent run`` (its own process, the bundled model, fsync'd buffer), timed the
  same way: trigger on ``edge/{store}/devices/shelf-01/events``, suggestion back on
  ``edge/{store}/suggestions/shelf-01``;
- each idle, then with 5,000 telemetry messages/s (QoS 1, from a third process) flowing to the
  same broker and into the same subscriber (the floor subscribes to the telemetry too).

Triggers are sent one at a time (the next after the answer or a 1 s timeout), so each figure
is the latency of one request, not of a queue. Targets (issue 4): agent p99 within 2x the
floor's p99 idle, and under 5 ms loaded.

    .venv/bin/python -m benchmarks.suggest [--samples 1000] [--rate 5000] [--json out.json]
        [--clients paho,awscrt]   # the agent on each MQTT client, one after the other

Not a test: figures depend on the machine and its load. Everything is bounded by count and time.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
import os
import platform
import random
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from benchmarks.figures import Figures, add_png_argument
from benchmarks.ingest import agent_variant
from benchmarks.local_broker import free_port, stop_process
from benchmarks.local_broker import mosquitto as local_mosquitto

STORE = "store-001"
TELEMETRY_TOPIC = f"edge/{STORE}/devices/fridge-01/telemetry"
FLOOR_IN, FLOOR_OUT = "bench/in", "bench/out"
REPLY_TIMEOUT_S = 1.0


@contextlib.contextmanager
def mosquitto(workdir: Path) -> Iterator[int]:
    with local_mosquitto(workdir, "max_inflight_messages 100\nset_tcp_nodelay true\n") as port:
        yield port


def client(port: int, name: str) -> paho.Client:
    mqtt = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"{name}-{uuid.uuid4().hex[:12]}")
    mqtt.max_inflight_messages_set(1000)
    mqtt.on_socket_open = _no_delay  # paho leaves Nagle on: small messages would wait ~40 ms
    mqtt.connect("127.0.0.1", port, 30)
    return mqtt


def _no_delay(_client: paho.Client, _userdata: Any, sock: Any) -> None:
    with contextlib.suppress(OSError, AttributeError):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


# ---- helper processes -------------------------------------------------------------------


def floor_republisher(port: int, stop: Any) -> None:
    """The floor: take each trigger, publish it straight back. Also takes the telemetry."""
    mqtt = client(port, "floor")

    def on_message(c: paho.Client, _u: Any, message: paho.MQTTMessage) -> None:
        if message.topic.startswith(FLOOR_IN):
            c.publish(FLOOR_OUT + message.topic[len(FLOOR_IN) :], message.payload, qos=0)

    mqtt.on_message = on_message
    mqtt.subscribe([(FLOOR_IN + "/#", 1), (TELEMETRY_TOPIC, 1)])
    mqtt.loop_start()
    stop.wait(600)
    mqtt.loop_stop()
    mqtt.disconnect()


def telemetry_generator(port: int, rate: int, stop: Any, sent: Any) -> None:
    """``rate`` telemetry messages per second, QoS 1, in 5 ms ticks, until ``stop``."""
    mqtt = client(port, "telemetry")
    mqtt.loop_start()
    tick = 0.005
    started = time.monotonic()
    count = 0
    while not stop.is_set() and time.monotonic() - started < 600:
        due = int((time.monotonic() - started) * rate)
        while count < due:
            payload = json.dumps({"values": {"temp_c": 4.0 + (count % 10) / 10, "n": count}})
            mqtt.publish(TELEMETRY_TOPIC, payload, qos=1)
            count += 1
        sent.value = count
        time.sleep(tick)
    mqtt.loop_stop()
    mqtt.disconnect()


# ---- the measuring client ---------------------------------------------------------------


class Prober:
    """Publishes one trigger, waits for the answer that names it, records the round trip."""

    def __init__(self, port: int, reply_topic: str, key: Callable[[bytes], str]) -> None:
        self.mqtt = client(port, "prober")
        self._key = key
        self._waiting: dict[str, int] = {}
        self._arrived = threading.Event()
        self._current: str | None = None
        self._received_ns = 0
        subscribed = threading.Event()
        self.mqtt.on_message = self._on_message
        self.mqtt.on_subscribe = lambda *_: subscribed.set()
        self.mqtt.subscribe(reply_topic, qos=0)
        self.mqtt.loop_start()
        if not subscribed.wait(10):
            raise TimeoutError("no SUBACK")

    def _on_message(self, _c: paho.Client, _u: Any, message: paho.MQTTMessage) -> None:
        now = time.perf_counter_ns()
        if self._key(bytes(message.payload)) == self._current:
            self._received_ns = now
            self._arrived.set()

    def measure(
        self, samples: int, max_s: float, send: Callable[[paho.Client, str], None]
    ) -> dict[str, Any]:
        latencies: list[float] = []
        lost = 0
        deadline = time.monotonic() + max_s
        for n in range(samples):
            if time.monotonic() > deadline:
                break
            self._current = f"t-{os.getpid()}-{time.monotonic_ns()}-{n}"
            self._arrived.clear()
            start = time.perf_counter_ns()
            send(self.mqtt, self._current)
            if self._arrived.wait(REPLY_TIMEOUT_S):
                latencies.append((self._received_ns - start) / 1e6)
            else:
                lost += 1
            time.sleep(random.uniform(0.002, 0.008))  # not a burst: one request at a time
        return summarize(latencies, lost)

    def close(self) -> None:
        self.mqtt.loop_stop()
        self.mqtt.disconnect()


def summarize(latencies: list[float], lost: int) -> dict[str, Any]:
    if not latencies:
        return {"samples": 0, "lost": lost}
    values = np.array(latencies)
    return {
        "p50_ms": round(float(np.percentile(values, 50)), 3),
        "p90_ms": round(float(np.percentile(values, 90)), 3),
        "p99_ms": round(float(np.percentile(values, 99)), 3),
        "max_ms": round(float(values.max()), 3),
        "samples": len(latencies),
        "lost": lost,
    }


# ---- the phases -------------------------------------------------------------------------


@contextlib.contextmanager
def telemetry(port: int, rate: int) -> Iterator[Callable[[], float]]:
    """Telemetry flowing at ``rate``; yields a function giving the achieved rate so far."""
    context = multiprocessing.get_context("spawn")
    stop, sent = context.Event(), context.Value("q", 0)
    process = context.Process(target=telemetry_generator, args=(port, rate, stop, sent))
    process.start()
    started = time.monotonic()
    time.sleep(1.0)  # let the flow settle before measuring
    try:
        yield lambda: sent.value / (time.monotonic() - started)
    finally:
        stop.set()
        process.join(20)
        if process.is_alive():
            process.kill()


def run_floor(port: int, args: argparse.Namespace) -> dict[str, Any]:
    context = multiprocessing.get_context("spawn")
    stop = context.Event()
    process = context.Process(target=floor_republisher, args=(port, stop))
    process.start()
    time.sleep(1.0)
    prober = Prober(port, FLOOR_OUT + "/#", lambda payload: payload.decode())
    try:

        def send(mqtt: paho.Client, token: str) -> None:
            mqtt.publish(f"{FLOOR_IN}/shelf-01", token, qos=1)

        idle = prober.measure(args.samples, args.max_phase_s, send)
        with telemetry(port, args.rate) as achieved:
            loaded = prober.measure(args.samples, args.max_phase_s, send)
            loaded["telemetry_rate"] = round(achieved())
        return {"idle": idle, "loaded": loaded}
    finally:
        prober.close()
        stop.set()
        process.join(10)


def run_agent(
    port: int, workdir: Path, args: argparse.Namespace, client: str = "auto"
) -> dict[str, Any]:
    http_port = free_port()
    workdir = workdir / f"agent-{len(list(workdir.iterdir()))}"
    client, env, code = agent_variant(client)
    workdir.mkdir()
    config = workdir / "agent.toml"
    config.write_text(
        f'[agent]\nstore_id = "{STORE}"\ndata_dir = "{workdir / "data"}"\n'
        f'[mqtt]\nport = {port}\nclient = "{client}"\n[http]\nport = {http_port}\n'
        "[governance]\nrequire_consent = false\n"
        f'[buffer]\nsynchronous = "{args.buffer_synchronous}"\n'
    )
    log = (workdir / "agent.log").open("wb")
    launcher = ["-m", "edge_agent.cli"]
    if args.agent_nodelay or args.agent_switch_interval_ms:
        interval = (args.agent_switch_interval_ms or 5.0) / 1000
        launcher = ["-c", PATCHED_LAUNCHER % (args.agent_nodelay, interval)]
    process = subprocess.Popen(
        [
            sys.executable,
            *launcher,
            "--log-level",
            "WARNING",
            "run",
            "--config",
            str(config),
        ],
        stdout=subprocess.DEVNULL,
        stderr=log,
        env=env,
        cwd=code,
    )
    status_url = f"http://127.0.0.1:{http_port}/status"
    prober = None
    try:
        wait_ready(status_url)
        prober = Prober(
            port,
            f"edge/{STORE}/suggestions/shelf-01",
            lambda payload: json.loads(payload)["trigger_event_id"],
        )
        skus = [f"SKU-{n:06d}" for n in range(1, 2001)]

        def send(mqtt: paho.Client, token: str) -> None:
            trigger = {
                "event_id": token,
                "type": "product.pickup",
                "customer_id": f"c-{random.randrange(200)}",
                "data": {"sku": random.choice(skus)},
            }
            mqtt.publish(f"edge/{STORE}/devices/shelf-01/events", json.dumps(trigger), qos=1)

        prober.measure(50, 10, send)  # warm-up: sessions, caches, first allocations
        idle = prober.measure(args.samples, args.max_phase_s, send)
        with telemetry(port, args.rate) as achieved:
            loaded = prober.measure(args.samples, args.max_phase_s, send)
            loaded["telemetry_rate"] = round(achieved())
            time.sleep(0.5)
            status = json.loads(urllib.request.urlopen(status_url, timeout=5).read())
        return {
            "idle": idle,
            "loaded": loaded,
            "agent_internal_latency_ms": status["suggestions"]["latency_ms"],
            "by_source": status["suggestions"]["by_source"],
            "dropped": status["suggestions"]["dropped"],
            "model_version": status["model"]["version"],
            "committed": status["buffer"]["committed"],
        }
    finally:
        if prober is not None:
            prober.close()
        stop_process(process)
        log.close()
        tail = (workdir / "agent.log").read_text(errors="replace").splitlines()[-5:]
        if any("ERROR" in line or "Traceback" in line for line in tail):
            print("agent log tail:\n" + "\n".join(tail), file=sys.stderr)


# Diagnostics, in the agent's process only, to measure what a change in the core would buy:
# --agent-nodelay: TCP_NODELAY on its sockets, as MqttSource would get with one line (paho
# never sets it); --agent-switch-interval-ms: the GIL switch interval (Python's default 5 ms
# bounds how long the inference thread may wait for the busy event loop to let go).
PATCHED_LAUNCHER = """
import socket, sys
if %r:
    _connect = socket.create_connection
    def _no_delay(*args, **kwargs):
        sock = _connect(*args, **kwargs)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock
    socket.create_connection = _no_delay
sys.setswitchinterval(%r)
from edge_agent.cli import main
sys.exit(main(sys.argv[1:]))
"""


def wait_ready(url: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError):
            status = json.loads(urllib.request.urlopen(url, timeout=1).read())
            if status["model"]["version"] and all(
                source["connected"] for source in status["sources"].values()
            ):
                return
        time.sleep(0.1)
    raise TimeoutError(f"agent not ready at {url}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=1000, help="requests per phase")
    parser.add_argument("--max-phase-s", type=float, default=30.0, help="time bound per phase")
    parser.add_argument("--rate", type=int, default=5000, help="telemetry messages per second")
    parser.add_argument(
        "--agent-nodelay", action="store_true", help="TCP_NODELAY on the agent's MQTT socket"
    )
    parser.add_argument(
        "--agent-switch-interval-ms", type=float, default=None, help="sys.setswitchinterval"
    )
    parser.add_argument(
        "--buffer-synchronous",
        default="full",
        choices=["full", "normal"],
        help="the agent's [buffer] synchronous (full: fsync per commit, the default)",
    )
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    parser.add_argument(
        "--clients",
        default="auto",
        help="comma-separated [mqtt] client values (paho,awscrt); CLIENT@DIR runs the agent's "
        "code from DIR (another checkout), for before/after in one run",
    )
    add_png_argument(parser)
    args = parser.parse_args()
    clients = [name.strip() for name in args.clients.split(",") if name.strip()]
    with tempfile.TemporaryDirectory(prefix="bench-suggest-") as tmp, mosquitto(Path(tmp)) as port:
        floor = run_floor(port, args)
        agents = {client: run_agent(port, Path(tmp), args, client) for client in clients}
    agent = agents[clients[0]]
    results = {
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
        },
        "floor": floor,
        "agent": agent,  # the first of --clients
        "agents": agents,
        "idle_p99_ratio_by_client": {
            client: round(run["idle"]["p99_ms"] / floor["idle"]["p99_ms"], 2)
            if run["idle"].get("p99_ms") and floor["idle"].get("p99_ms")
            else None
            for client, run in agents.items()
        },
        "loaded_p99_ms_by_client": {
            client: run["loaded"].get("p99_ms") for client, run in agents.items()
        },
        "targets": {
            "idle_p99_within_2x_floor": agent["idle"].get("p99_ms", float("inf"))
            <= 2 * floor["idle"].get("p99_ms", 0.0),
            "idle_p99_ratio": round(agent["idle"]["p99_ms"] / floor["idle"]["p99_ms"], 2)
            if agent["idle"].get("p99_ms") and floor["idle"].get("p99_ms")
            else None,
            "loaded_p99_under_5ms": agent["loaded"].get("p99_ms", float("inf")) < 5.0,
        },
    }
    text = json.dumps(results, indent=2)
    print(text)
    if args.json is not None:
        args.json.write_text(text + "\n")
    if args.png is not None:
        figures = Figures("Event to suggestion latency", "milliseconds", log_scale=True)
        for who, phases in (("floor", floor), ("agent", agent)):
            for phase in ("idle", "loaded"):
                for stat in ("p50_ms", "p99_ms"):
                    label = f"{who} {phase} {stat.removesuffix('_ms')}"
                    figures.add(label, phases[phase].get(stat))
        figures.write_png(args.png)


if __name__ == "__main__":
    main()
