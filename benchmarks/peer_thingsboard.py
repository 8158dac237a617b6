"""Benchmark: device → central store, the agent against ThingsBoard IoT Gateway, one run.

The same 10 publishers (``mosquitto_pub -l -q 1``, one per device, --events in all) publish
customer events to a private "store" mosquitto; each contender carries them to its central
side, and the rate counts from the publishers' start until the last event arrived there:

- ThingsBoard IoT Gateway (PyPI ``thingsboard-gateway``, installed by this benchmark into its
  own venv under ~/.cache/edge-agent-bench): its MQTT connector subscribes with QoS 1, its
  SQLite event storage buffers, and its ThingsBoard client publishes ``v1/gateway/telemetry``
  to a second private mosquitto standing in for ThingsBoard (a counter subscribes there).
  Statistics, remote configuration, remote shell and rate limits are off; all on loopback.
- the agent: ``edge-agent run`` (QoS 1, fsync'd buffer, uploader) into ``customer-store
  serve`` on SQLite; done when the store holds every event.
- the ceiling: a bare paho subscriber on the store broker that only counts.

    .venv/bin/python -m benchmarks.peer_thingsboard [--events 20000] [--repeats 1]

Target (issue 11): the agent ≥ 4x ThingsBoard. The gateway's SQLite storage is known to lose
events under load (thingsboard-gateway issue 899): the benchmark prints how many of them
arrived, and the gateway's rate counts only those. Every wait is bounded by time.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from benchmarks.ingest import RUN_TIMEOUT_S, run_bare_paho_many, status_of
from benchmarks.local_broker import free_port, mosquitto, stop_process, wait_for_port

TB_VERSION = "3.8.5"
CACHE = Path.home() / ".cache" / "edge-agent-bench"
PUBLISHERS = 10
STORE = "store-peer"
BROKER_CONFIG = "max_inflight_messages 100\nset_tcp_nodelay true\n"
QUIET_S = 20.0  # nothing new at the far side for this long: the run is over


def gateway_python() -> Path:
    """The gateway's own venv (created once; pip is the ordinary client)."""
    venv = CACHE / f"tb-gateway-{TB_VERSION}"
    python = venv / "bin" / "python"
    if not python.exists():
        CACHE.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
        subprocess.run(
            [str(python), "-m", "pip", "install", "-q", f"thingsboard-gateway=={TB_VERSION}"],
            check=True,
            timeout=900,
        )
    return python


def write_device_payloads(workdir: Path, total: int) -> list[tuple[str, Path]]:
    """One payload file per device: (device id, file)."""
    run = uuid.uuid4().hex[:8]
    files = []
    for device in range(PUBLISHERS):
        path = workdir / f"device-{device}.txt"
        with path.open("w") as out:
            for n in range(device, total, PUBLISHERS):
                event = {
                    "event_id": f"{run}-{n:08d}",
                    "type": "product.pickup",
                    "customer_id": f"c-{n % 2000:06d}",
                    "data": {"sku": f"SKU-{1 + n % 2000:06d}"},
                }
                out.write(json.dumps(event) + "\n")
        files.append((f"shelf-{device:02d}", path))
    return files


def start_publishers(port: int, files: list[tuple[str, Path]]) -> list[subprocess.Popen[bytes]]:
    publishers = []
    for device, path in files:
        topic = f"edge/{STORE}/devices/{device}/events"
        with path.open("rb") as stdin:
            publishers.append(
                subprocess.Popen(
                    ["mosquitto_pub", "-p", str(port), "-t", topic, "-q", "1", "-l"], stdin=stdin
                )
            )
    return publishers


# ---- ThingsBoard IoT Gateway ---------------------------------------------------------------


def gateway_config(workdir: Path, device_port: int, tb_port: int, python: Path) -> Path:
    package = subprocess.run(
        [
            str(python),
            "-c",
            "import thingsboard_gateway, os; print(os.path.dirname(thingsboard_gateway.__file__))",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    config = workdir / f"tb-config-{uuid.uuid4().hex[:6]}"  # one per repeat
    shutil.copytree(Path(package) / "config", config)
    main = {
        "thingsboard": {
            "host": "127.0.0.1",
            "port": tb_port,
            "remoteShell": False,
            "remoteConfiguration": False,
            "latencyDebugMode": False,
            "statistics": {"enable": False, "statsSendPeriodInSeconds": 3600},
            "deviceFiltering": {"enable": False},
            "maxPayloadSizeBytes": 8196,
            "minPackSendDelayMS": 50,
            "minPackSizeToSend": 500,
            "checkConnectorsConfigurationInSeconds": 3600,
            "handleDeviceRenaming": False,
            "security": {"type": "accessToken", "accessToken": "bench"},
            "qos": 1,
            "reportStrategy": {"type": "ON_RECEIVED"},
            "checkingDeviceActivity": {"checkDeviceInactivity": False},
            "rateLimits": "0:0,",
            "dpRateLimits": "0:0,",
            "messagesRateLimits": "0:0,",
            "deviceMessagesRateLimits": "0:0,",
            "deviceRateLimits": "0:0,",
            "deviceDpRateLimits": "0:0,",
        },
        "storage": {
            "type": "sqlite",
            "data_file_path": f"{config}-storage/",
            "messages_ttl_check_in_hours": 1,
            "messages_ttl_in_days": 7,
            "max_read_records_count": 1000,
        },
        "grpc": {"enabled": False},
        "connectors": [{"type": "mqtt", "name": "store devices", "configuration": "mqtt.json"}],
    }
    (config / "tb_gateway.json").write_text(json.dumps(main, indent=2))
    mapping = {
        "topicFilter": f"edge/{STORE}/devices/+/events",
        "subscriptionQos": 1,
        "converter": {
            "type": "json",
            "deviceInfo": {
                "deviceNameExpressionSource": "topic",
                "deviceNameExpression": "(?<=devices/)(.*?)(?=/events)",
                "deviceProfileExpressionSource": "constant",
                "deviceProfileExpression": "shelf",
            },
            "sendDataOnlyOnChange": False,
            "timeout": 60000,
            "attributes": [],
            "timeseries": [
                {"type": "string", "key": "event_id", "value": "${event_id}"},
                {"type": "string", "key": "type", "value": "${type}"},
                {"type": "string", "key": "customer_id", "value": "${customer_id}"},
                {"type": "string", "key": "sku", "value": "${data.sku}"},
            ],
        },
    }
    connector = {
        "broker": {
            "host": "127.0.0.1",
            "port": device_port,
            "clientId": f"tb-gateway-{uuid.uuid4().hex[:8]}",
            "version": 5,
            "maxMessageNumberPerWorker": 10,
            "maxNumberOfWorkers": 100,
            "cleanSession": True,
            "cleanStart": True,
            "sessionExpiryInterval": 0,
            "security": {"type": "anonymous"},
        },
        "mapping": [mapping],
        "requestsMapping": {},
    }
    (config / "mqtt.json").write_text(json.dumps(connector, indent=2))
    return config


# What ThingsBoard answers to the gateway's getSessionLimits call (the gateway sends nothing
# until it has an answer); "0:0," is "no limit" in its rate-limit syntax.
SESSION_LIMITS = {
    "maxPayloadSize": 65536,
    "maxInflightMessages": 100,
    "rateLimits": {"messages": "0:0,", "telemetryMessages": "0:0,", "telemetryDataPoints": "0:0,"},
    "gatewayRateLimits": {
        "messages": "0:0,",
        "telemetryMessages": "0:0,",
        "telemetryDataPoints": "0:0,",
    },
}


class TelemetryCounter:
    """The stand-in ThingsBoard: answers session limits, counts the benchmark's events."""

    def __init__(self, port: int) -> None:
        self.seen: set[str] = set()
        self.entries = 0  # telemetry entries carrying an event id, repeats included
        self.last = 0.0
        self._lock = threading.Lock()
        self._client = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"tb-{uuid.uuid4().hex}")
        self._client.on_message = self._on_message
        self._client.on_connect = lambda c, *_: c.subscribe(
            [("v1/gateway/telemetry", 1), ("v1/devices/me/rpc/request/+", 1)]
        )
        self._client.connect("127.0.0.1", port)
        self._client.loop_start()

    def _on_message(self, client: paho.Client, _u: Any, message: paho.MQTTMessage) -> None:
        if message.topic.startswith("v1/devices/me/rpc/request/"):
            request_id = message.topic.rsplit("/", 1)[1]
            reply = json.dumps(SESSION_LIMITS)
            client.publish(f"v1/devices/me/rpc/response/{request_id}", reply, qos=1)
            return
        try:
            document = json.loads(message.payload)
        except ValueError:
            return
        with self._lock:
            for entries in document.values():
                for entry in entries if isinstance(entries, list) else [entries]:
                    event_id = entry.get("values", {}).get("event_id")
                    if isinstance(event_id, str):
                        self.seen.add(event_id)
                        self.entries += 1
            self.last = time.monotonic()

    def count(self, prefix: str) -> int:
        with self._lock:
            return sum(1 for event_id in self.seen if event_id.startswith(prefix))

    def close(self) -> None:
        self._client.loop_stop()
        self._client.disconnect()


def run_thingsboard(
    workdir: Path, device_port: int, tb_port: int, files: list[tuple[str, Path]], total: int
) -> tuple[float, int]:
    """(events/s of what arrived, how many distinct events arrived within the time bound)."""
    python = gateway_python()
    config = gateway_config(workdir, device_port, tb_port, python)
    counter = TelemetryCounter(tb_port)
    gateway_dir = workdir / "tb-run"
    gateway_dir.mkdir(exist_ok=True)
    env = {**os.environ, "TB_GW_CONFIG_DIR": str(config)}
    log = (gateway_dir / "gateway.log").open("wb")
    gateway = subprocess.Popen(
        [str(python), "-c", "from thingsboard_gateway.tb_gateway import main; main()"],
        cwd=gateway_dir,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        _warm_up(device_port, lambda: counter.count("warm-") > 0, "the gateway")
        prefix = files[0][1].read_text().split('"event_id": "', 1)[1].split("-", 1)[0]
        started = time.monotonic()
        publishers = start_publishers(device_port, files)
        deadline = started + RUN_TIMEOUT_S
        quiet_since, seen = time.monotonic(), 0
        while seen < total and time.monotonic() < deadline:
            time.sleep(0.05)
            now_seen = counter.count(prefix)
            if now_seen != seen:
                seen, quiet_since = now_seen, time.monotonic()
            elif seen and time.monotonic() - quiet_since > QUIET_S:
                break  # nothing more arrives: the rest was lost on the way
        for publisher in publishers:
            publisher.wait(30)
        arrived = counter.count(prefix)
        return arrived / max(counter.last - started, 1e-9), arrived
    finally:
        stop_process(gateway)
        log.close()
        counter.close()


def _warm_up(device_port: int, arrived: Any, who: str) -> None:
    """Publish probes until one comes out the other side: the contender is running."""
    probe = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"probe-{uuid.uuid4().hex}")
    probe.connect("127.0.0.1", device_port)
    probe.loop_start()
    try:
        deadline = time.monotonic() + 90
        n = 0
        while not arrived():
            if time.monotonic() > deadline:
                raise TimeoutError(f"{who} did not carry a probe within 90 s")
            event = {
                "event_id": f"warm-{n}",
                "type": "product.pickup",
                "customer_id": "c-warm",
                "data": {"sku": "SKU-000001"},
            }
            probe.publish(f"edge/{STORE}/devices/shelf-warm/events", json.dumps(event), qos=1)
            n += 1
            time.sleep(0.5)
        time.sleep(1.0)  # let the probes drain
    finally:
        probe.loop_stop()
        probe.disconnect()


# ---- the agent and the central store -------------------------------------------------------


def store_count(db: Path, prefix: str) -> int:
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5) as connection:
            row = connection.execute(
                "SELECT count(*) FROM events WHERE event_id LIKE ?", (prefix + "%",)
            ).fetchone()
            return int(row[0])
    except sqlite3.OperationalError:
        return 0


def run_agent_to_store(
    workdir: Path, device_port: int, files: list[tuple[str, Path]], total: int, client: str = "auto"
) -> float:
    store_db = workdir / f"store-{uuid.uuid4().hex[:6]}.db"
    db_url = f"sqlite:///{store_db}"
    cli = [sys.executable, "-m", "cloud_sync.store.cli"]
    token = (
        subprocess.run(
            [*cli, "token", "create", "--db", db_url, "--store", STORE],
            capture_output=True,
            text=True,
            check=True,
            timeout=60,
        )
        .stdout.strip()
        .splitlines()[-1]
    )
    store_port, http_port = free_port(), free_port()
    store = subprocess.Popen(
        [*cli, "serve", "--db", db_url, "--port", str(store_port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    data = workdir / f"agent-{uuid.uuid4().hex[:6]}"
    data.mkdir()
    config = data / "agent.toml"
    config.write_text(
        f'[agent]\nstore_id = "{STORE}"\ndata_dir = "{data}"\n'
        f'[mqtt]\nport = {device_port}\nclient_id = "peer-{uuid.uuid4().hex[:8]}"\n'
        f'client = "{client}"\n'
        f"[http]\nport = {http_port}\n"
        "[governance]\nrequire_consent = false\n"
        f'[sync]\nurl = "http://127.0.0.1:{store_port}"\ntoken = "{token}"\ninterval_s = 0.2\n'
    )
    env = {**os.environ, "EDGE_AGENT_LOG_LEVEL": "WARNING"}
    agent = subprocess.Popen(
        [sys.executable, "-m", "edge_agent.cli", "run", "--config", str(config)], env=env
    )
    try:
        wait_for_port(store_port, 30)
        wait_for_port(http_port, 30)
        _warm_up(device_port, lambda: store_count(store_db, "warm-") > 0, "the agent")
        prefix = files[0][1].read_text().split('"event_id": "', 1)[1].split("-", 1)[0]
        started = time.monotonic()
        publishers = start_publishers(device_port, files)
        deadline = started + RUN_TIMEOUT_S
        arrived = 0
        while arrived < total and time.monotonic() < deadline:
            time.sleep(0.02)
            arrived = store_count(store_db, prefix)
        finished = time.monotonic()
        for publisher in publishers:
            publisher.wait(30)
        if arrived < total:
            raise RuntimeError(f"agent → store delivered {arrived}/{total}: {status_of(http_port)}")
        return total / (finished - started)
    finally:
        stop_process(agent)
        stop_process(store)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--events", type=int, default=20_000)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument(
        "--clients", default="auto", help="comma-separated [mqtt] client values (paho,awscrt)"
    )
    args = parser.parse_args()
    clients = [name.strip() for name in args.clients.split(",") if name.strip()]
    agents = {client: "agent" if client == "auto" else f"agent [{client}]" for client in clients}
    rates: dict[str, list[float]] = {"bare paho": [], "ThingsBoard gateway": []}
    rates.update({name: [] for name in agents.values()})
    delivered: list[int] = []
    with tempfile.TemporaryDirectory(prefix="bench-peer-") as tmp:
        workdir = Path(tmp)
        (workdir / "a").mkdir()
        (workdir / "b").mkdir()
        with (
            mosquitto(workdir / "a", BROKER_CONFIG) as device_port,
            mosquitto(workdir / "b", BROKER_CONFIG) as tb_port,
        ):
            for _ in range(args.repeats):
                files = write_device_payloads(workdir, args.events)
                rates["bare paho"].append(
                    run_bare_paho_many(
                        device_port,
                        f"edge/{STORE}/devices/+/events",
                        functools.partial(start_publishers, device_port, files),
                        args.events,
                    )
                )
                files = write_device_payloads(workdir, args.events)
                rate, arrived = run_thingsboard(workdir, device_port, tb_port, files, args.events)
                rates["ThingsBoard gateway"].append(rate)
                delivered.append(arrived)
                for client, name in agents.items():
                    files = write_device_payloads(workdir, args.events)
                    rate = run_agent_to_store(workdir, device_port, files, args.events, client)
                    rates[name].append(rate)
    medians = {name: statistics.median(values) for name, values in rates.items() if values}
    print(
        f"{PUBLISHERS} publishers, {args.events} events, runs: {args.repeats} (medians), "
        f"load average {os.getloadavg()[0]:.2f}"
    )
    for name, rate in medians.items():
        print(f"{name:<40}{rate:>10,.0f} msg/s   samples {[round(r) for r in rates[name]]}")
    print(
        f"ThingsBoard gateway delivered {delivered} of {args.events} events per run "
        "(its rate counts only what arrived)"
    )
    ratios = {name: medians[name] / medians["ThingsBoard gateway"] for name in agents.values()}
    for name, ratio in ratios.items():
        print(f"{name} / ThingsBoard gateway: {ratio:.2f} (target ≥ 4)")
        print(f"{name} / bare paho ceiling:   {medians[name] / medians['bare paho']:.2f}")
    ratio = ratios[agents[clients[0]]]
    if args.json:
        document = {
            "rates": rates,
            "medians": medians,
            "ratio": ratio,
            "ratios": ratios,
            "delivered": delivered,
        }
        args.json.write_text(json.dumps(document))
    return 0


if __name__ == "__main__":
    sys.exit(main())
