"""Ingest benchmark: the agent's publish-to-commit rate against bare MQTT receivers.

In one run, on one private mosquitto (``max_inflight_messages 100``, unlimited queues), with
the same payloads and the same publisher (``mosquitto_pub -l``, a C client reading one
message per line), medians of --repeats interleaved runs:

  * baselines: a bare paho client that only counts (QoS 0 and QoS 1, PUBACK on receipt), and
    ``mosquitto_sub -q 1`` (the C client);
  * the agent (``edge-agent run``, its own process, the bundled model loaded, fsync'd
    buffer): QoS 1 ``product.putback`` events (buffered, no suggestion), acknowledged after
    the commit; QoS 0 the same; trigger-heavy QoS 1 (every event a ``product.pickup`` of an
    identified customer: each one answered with a suggestion or counted as shed);
  * a QoS 0 burst of --burst messages: how many the agent dropped (/status ``drops``) and
    committed;
  * CPU per event (user+sys µs of the receiving process) beside bare paho's, and the agent's
    peak PSS (sampled from /proc/PID/smaps_rollup, summed over the agent's processes);
  * a memory run: --memory-events events from 2,000 customers, peak PSS with the model loaded.

Targets (issue 11): QoS 1 ≥ 1.0x bare paho QoS 1; QoS 0 ≥ 1.0x bare paho QoS 0 and 0 dropped;
trigger-heavy ≥ 0.75x bare paho; peak PSS ≤ 80 MB after 100k events from 2,000 customers.

    .venv/bin/python -m benchmarks.ingest [--messages 20000] [--repeats 3] [--json out.json]
        [--clients paho,awscrt]   # the agent on each MQTT client, side by side in one run
        [--clients awscrt,awscrt@DIR]  # and the agent's code of another checkout (before/after)
        [--memory-events 0]       # skip the memory run
        [--in-process]            # only the agent's decode and row encoding, in this process
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
import urllib.request
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks.figures import Figures, add_png_argument
from benchmarks.local_broker import free_port, mosquitto, wait_for_port

RUN_TIMEOUT_S = 180.0
CUSTOMERS = 2000


def write_payloads(
    path: Path, count: int, store_id: str, kind: str = "product.putback", customers: int = 5000
) -> None:
    run = uuid.uuid4().hex[:8]
    with path.open("w") as out:
        for n in range(count):
            out.write(
                json.dumps(
                    {
                        "event_id": f"{run}-{n:08d}",
                        "type": kind,
                        "customer_id": f"c-{n % customers:06d}",
                        "data": {"sku": f"SKU-{1 + n % 2000:06d}", "weight_g": 100 + n % 800},
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
def on_connect(client, userdata, flags, reason, properties):
    client.subscribe(topic, qos)
client = paho.Client(CallbackAPIVersion.VERSION2)
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
deadline = time.monotonic() + float(sys.argv[5])
while state["n"] < count and time.monotonic() < deadline:
    time.sleep(0.01)
cpu = time.process_time() - cpu0
client.loop_stop()
print(state["n"], repr(state["last"]), repr(cpu), flush=True)
"""


def run_bare_paho(port: int, payloads: Path, count: int, qos: int) -> tuple[float, float]:
    """(messages/s, CPU µs per message) of a paho client that only counts."""
    topic = f"bench/{uuid.uuid4().hex[:8]}"
    return _count_with_paho(port, topic, qos, count, lambda: [publish(port, topic, payloads, qos)])


def run_bare_paho_many(
    port: int, topic: str, start: Callable[[], list[subprocess.Popen[bytes]]], count: int
) -> float:
    """messages/s of a paho client (QoS 1) counting what several publishers send."""
    started = time.monotonic()

    def timed() -> list[tuple[float, subprocess.Popen[bytes]]]:
        nonlocal started
        started = time.monotonic()
        return [(started, process) for process in start()]

    rate, _ = _count_with_paho(port, topic, 1, count, timed)
    return rate


def _count_with_paho(
    port: int,
    topic: str,
    qos: int,
    count: int,
    start: Callable[[], list[tuple[float, subprocess.Popen[bytes]]]],
) -> tuple[float, float]:
    argv = [sys.executable, "-c", _COUNTER, str(port), topic, str(qos), str(count)]
    counter = subprocess.Popen([*argv, str(RUN_TIMEOUT_S)], stdout=subprocess.PIPE, text=True)
    assert counter.stdout is not None
    assert counter.stdout.readline().strip() == "ready"
    publishers = start()
    received, last, cpu = counter.stdout.readline().split()
    counter.wait(10)
    for _, publisher in publishers:
        publisher.wait(30)
    if int(received) < count:
        raise RuntimeError(f"bare paho received {received}/{count}")
    started = publishers[0][0]
    return count / (float(last) - started), float(cpu) * 1e6 / count


def run_mosquitto_sub(port: int, payloads: Path, count: int) -> float:
    topic = f"bench/{uuid.uuid4().hex[:8]}"
    argv = ["mosquitto_sub", "-p", str(port), "-t", topic, "-q", "1", "-C", str(count)]
    sub = subprocess.Popen([*argv, "-W", str(int(RUN_TIMEOUT_S))], stdout=subprocess.DEVNULL)
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


def process_tree(pid: int) -> list[int]:
    """The process and its descendants (the agent may run helper processes)."""
    pids, frontier = [pid], [pid]
    while frontier:
        parent = frontier.pop()
        children = Path(f"/proc/{parent}/task/{parent}/children")
        try:
            found = [int(p) for p in children.read_text().split()]
        except OSError:
            found = []
        pids += found
        frontier += found
    return pids


def pss_mb(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total += int(line.split()[1])
        except OSError:
            continue
    return total / 1024


def cpu_s(pids: list[int]) -> float:
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / ticks


def status_of(http_port: int) -> dict[str, Any]:
    with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/status", timeout=5) as answer:
        result: dict[str, Any] = json.loads(answer.read())
    return result


def agent_variant(spec: str) -> tuple[str, dict[str, str], str | None]:
    """``CLIENT`` or ``CLIENT@DIR``: the ``[mqtt] client`` value, and the environment and
    working directory of the agent's process, which imports the agent from DIR (``git
    archive`` of another commit) when given, so a change is measured against its base in the
    same run. The directory too: ``python -m`` puts it first on sys.path, before PYTHONPATH."""
    client, _, code = spec.partition("@")
    env = {**os.environ, "EDGE_AGENT_LOG_LEVEL": "WARNING"}
    if code:
        env["PYTHONPATH"] = code
    return client or "auto", env, code or None


def run_agent(
    port: int,
    payloads: Path,
    count: int,
    qos: int,
    store_id: str,
    no_model: bool,
    client: str = "auto",
) -> dict[str, Any]:
    """One agent process fed one payload file: rate, CPU per event, peak PSS, /status."""
    client, env, code = agent_variant(client)
    workdir = Path(tempfile.mkdtemp(prefix="bench-agent-"))
    http_port = free_port()
    config = workdir / "agent.toml"
    config.write_text(
        f'[agent]\nstore_id = "{store_id}"\ndata_dir = "{workdir}"\n'
        f'[mqtt]\nport = {port}\nqos = {qos}\nclient_id = "bench-{uuid.uuid4().hex[:8]}"\n'
        f'client = "{client}"\n'
        f"[http]\nport = {http_port}\n"
        "[governance]\nrequire_consent = false\n"
        f"[model]\nenabled = {'false' if no_model else 'true'}\n"
    )
    agent = subprocess.Popen(
        [sys.executable, "-m", "edge_agent.cli", "run", "--config", str(config)],
        env=env,
        cwd=code,
    )
    try:
        wait_for_port(http_port, 30)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:  # ready: the MQTT source is connected
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/readyz", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                time.sleep(0.05)
        time.sleep(0.3)
        pids = process_tree(agent.pid)
        cpu_before = cpu_s(pids)
        peak_pss = pss_mb(pids)
        topic = f"edge/{store_id}/devices/bench-01/events"
        started, publisher = publish(port, topic, payloads, qos)
        db = workdir / "buffer.db"
        deadline = time.monotonic() + RUN_TIMEOUT_S
        done, last_check = 0, 0.0
        while done < count and time.monotonic() < deadline:
            time.sleep(0.01)
            done = committed(db)
            if time.monotonic() - last_check > 0.25:
                last_check = time.monotonic()
                peak_pss = max(peak_pss, pss_mb(pids))
                if qos == 0 and publisher.poll() is not None:
                    dropped = status_of(http_port)["drops"]["total"]
                    if done + dropped >= count:
                        break  # what is not committed was dropped: stop waiting for it
        finished = time.monotonic()
        cpu_used = cpu_s(pids) - cpu_before
        publisher.wait(30)
        time.sleep(0.5)  # suggestions still in flight are answered or shed
        peak_pss = max(peak_pss, pss_mb(pids))
        status = status_of(http_port)
        return {
            "rate": done / (finished - started),
            "committed": done,
            "cpu_us": cpu_used * 1e6 / max(done, 1),
            "pss_mb": peak_pss,
            "drops": status["drops"]["by_reason"],
            "suggestions": status.get("suggestions", {}),
        }
    finally:
        agent.terminate()
        agent.wait(30)
        shutil.rmtree(workdir, ignore_errors=True)


def in_process(count: int, repeats: int) -> None:
    """µs per message of the agent's own decode (JSON, checks, Event) and of the writer's row
    encoding, in this process: the part of the CPU per event this repository's code spends
    before SQLite. Another checkout, the same way: ``cd DIR && PYTHONPATH=THIS python -m
    benchmarks.ingest --in-process`` (its edge_agent first on sys.path)."""
    from datetime import UTC, datetime

    from cloud_sync.envelope_schema import default_registry
    from edge_agent.buffer.writes import event_row
    from edge_agent.config import InputSection
    from edge_agent.decode import decode_message, make_context, parse_topic

    store_id = "bench-store"
    context = make_context(store_id, default_registry(), InputSection(), b"k" * 32)
    with tempfile.TemporaryDirectory() as tmp:
        events = Path(tmp) / "events.txt"
        write_payloads(events, count, store_id)
        customer = events.read_bytes().splitlines()
    telemetry = [
        json.dumps({"ts": "2026-11-27T10:00:00.000Z", "values": {"temp_c": 4.1 + n % 7}}).encode()
        for n in range(count)
    ]
    channels = (("customer events", customer, "events"), ("telemetry", telemetry, "telemetry"))
    print(f"in-process, {count} messages, median of {repeats}, load {os.getloadavg()[0]:.2f}")
    for label, payloads, channel in channels:
        topic = f"edge/{store_id}/devices/bench-01/{channel}"
        parts = parse_topic(topic, "edge", store_id)
        assert parts is not None
        decode_us, row_us = [], []
        for _ in range(repeats):
            now = datetime.now(UTC)
            started = time.perf_counter()
            items = [
                item
                for payload in payloads
                for item in decode_message(context, parts, f"mqtt:{topic}", payload, now)
            ]
            decoded = time.perf_counter()
            for item in items:
                event_row(item, 1.0)  # type: ignore[arg-type]  # all valid: Events
            decode_us.append((decoded - started) * 1e6 / count)
            row_us.append((time.perf_counter() - decoded) * 1e6 / count)
        print(
            f"  {label:<16} decode {statistics.median(decode_us):6.2f} µs/msg, "
            f"row {statistics.median(row_us):6.2f} µs/msg"
        )


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--messages", type=int, default=20_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--burst", type=int, default=50_000, help="QoS 0 burst size")
    parser.add_argument("--memory-events", type=int, default=100_000)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument(
        "--clients",
        default="auto",
        help="comma-separated [mqtt] client values to run the agent on (e.g. paho,awscrt); "
        "CLIENT@DIR runs the agent's code from DIR (another checkout) on that client",
    )
    add_png_argument(parser)
    parser.add_argument(
        "--no-model", action="store_true", help="a collect-only agent ([model] enabled = false)"
    )
    parser.add_argument(
        "--in-process", action="store_true", help="only decode and row encoding, in this process"
    )
    args = parser.parse_args()
    if args.in_process:
        in_process(args.messages, max(args.repeats, 5))
        return 0
    workdir = Path(tempfile.mkdtemp(prefix="bench-ingest-"))
    broker = "max_inflight_messages 100\nset_tcp_nodelay true\n"
    try:
        with mosquitto(workdir, broker) as port:
            return _run_all(args, workdir, port)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


_MODES = ("qos1", "qos0", "trigger_qos1")


def _suffix(client: str, form: str = ":{}") -> str:
    """How a client is named in keys and labels; nothing for "auto" (the default run)."""
    return "" if client == "auto" else form.format(client)


def _median(runs: list[dict[str, Any]], key: str) -> float:
    return float(statistics.median(run[key] for run in runs))


def _run_all(args: argparse.Namespace, workdir: Path, port: int) -> int:
    store_id = "bench-store"
    count = args.messages
    putbacks, triggers = workdir / "putbacks.txt", workdir / "triggers.txt"
    write_payloads(putbacks, count, store_id)
    write_payloads(triggers, count, store_id, "product.pickup", CUSTOMERS)
    bare: dict[str, list[tuple[float, float]]] = {"qos0": [], "qos1": []}
    sub_q1: list[float] = []
    clients = [name.strip() for name in args.clients.split(",") if name.strip()]
    agent: dict[str, list[dict[str, Any]]] = {
        f"{mode}{_suffix(client)}": [] for client in clients for mode in _MODES
    }
    for _ in range(args.repeats):  # interleaved, so drift in machine load hits all alike
        bare["qos1"].append(run_bare_paho(port, putbacks, count, 1))
        for client in clients:
            run = run_agent(port, putbacks, count, 1, store_id, args.no_model, client)
            agent["qos1" + _suffix(client)].append(run)
        sub_q1.append(run_mosquitto_sub(port, putbacks, count))
        bare["qos0"].append(run_bare_paho(port, putbacks, count, 0))
        for client in clients:
            run = run_agent(port, putbacks, count, 0, store_id, args.no_model, client)
            agent["qos0" + _suffix(client)].append(run)
        for client in clients:
            run = run_agent(port, triggers, count, 1, store_id, False, client)
            agent["trigger_qos1" + _suffix(client)].append(run)
    burst = workdir / "burst.txt"
    write_payloads(burst, args.burst, store_id)
    burst_runs = {
        client: run_agent(port, burst, args.burst, 0, store_id, args.no_model, client)
        for client in clients
    }
    memory_run: dict[str, Any] = {}
    if args.memory_events:
        memory = workdir / "memory.txt"
        write_payloads(memory, args.memory_events, store_id, "product.pickup", CUSTOMERS)
        memory_run = run_agent(port, memory, args.memory_events, 1, store_id, False, clients[0])

    paho_q1 = statistics.median(rate for rate, _ in bare["qos1"])
    paho_q0 = statistics.median(rate for rate, _ in bare["qos0"])
    paho_q1_cpu = statistics.median(cpu for _, cpu in bare["qos1"])
    paho_q0_cpu = statistics.median(cpu for _, cpu in bare["qos0"])
    mosq = statistics.median(sub_q1)
    rows: list[tuple[str, float, float | None, float | None]] = [
        ("QoS 1 bare paho (PUBACK on receipt)", paho_q1, paho_q1_cpu, None),
        ("QoS 1 mosquitto_sub -q 1", mosq, None, None),
        ("QoS 0 bare paho", paho_q0, paho_q0_cpu, None),
    ]
    labels = {
        "qos1": ("QoS 1 agent, PUBACK after commit", paho_q1),
        "qos0": ("QoS 0 agent, committed", paho_q0),
        "trigger_qos1": ("QoS 1 agent, every event a trigger", paho_q1),
    }
    for mode, (label, base) in labels.items():
        for client in clients:
            runs = agent[mode + _suffix(client)]
            name = f"{label}{_suffix(client, ' [{}]')}"
            rows.append((name, _median(runs, "rate"), _median(runs, "cpu_us"), base))
    print(
        f"messages per run: {count}, runs: {args.repeats} (medians), "
        f"load average {os.getloadavg()[0]:.2f}"
    )
    print(f"{'measurement':<50}{'msg/s':>10}{'cpu µs/msg':>12}{'ratio':>8}")
    for label, rate, cpu, baseline in rows:
        cpu_text = f"{cpu:>12.1f}" if cpu is not None else f"{'':>12}"
        ratio = f"{rate / baseline:>8.2f}" if baseline else f"{'':>8}"
        print(f"{label:<50}{rate:>10,.0f}{cpu_text}{ratio}")
    for mode, (label, _) in labels.items():  # per-repeat ratios: the noise of a shared box
        bases = [rate for rate, _ in bare["qos0" if mode == "qos0" else "qos1"]]
        for client in clients:
            runs = agent[mode + _suffix(client)]
            ratios = [run["rate"] / base for run, base in zip(runs, bases, strict=True)]
            name = f"{label}{_suffix(client, ' [{}]')}"
            print(f"  {name}: ratio per repeat {min(ratios):.2f}-{max(ratios):.2f}")
    for client in clients:
        agent_q1 = _median(agent["qos1" + _suffix(client)], "rate")
        print(f"QoS 1 agent{_suffix(client, ' [{}]')} / mosquitto_sub -q 1: {agent_q1 / mosq:.2f}")
        last = agent["trigger_qos1" + _suffix(client)][-1]["suggestions"]
        shed = sum(last.get("dropped", {}).values())
        print(
            f"trigger-heavy{_suffix(client, ' [{}]')}, last run: {count} triggers, "
            f"{last.get('shown', 0)} answered, {shed} shed ({last.get('dropped', {})})"
        )
        burst_run = burst_runs[client]
        print(
            f"QoS 0 burst of {args.burst}{_suffix(client, ' [{}]')}: committed "
            f"{burst_run['committed']}, dropped by the agent {burst_run['drops'] or 0}, "
            f"{burst_run['rate']:,.0f} msg/s"
        )
    pss_runs = [run["pss_mb"] for runs in agent.values() for run in runs]
    print(f"peak PSS, {count}-event runs: {max(pss_runs):.1f} MB")
    if memory_run:
        print(
            f"peak PSS after {args.memory_events} events from {CUSTOMERS} customers, model "
            f"loaded: {memory_run['pss_mb']:.1f} MB (target ≤ 80)"
        )
    result: dict[str, Any] = {
        "messages": count,
        "repeats": args.repeats,
        "bare_paho": bare,
        "mosquitto_sub_qos1": sub_q1,
        "agent": agent,
        "clients": clients,
        "burst": burst_runs,
        "memory": memory_run,
        "load_average": os.getloadavg(),
    }
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    if args.png:
        figures = Figures("Ingest: agent vs bare MQTT receivers (medians)", "messages/s")
        for label, rate, _, _ in rows:
            figures.add(label, rate)
        figures.write_png(args.png)
    return 0


if __name__ == "__main__":
    sys.exit(main())
