"""Memory benchmark: where the agent's PSS goes, phase by phase and import by import.

Sections (issue 11; target: peak PSS ≤ 80 MB summed over the agent's processes, model loaded,
after 100k events from 2,000 customers):

1. imports: one fresh interpreter per step, each importing one more of what ``edge-agent run``
   loads (python, numpy, the numpy runtime, aiohttp, ..., onnxruntime last): RSS, PSS and
   anonymous memory added;
2. per-customer state: the personalizer's sessions and feedback book filled in-process and
   weighed with tracemalloc, for 2,000 / 10,000 / 50,000 customers (bounded by their caps);
3. the agent (``edge-agent run``, its own process, the bundled model, fsync'd buffer, private
   mosquitto) with the environment of ``deploy/edge-agent.service`` (``--plain``: without):
   PSS summed over its processes when imported, ready with the model loaded, then the peak
   during and the figure after 20k and 100k trigger events (``product.pickup``, QoS 1) from
   --customers customers; once per model runtime (``--runtime both``, the default: the
   numpy runtime, then onnxruntime, back to back on the same broker; ``--clients
   paho,awscrt``: once per MQTT client too), with its largest anonymous mappings (heaps,
   arenas, stacks) and its threads by name;
4. a process-split prototype: a collect-only agent (``[model] enabled = false``: no
   onnxruntime, no numpy) plus an inference process (model, sessions of --customers
   customers, paho): their PSS summed while both run.

    .venv/bin/python -m benchmarks.memory [--events 100000] [--customers 2000] [--json out.json]
        [--runtime numpy] [--clients paho,awscrt,awscrt@DIR] [--skip imports,state,split]

Not a test: figures depend on the machine. Everything is bounded by count and time.
"""

from __future__ import annotations

import argparse
import ast
import functools
import gc
import json
import os
import re
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
import tracemalloc
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from benchmarks.ingest import (
    agent_variant,
    process_tree,
    pss_mb,
    publish,
    status_of,
    write_payloads,
)
from benchmarks.local_broker import free_port, mosquitto, wait_for_port

UNIT = Path(__file__).resolve().parents[1] / "deploy" / "edge-agent.service"
RUN_TIMEOUT_S = 300.0
STORE = "bench-store"

# What ``edge-agent run`` loads, in the order the agent's wiring reaches it; onnxruntime
# last: the agent loads it only on [model] runtime = "onnxruntime" (or auto's fallback).
IMPORTS = (
    "numpy",
    "models.numpy_runtime",
    "aiohttp",
    "aiohttp.web",
    "prometheus_client",
    "paho.mqtt.client",
    "sqlite_utils",
    "cryptography.hazmat.primitives.asymmetric.ed25519",
    "edge_agent.buffer",
    "edge_agent.status",
    "cloud_sync.uploader",
    "edge_agent.app",
    "edge_agent.personalize",
    "onnxruntime",
)

_PROBE = r"""
import importlib, sys
def figures():
    out = {}
    for line in open("/proc/self/smaps_rollup"):
        key, _, value = line.partition(":")
        if key in ("Rss", "Pss", "Anonymous"):
            out[key] = int(value.split()[0]) / 1024
    return out
for name in sys.argv[1:]:
    importlib.import_module(name)
print(repr(figures()))
print(repr(sorted(m for m in ("numpy", "onnxruntime", "sqlite_utils", "cryptography", "aiohttp")
                  if m in sys.modules)))
"""


def probe(modules: list[str]) -> tuple[dict[str, float], list[str]]:
    out = subprocess.run(
        [sys.executable, "-c", _PROBE, *modules],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    ).stdout.splitlines()
    figures: dict[str, float] = ast.literal_eval(out[0])
    loaded: list[str] = ast.literal_eval(out[1])
    return figures, loaded


def import_section() -> list[dict[str, Any]]:
    rows = []
    previous, _ = probe([])
    rows.append({"step": "python", **{k: round(v, 1) for k, v in previous.items()}})
    for n, name in enumerate(IMPORTS, start=1):
        now, _ = probe(list(IMPORTS[:n]))
        alone, _ = probe([name])
        python, _ = probe([])
        rows.append(
            {
                "step": f"+ {name}",
                "Rss": round(now["Rss"], 1),
                "Pss": round(now["Pss"], 1),
                "added_rss": round(now["Rss"] - previous["Rss"], 1),
                "added_anon": round(now["Anonymous"] - previous["Anonymous"], 1),
                "alone_rss": round(alone["Rss"] - python["Rss"], 1),
            }
        )
        previous = now
    return rows


# ---- per-customer state ---------------------------------------------------------------


def state_section(customer_counts: tuple[int, ...], events: int) -> list[dict[str, Any]]:
    """The personalizer's per-customer state, weighed with tracemalloc after ``events``."""
    from edge_agent.personalize.feedback import FeedbackBook, Shown
    from edge_agent.personalize.personalizer import SESSION_HISTORY
    from edge_agent.personalize.session import SessionStore

    skus = [f"SKU-{n:06d}" for n in range(1, 2001)]
    rows = []
    for customers in customer_counts:
        tracemalloc.start()
        gc.collect()
        before = tracemalloc.get_traced_memory()[0]
        sessions = SessionStore(10_000, SESSION_HISTORY, 86_400)
        feedback = FeedbackBook(300)
        start = time.time()
        for n in range(max(events, customers)):
            # Each event's strings are its own, as json.loads makes them.
            document = json.loads(
                f'{{"c": "c-{n % customers:06d}", "t": "product.pickup", '
                f'"s": "SKU-{1 + n % 2000:06d}"}}'
            )
            sessions.observe(document["c"], document["t"], document["s"], start + n)
            chosen = tuple(skus[(n + i) % len(skus)] for i in range(5))  # the model's own
            feedback.record_shown(
                Shown(str(uuid.uuid4()), document["c"], chosen, "v1", time.monotonic())
            )
        gc.collect()
        total = tracemalloc.get_traced_memory()[0] - before
        tracemalloc.stop()
        del sessions, feedback
        tracemalloc.start()
        gc.collect()
        base = tracemalloc.get_traced_memory()[0]
        sessions = SessionStore(10_000, SESSION_HISTORY, 86_400)
        for n in range(max(events, customers)):
            document = json.loads(
                f'{{"c": "c-{n % customers:06d}", "t": "product.pickup", '
                f'"s": "SKU-{1 + n % 2000:06d}"}}'
            )
            sessions.observe(document["c"], document["t"], document["s"], start + n)
        gc.collect()
        session_bytes = tracemalloc.get_traced_memory()[0] - base
        tracemalloc.stop()
        rows.append(
            {
                "customers": customers,
                "events": max(events, customers),
                "sessions": len(sessions),
                "sessions_evicted": sessions.evicted,
                "sessions_mb": round(session_bytes / 2**20, 1),
                "bytes_per_session": round(session_bytes / max(len(sessions), 1)),
                "feedback_mb": round((total - session_bytes) / 2**20, 1),
                "total_mb": round(total / 2**20, 1),
            }
        )
        del sessions
    return rows


# ---- the agent ------------------------------------------------------------------------


def unit_environment() -> dict[str, str]:
    """``Environment=`` of deploy/edge-agent.service, except the data directory."""
    env = {}
    for line in UNIT.read_text().splitlines():
        match = re.fullmatch(r"Environment=(\w+)=(.*)", line.strip())
        if match and not match.group(1).startswith("EDGE_AGENT__"):
            env[match.group(1)] = match.group(2)
    return env


@contextmanager
def agent_process(
    port: int,
    workdir: Path,
    env_extra: dict[str, str],
    model: bool,
    runtime: str = "auto",
    client: str = "auto",
) -> Iterator[tuple[subprocess.Popen[bytes], int]]:
    http_port = free_port()
    client, variant_env, code = agent_variant(client)
    config = workdir / "agent.toml"
    config.write_text(
        f'[agent]\nstore_id = "{STORE}"\ndata_dir = "{workdir}"\n'
        f'[mqtt]\nport = {port}\nqos = 1\nclient_id = "mem-{uuid.uuid4().hex[:8]}"\n'
        f'client = "{client}"\n'
        f"[http]\nport = {http_port}\n"
        "[governance]\nrequire_consent = false\n"
        f'[model]\nenabled = {"true" if model else "false"}\nruntime = "{runtime}"\n'
    )
    env = {**variant_env, **env_extra}
    agent = subprocess.Popen(
        [sys.executable, "-m", "edge_agent.cli", "run", "--config", str(config)],
        env=env,
        cwd=code,
    )
    try:
        wait_for_port(http_port, 60)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                status = status_of(http_port)
                ready = all(s["connected"] for s in status["sources"].values())
                if ready and (not model or status.get("model", {}).get("version")):
                    break
            except OSError:
                pass
            time.sleep(0.1)
        time.sleep(1.0)  # settled: start-up garbage collected, threads parked
        yield agent, http_port
    finally:
        agent.terminate()
        agent.wait(30)


def rss_mb(pids: list[int]) -> float:
    """Summed RSS: what a store box pays when nothing else maps the same files."""
    total = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                if line.startswith("Rss:"):
                    total += int(line.split()[1])
        except OSError:
            continue
    return total / 1024


def anonymous_detail(pid: int, top: int = 8) -> list[tuple[int, float, str]]:
    """The largest anonymous mappings by PSS: (size kB, PSS MB, what it likely is). glibc's
    per-thread arenas are 64 MB reservations (HEAP_MAX_SIZE) of which only the touched part
    counts; thread stacks are 8 MB (the default ulimit -s) with a guard page."""
    rows: list[tuple[int, float, str]] = []
    size, path = 0, ""
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        head = line.split()
        if head and not head[0].endswith(":") and "-" in head[0]:
            start, end = (int(x, 16) for x in head[0].split("-"))
            size, path = (end - start) // 1024, head[5] if len(head) > 5 else ""
        elif head and head[0] == "Pss:" and (not path or path == "[heap]"):
            pss = int(head[1]) / 1024
            kind = (
                "brk heap (main arena)"
                if path == "[heap]"
                else "thread stack"
                if size == 8192
                else "thread arena"
                if size <= 65536 and 65536 % max(size, 1) == 0 and size >= 132
                else "mmap"
            )
            rows.append((size, round(pss, 2), kind))
    rows.sort(key=lambda row: -row[1])
    return rows[:top]


def mappings(pid: int) -> dict[str, float]:
    """PSS (MB) of a process by kind of mapping: heap, other anonymous memory (thread
    arenas, mmap'd allocations, stacks), and each shared library or file."""
    out: dict[str, float] = {}
    name = "anonymous"
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        head = line.split()
        if head and not head[0].endswith(":") and "-" in head[0]:
            path = head[5] if len(head) > 5 else ""
            name = (
                "heap"
                if path == "[heap]"
                else "anonymous"
                if not path or path.startswith("[")
                else Path(path).name
            )
        elif head and head[0] == "Pss:":
            out[name] = out.get(name, 0.0) + int(head[1]) / 1024
    return dict(
        sorted(((k, round(v, 1)) for k, v in out.items() if v >= 0.5), key=lambda kv: -kv[1])
    )


CHUNK = 10_000  # published at once; the next after these are committed (see below)


def feed(
    port: int, workdir: Path, agent_pid: int, count: int, customers: int, already: int
) -> tuple[float, float]:
    """Publish ``count`` triggers; return (peak PSS while they flow, PSS once committed).

    In chunks of CHUNK, each after the previous one is committed: with 80,000 or more
    published at once by one ``mosquitto_pub -l`` the run stopped at about 34,000. That is
    the publisher, not the agent: checked with both MQTT clients, the broker's ``$SYS``
    counters said it had received about 43,000 PUBLISH packets of the 100,000 when
    ``mosquitto_pub`` exited 0, and had sent the agent exactly what the agent had received
    and committed, with nothing left in flight.
    """
    peak, done = 0.0, already
    deadline = time.monotonic() + RUN_TIMEOUT_S
    for first in range(0, count, CHUNK):
        size = min(CHUNK, count - first)
        payloads = workdir / f"feed-{already + first}.txt"
        write_payloads(payloads, size, STORE, "product.pickup", customers)
        _, publisher = publish(port, f"edge/{STORE}/devices/bench-01/events", payloads, 1)
        target = already + first + size
        while done < target and time.monotonic() < deadline:
            time.sleep(0.25)
            peak = max(peak, pss_mb(process_tree(agent_pid)))
            done = triggers_committed(workdir / "buffer.db")
            if os.environ.get("BENCH_VERBOSE"):
                print(f"  committed {done}", file=sys.stderr, flush=True)
        publisher.wait(30)
        if done < target:
            raise RuntimeError(f"only {done - already} of {count} committed")
    time.sleep(2.0)  # suggestions answered or shed, records committed
    settled = pss_mb(process_tree(agent_pid))
    FEED_RSS.append(rss_mb(process_tree(agent_pid)))
    return max(peak, settled), settled


FEED_RSS: list[float] = []  # RSS once each feed is committed, beside the PSS figures


def triggers_committed(db: Path) -> int:
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5) as connection:
            row = connection.execute(
                "SELECT count(*) FROM events WHERE type = 'product.pickup'"
            ).fetchone()
        connection.close()
        return int(row[0])
    except sqlite3.OperationalError:
        return 0


def agent_section(
    port: int,
    events: int,
    customers: int,
    env_extra: dict[str, str],
    runtime: str,
    client: str = "auto",
) -> dict[str, Any]:
    workdir = Path(tempfile.mkdtemp(prefix="bench-memory-"))
    FEED_RSS.clear()
    try:
        imported, heavy = probe(["edge_agent.app", "edge_agent.personalize", "models.serving"])
        result: dict[str, Any] = {
            "env": env_extra,
            "imported_pss": round(imported["Pss"], 1),
            "imported_packages": heavy,
        }
        with agent_process(port, workdir, env_extra, True, runtime, client) as (
            agent,
            http_port,
        ):
            result["client"] = client
            result["runtime"] = status_of(http_port).get("model", {}).get("runtime")
            result["load_average_start"] = os.getloadavg()
            result["ready_pss"] = round(pss_mb(process_tree(agent.pid)), 1)
            result["ready_rss"] = round(rss_mb(process_tree(agent.pid)), 1)
            first = min(20_000, events)
            peak, settled = feed(port, workdir, agent.pid, first, customers, 0)
            result["after_20k"] = {"peak_pss": round(peak, 1), "pss": round(settled, 1)}
            peak2, settled2 = feed(port, workdir, agent.pid, events - first, customers, first)
            result[f"after_{events // 1000}k"] = {
                "peak_pss": round(max(peak, peak2), 1),
                "pss": round(settled2, 1),
            }
            result["rss_after_feeds"] = [round(value, 1) for value in FEED_RSS]
            result["mappings"] = mappings(agent.pid)
            result["anonymous_top"] = anonymous_detail(agent.pid)
            result["threads"] = thread_names(agent.pid)
            suggestions = status_of(http_port).get("suggestions", {})
            result["sessions"] = suggestions.get("sessions")
            result["shown"] = suggestions.get("shown")
            result["dropped"] = suggestions.get("dropped")
            result["load_average_end"] = os.getloadavg()
        return result
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def thread_names(pid: int) -> dict[str, int]:
    """The agent's threads by name (comm): how many each part of it runs."""
    names: dict[str, int] = {}
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            name = Path(f"/proc/{pid}/task/{task}/comm").read_text().strip()
        except OSError:
            continue
        names[name] = names.get(name, 0) + 1
    return dict(sorted(names.items()))


# ---- the process-split prototype ------------------------------------------------------

_INFERENCE_SIDE = r"""
import json, sys, time, random
import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion
from models import DEFAULT_MODEL_DIR
from models.serving import SuggestionModel
from edge_agent.personalize.personalizer import SESSION_HISTORY
from edge_agent.personalize.session import SessionStore
customers, requests, port = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
model = SuggestionModel.load(DEFAULT_MODEL_DIR)
client = paho.Client(CallbackAPIVersion.VERSION2)
client.connect("127.0.0.1", port)
client.loop_start()
sessions = SessionStore(10_000, SESSION_HISTORY, 86_400)
now = time.time()
for n in range(max(customers * 50, requests)):
    sku = model.items[n % len(model.items)]
    sessions.observe(f"c-{n % customers:06d}", "product.pickup", sku, now)
for n in range(requests):
    customer = f"c-{n % customers:06d}"
    answer = model.suggest(sessions.history(customer, now), (12, "store-001", "shelf-01"), now=now)
    client.publish("bench/split", json.dumps([list(x) for x in answer]).encode(), qos=0)
print("ready", flush=True)
sys.stdin.readline()
client.loop_stop()
"""


def split_section(port: int, events: int, customers: int, env_extra: dict[str, str]) -> Any:
    workdir = Path(tempfile.mkdtemp(prefix="bench-memory-split-"))
    try:
        with agent_process(port, workdir, env_extra, model=False) as (agent, _):
            ingest_ready = pss_mb(process_tree(agent.pid))
            inference = subprocess.Popen(
                [sys.executable, "-c", _INFERENCE_SIDE, str(customers), "2000", str(port)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
                env={**os.environ, **env_extra},
            )
            try:
                assert inference.stdout is not None
                assert inference.stdin is not None
                if inference.stdout.readline().strip() != "ready":
                    raise RuntimeError("the inference side did not start")
                peak, settled = feed(port, workdir, agent.pid, events, customers, 0)
                inference_pss = pss_mb([inference.pid])
                both = pss_mb([*process_tree(agent.pid), inference.pid])
                inference.stdin.write("stop\n")
                inference.stdin.flush()
                inference.wait(30)
            finally:
                if inference.poll() is None:
                    inference.kill()
                    inference.wait(10)
        return {
            "ingest_ready_pss": round(ingest_ready, 1),
            "ingest_peak_pss": round(peak, 1),
            "ingest_pss": round(settled, 1),
            "inference_pss": round(inference_pss, 1),
            "sum_pss": round(both, 1),
        }
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _print_table(title: str, rows: list[dict[str, Any]]) -> None:
    print(f"\n{title}")
    keys = list(rows[0])
    for row in rows:
        keys += [key for key in row if key not in keys]
    print(" | ".join(keys))
    for row in rows:
        print(" | ".join(str(row.get(key, "")) for key in keys))


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--customers", type=int, default=2000)
    parser.add_argument("--plain", action="store_true", help="without the unit's Environment=")
    parser.add_argument(
        "--env", action="append", default=[], help="KEY=VALUE for the agent (repeatable)"
    )
    parser.add_argument(
        "--skip", default="", help="comma-separated sections to skip: imports,state,agent,split"
    )
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument(
        "--runtime",
        choices=("both", "numpy", "onnxruntime", "auto"),
        default="both",
        help="[model] runtime of the agent section; both: numpy, then onnxruntime",
    )
    parser.add_argument(
        "--clients",
        default="auto",
        help="comma-separated [mqtt] client values of the agent section (paho,awscrt): each "
        "runs the agent once per runtime, back to back on the same broker; CLIENT@DIR runs "
        "the agent's code from DIR (another checkout), for before/after in one run",
    )
    args = parser.parse_args()
    clients = tuple(filter(None, args.clients.split(",")))
    runtimes = ("numpy", "onnxruntime") if args.runtime == "both" else (args.runtime,)
    skip = set(filter(None, args.skip.split(",")))
    env_extra = {} if args.plain else unit_environment()
    env_extra.update(item.split("=", 1) for item in args.env)
    result: dict[str, Any] = {"load_average": os.getloadavg(), "env": env_extra}
    sections: list[tuple[str, Callable[[], Any]]] = []
    if "imports" not in skip:
        sections.append(("imports", import_section))
    if "state" not in skip:
        sections.append(("state", lambda: state_section((2000, 10_000, 50_000), args.events)))
    workdir = Path(tempfile.mkdtemp(prefix="bench-memory-broker-"))
    try:
        with mosquitto(workdir, "max_inflight_messages 100\nset_tcp_nodelay true\n") as port:
            if "agent" not in skip:
                sections += [
                    (
                        f"agent_{runtime}" if client == "auto" else f"agent_{client}_{runtime}",
                        functools.partial(
                            agent_section,
                            port,
                            args.events,
                            args.customers,
                            env_extra,
                            runtime,
                            client,
                        ),
                    )
                    for client in clients
                    for runtime in runtimes
                ]
            if "split" not in skip:
                sections.append(
                    ("split", lambda: split_section(port, args.events, args.customers, env_extra))
                )
            for name, run in sections:
                result[name] = run()
                figures = result[name]
                if isinstance(figures, list):
                    _print_table(name, figures)
                else:
                    print(f"\n{name}: {json.dumps(figures)}", flush=True)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
