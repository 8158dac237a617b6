"""Benchmark: the MQTT client candidates as bare subscribers, in one run, on one broker.

Each candidate runs in its own process, subscribes, and counts --messages customer events
published by one ``mosquitto_pub -l`` (a C client); the rate counts from the publisher's start
to the last message received, and the CPU figure is the subscriber's own user+sys time per
message. Candidates:

- ``mosquitto_sub -q 1``: the C client, the ceiling of any Python design;
- paho-mqtt 2.x (pure Python parsing on its network thread): automatic PUBACK, and deferred
  (``manual_ack=True``; a second thread acknowledges every 2 ms what arrived before, as a
  commit would);
- gmqtt (pure Python on asyncio): PUBACK when ``on_message`` returns, and deferred (an async
  ``on_message`` that awaits a "commit" resolved every 2 ms);
- awscrt (AWS Common Runtime, C parser, MQTT 5): automatic PUBACK, and deferred
  (``acquire_publish_acknowledgement_control()`` in the callback, a second thread calling
  ``invoke_publish_acknowledgement`` every 2 ms).

QoS 0 runs too (paho, gmqtt, awscrt). Each figure is the median of --repeats interleaved runs.
The subscribers' MQTT 5 Receive Maximum and mosquitto's max_inflight_messages are both 100.

    .venv/bin/python -m benchmarks.mqtt_clients [--messages 20000] [--repeats 3] [--json F]

awscrt and gmqtt are benchmark-only dependencies (``pip install -e .[bench]``); a candidate
that is not installed is reported as missing. Bounded: every wait has a deadline.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from benchmarks.figures import Figures, add_png_argument
from benchmarks.ingest import write_payloads
from benchmarks.local_broker import mosquitto

RUN_TIMEOUT_S = 120.0
ACK_PERIOD_S = 0.002  # the deferred variants acknowledge in batches, as a commit would

# Each child: argv = port topic qos count timeout mode; prints "ready", then
# "<received> <monotonic of the last> <cpu seconds>".
_PAHO = r"""
import collections, sys, threading, time
import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion
port, topic, mode = int(sys.argv[1]), sys.argv[2], sys.argv[6]
qos, count, timeout = int(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5])
deferred = mode == "deferred"
state = {"n": 0, "last": 0.0}
pending = collections.deque()
def on_message(client, userdata, message):
    if deferred and message.qos:
        pending.append(message.mid)
    state["n"] += 1
    if state["n"] == count:
        state["last"] = time.monotonic()
def on_connect(client, userdata, flags, reason, properties):
    client.subscribe(topic, qos)
client = paho.Client(CallbackAPIVersion.VERSION2, manual_ack=deferred)
client.max_inflight_messages_set(100)
client.on_message = on_message
client.on_connect = on_connect
client.connect("127.0.0.1", port)
client.loop_start()
deadline = time.monotonic() + 5
while not client.is_connected() and time.monotonic() < deadline:
    time.sleep(0.01)
time.sleep(0.3)
cpu0 = time.process_time()
print("ready", flush=True)
deadline = time.monotonic() + timeout
while state["n"] < count and time.monotonic() < deadline:
    time.sleep(0.002)
    while pending:
        client.ack(pending.popleft(), 1)
cpu = time.process_time() - cpu0
client.loop_stop()
print(state["n"], repr(state["last"]), repr(cpu), flush=True)
"""

_GMQTT = r"""
import asyncio, sys, time
import gmqtt
port, topic, mode = int(sys.argv[1]), sys.argv[2], sys.argv[6]
qos, count, timeout = int(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5])
deferred = mode == "deferred"
async def main():
    state = {"n": 0, "last": 0.0}
    done = asyncio.Event()
    loop = asyncio.get_running_loop()
    commit = {"f": loop.create_future()}
    def count_one():
        state["n"] += 1
        if state["n"] == count:
            state["last"] = time.monotonic()
            done.set()
    if deferred:
        async def on_message(client, topic, payload, qos, properties):
            count_one()
            if qos:
                await commit["f"]
            return 0
    else:
        def on_message(client, topic, payload, qos, properties):
            count_one()
            return 0
    client = gmqtt.Client(f"g-{time.monotonic_ns()}", receive_maximum=100)
    client.on_message = on_message
    await client.connect("127.0.0.1", port)
    client.subscribe(topic, qos=qos)
    await asyncio.sleep(0.3)
    cpu0 = time.process_time()
    print("ready", flush=True)
    deadline = time.monotonic() + timeout
    while not done.is_set() and time.monotonic() < deadline:
        await asyncio.sleep(0.002)
        commit["f"].set_result(None)
        commit["f"] = loop.create_future()
    commit["f"].set_result(None)
    cpu = time.process_time() - cpu0
    await client.disconnect()
    print(state["n"], repr(state["last"]), repr(cpu), flush=True)
asyncio.run(main())
"""

_AWSCRT = r"""
import collections, sys, threading, time
from awscrt import mqtt5
port, topic, mode = int(sys.argv[1]), sys.argv[2], sys.argv[6]
qos, count, timeout = int(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5])
deferred = mode == "deferred"
state = {"n": 0, "last": 0.0}
pending = collections.deque()
connected = threading.Event()
def on_publish(data):
    if deferred and data.acquire_publish_acknowledgement_control is not None:
        pending.append(data.acquire_publish_acknowledgement_control())
    state["n"] += 1
    if state["n"] == count:
        state["last"] = time.monotonic()
options = mqtt5.ClientOptions(
    host_name="127.0.0.1", port=port,
    connect_options=mqtt5.ConnectPacket(client_id=f"a-{time.monotonic_ns()}", receive_maximum=100),
    on_publish_callback_fn=on_publish,
    on_lifecycle_event_connection_success_fn=lambda data: connected.set(),
)
client = mqtt5.Client(options)
client.start()
connected.wait(5)
level = mqtt5.QoS.AT_LEAST_ONCE if qos else mqtt5.QoS.AT_MOST_ONCE
subscription = mqtt5.Subscription(topic_filter=topic, qos=level)
client.subscribe(mqtt5.SubscribePacket(subscriptions=[subscription])).result(5)
time.sleep(0.3)
cpu0 = time.process_time()
print("ready", flush=True)
deadline = time.monotonic() + timeout
while state["n"] < count and time.monotonic() < deadline:
    time.sleep(0.002)
    while pending:
        client.invoke_publish_acknowledgement(pending.popleft())
cpu = time.process_time() - cpu0
client.stop()
print(state["n"], repr(state["last"]), repr(cpu), flush=True)
"""

CLIENTS = {"paho": _PAHO, "gmqtt": _GMQTT, "awscrt": _AWSCRT}


def available(name: str) -> bool:
    probe = subprocess.run(
        [sys.executable, "-c", f"import {name.replace('paho', 'paho.mqtt')}"],
        capture_output=True,
        check=False,
    )
    return probe.returncode == 0


def publish(port: int, topic: str, payloads: Path, qos: int) -> tuple[float, Any]:
    started = time.monotonic()
    with payloads.open("rb") as stdin:
        process = subprocess.Popen(
            ["mosquitto_pub", "-p", str(port), "-t", topic, "-q", str(qos), "-l"], stdin=stdin
        )
    return started, process


def run_python_client(
    name: str, port: int, payloads: Path, count: int, qos: int, mode: str
) -> tuple[float, float]:
    """(messages/s, CPU µs per message) of one candidate."""
    topic = f"bench/{uuid.uuid4().hex[:8]}"
    argv = [sys.executable, "-c", CLIENTS[name], str(port), topic, str(qos), str(count)]
    child = subprocess.Popen([*argv, str(RUN_TIMEOUT_S), mode], stdout=subprocess.PIPE, text=True)
    assert child.stdout is not None
    try:
        if child.stdout.readline().strip() != "ready":
            raise RuntimeError(f"{name} did not subscribe")
        started, publisher = publish(port, topic, payloads, qos)
        received, last, cpu = child.stdout.readline().split()
        child.wait(15)
        publisher.wait(30)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait(5)
    if int(received) < count:
        raise RuntimeError(f"{name} {mode} qos{qos} received {received}/{count}")
    return count / (float(last) - started), float(cpu) * 1e6 / count


def run_mosquitto_sub(port: int, payloads: Path, count: int) -> tuple[float, float]:
    topic = f"bench/{uuid.uuid4().hex[:8]}"
    argv = ["mosquitto_sub", "-p", str(port), "-t", topic, "-q", "1", "-C", str(count)]
    sub = subprocess.Popen([*argv, "-W", str(int(RUN_TIMEOUT_S))], stdout=subprocess.DEVNULL)
    time.sleep(0.5)  # subscribed
    started, publisher = publish(port, topic, payloads, 1)
    _, status, usage = os.wait4(sub.pid, 0)
    finished = time.monotonic()
    sub.returncode = os.waitstatus_to_exitcode(status)
    publisher.wait(30)
    if sub.returncode != 0:
        raise RuntimeError(f"mosquitto_sub exited {sub.returncode}")
    return count / (finished - started), (usage.ru_utime + usage.ru_stime) * 1e6 / count


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--messages", type=int, default=20_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path, default=None)
    add_png_argument(parser)
    args = parser.parse_args()
    names = [name for name in CLIENTS if available(name)]
    missing = sorted(set(CLIENTS) - set(names))
    runs: list[tuple[str, int, str]] = [("mosquitto_sub", 1, "auto")]
    for name in names:
        runs += [(name, 1, "auto"), (name, 1, "deferred"), (name, 0, "auto")]
    rates: dict[str, list[float]] = {}
    cpus: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-clients-") as tmp:
        workdir = Path(tmp)
        payloads = workdir / "payloads.txt"
        write_payloads(payloads, args.messages, "bench-store")
        with mosquitto(workdir, "max_inflight_messages 100\n") as port:
            for _ in range(args.repeats):  # interleaved: drift in machine load hits all alike
                for name, qos, mode in runs:
                    label = f"{name} qos{qos} {mode}"
                    if name == "mosquitto_sub":
                        rate, cpu = run_mosquitto_sub(port, payloads, args.messages)
                    else:
                        rate, cpu = run_python_client(
                            name, port, payloads, args.messages, qos, mode
                        )
                    rates.setdefault(label, []).append(rate)
                    cpus.setdefault(label, []).append(cpu)
    paho_qos1 = statistics.median(rates["paho qos1 auto"]) if "paho" in names else None
    print(
        f"messages per run: {args.messages}, runs: {args.repeats} (medians), "
        f"load average {os.getloadavg()[0]:.2f}"
    )
    if missing:
        print(f"not installed: {', '.join(missing)} (pip install -e .[bench])")
    print(
        f"{'candidate':<30}{'msg/s':>10}{'min':>10}{'max':>10}{'cpu µs/msg':>12}{'x paho q1':>11}"
    )
    result: dict[str, Any] = {"messages": args.messages, "repeats": args.repeats, "clients": {}}
    for label, samples in rates.items():
        median = statistics.median(samples)
        cpu = statistics.median(cpus[label])
        ratio = median / paho_qos1 if paho_qos1 else float("nan")
        print(
            f"{label:<30}{median:>10,.0f}{min(samples):>10,.0f}{max(samples):>10,.0f}"
            f"{cpu:>12.1f}{ratio:>11.2f}"
        )
        result["clients"][label] = {"median": median, "samples": samples, "cpu_us": cpu}
    result["load_average"] = os.getloadavg()
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    if args.png:
        figures = Figures("MQTT clients as bare subscribers (medians)", "messages/s")
        for label, entry in result["clients"].items():
            figures.add(label, entry["median"])
        figures.write_png(args.png)
    return 0


if __name__ == "__main__":
    sys.exit(main())
