"""The suggestion path end to end over a real broker: trigger in, suggestion out, recorded."""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from edge_agent import cli
from edge_agent.app import RunningAgent
from edge_agent.events import Event
from edge_agent.personalize import Personalizer
from models import DEFAULT_MODEL_DIR
from tests.conftest import agent_config_dict
from tests.firmware_bridge.bridge_helpers import SimLauncher
from tests.support.agent import Publisher, agent_running, event_topic, http_get, wait_until
from tests.support.broker import AmqttBroker, MosquittoBroker

Broker = MosquittoBroker | AmqttBroker
VOCABULARY = {f"SKU-{n:06d}" for n in range(1, 2001)}
FAST = {"watch_interval_s": 0.1, "popularity_refresh_s": 0.1, "top_k": 3, "epsilon": 0.0}


class Suggestions:
    """A second client subscribed to the store's suggestion topics."""

    def __init__(self, broker: Broker, store_id: str) -> None:
        self.messages: list[tuple[str, dict[str, Any]]] = []
        self._lock = threading.Lock()
        subscribed = threading.Event()
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"sub-{store_id}")
        self.client.on_message = self._on_message
        self.client.on_subscribe = lambda *_: subscribed.set()
        self.client.connect(broker.host, broker.port, 30)
        self.client.subscribe(f"edge/{store_id}/suggestions/#", qos=1)
        self.client.loop_start()
        if not subscribed.wait(10):
            raise TimeoutError("no SUBACK")

    def _on_message(self, _client: Any, _userdata: Any, message: paho.MQTTMessage) -> None:
        with self._lock:
            self.messages.append((message.topic, json.loads(message.payload)))

    def by_trigger(self) -> dict[str, dict[str, Any]]:
        with self._lock:
            return {payload["trigger_event_id"]: payload for _, payload in self.messages}

    async def wait_for(self, trigger_id: str, within_s: float = 10.0) -> dict[str, Any]:
        await wait_until(lambda: trigger_id in self.by_trigger(), within_s)
        return self.by_trigger()[trigger_id]

    def ids_for(self, device_id: str) -> set[str]:
        with self._lock:
            return {
                payload["suggestion_id"]
                for topic, payload in self.messages
                if topic.endswith(f"/{device_id}")
            }

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


@contextlib.contextmanager
def clients(broker: Broker, store_id: str) -> Iterator[tuple[Publisher, Suggestions]]:
    publisher = Publisher(broker.host, broker.port)
    subscriber = Suggestions(broker, store_id)
    try:
        yield publisher, subscriber
    finally:
        subscriber.close()
        publisher.close()


def event(event_id: str, kind: str, customer: str, **data: Any) -> bytes:
    return json.dumps(
        {"event_id": event_id, "type": kind, "customer_id": customer, "data": data}
    ).encode()


def consent(event_id: str, customer: str, allowed: bool) -> bytes:
    flags = {"personalization": allowed, "profile_sharing": False, "partner_sharing": False}
    return event(event_id, "consent.update", customer, **flags)


def personalizer(agent: RunningAgent) -> Personalizer:
    return next(part for part in agent.components if isinstance(part, Personalizer))


def buffered(db: Path, kind: str) -> list[dict[str, Any]]:
    with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as connection:
        rows = connection.execute("SELECT envelope FROM events WHERE type = ?", (kind,))
        return [json.loads(row[0]) for row in rows]


def model_copy(tmp_path: Path, name: str, version: str | None = None) -> Path:
    target = tmp_path / name
    shutil.copytree(DEFAULT_MODEL_DIR, target, ignore=shutil.ignore_patterns("__*"))
    if version is not None:  # the sha256 covers model.onnx only: a renamed copy still verifies
        manifest = json.loads((target / "manifest.json").read_text())
        manifest["version"] = version
        (target / "manifest.json").write_text(json.dumps(manifest))
    return target


async def status_of(agent: RunningAgent) -> dict[str, Any]:
    body = (await asyncio.to_thread(http_get, f"http://127.0.0.1:{agent.status.port}/status"))[1]
    result: dict[str, Any] = json.loads(body)
    return result


async def test_a_pickup_gets_a_model_suggestion_without_picked_or_out_of_stock_items(
    tmp_path: Path, store_id: str, mqtt_broker: Broker
) -> None:
    document = agent_config_dict(tmp_path, store_id, mqtt_broker, model=FAST)
    topic = event_topic(store_id, "shelf-07")
    with clients(mqtt_broker, store_id) as (publisher, suggestions):
        async with agent_running(document) as agent:
            publisher.publish(topic, consent("c1-consent", "c-1", True))
            publisher.publish(topic, event("p1", "product.pickup", "c-1", sku="SKU-000010"))
            first = await suggestions.wait_for("p1")
            skus = [item["sku"] for item in first["items"]]
            assert first["source"] == "model"
            assert first["model_version"] == "sim-8bf6d734370d"
            assert first["customer_id"] == "c-1"
            assert len(skus) == 3
            assert set(skus) <= VOCABULARY
            assert "SKU-000010" not in skus
            # Those items go out of stock: the next identical request must avoid them.
            (tmp_path / "data" / "out_of_stock.txt").write_text("\n".join(skus) + "\n")
            await wait_until(lambda: set(skus) <= personalizer(agent).masks.skus, 5)
            publisher.publish(topic, consent("c2-consent", "c-2", True))
            publisher.publish(topic, event("p2", "product.pickup", "c-2", sku="SKU-000010"))
            second = await suggestions.wait_for("p2")
            assert second["source"] == "model"
            assert not {item["sku"] for item in second["items"]} & {*skus, "SKU-000010"}
            await wait_until(
                lambda: len(buffered(tmp_path / "data" / "buffer.db", "suggestion.shown")) == 2, 10
            )
            status = await status_of(agent)
        # A restart rebuilds c-1's session from the buffer.
        async with agent_running(document) as agent:
            await wait_until(lambda: personalizer(agent).ready, 10)
            session = personalizer(agent).sessions.get("c-1")
            assert session is not None
            assert [entry[0] for entry in session.history] == ["SKU-000010"]
    assert [topic for topic, _ in suggestions.messages] == [
        f"edge/{store_id}/suggestions/shelf-07"
    ] * 2
    shown = {
        e["data"]["trigger_event_id"]: e
        for e in buffered(tmp_path / "data" / "buffer.db", "suggestion.shown")
    }
    assert shown["p1"]["data"]["items"] == first["items"]
    assert shown["p1"]["data"]["propensities"] == [1.0, 1.0, 1.0]  # epsilon 0
    assert shown["p1"]["customer_id"] == "c-1"
    assert status["model"]["version"] == "sim-8bf6d734370d"
    assert status["model"]["source"] == "model"
    assert status["suggestions"]["shown"] == 2
    assert status["suggestions"]["latency_ms"]["samples"] == 2


async def test_status_and_live_page_show_a_short_pseudonym_forgotten_on_erasure(
    tmp_path: Path, store_id: str, mqtt_broker: Broker
) -> None:
    document = agent_config_dict(tmp_path, store_id, mqtt_broker, model=FAST)
    topic = event_topic(store_id, "shelf-07")
    with clients(mqtt_broker, store_id) as (publisher, suggestions):
        async with agent_running(document) as agent:
            publisher.publish(topic, consent("s-consent", "c-secret-42", True))
            publisher.publish(topic, event("s1", "product.pickup", "c-secret-42", sku="SKU-000010"))
            publisher.publish(topic, event("s2", "product.pickup", "c-other-7", sku="SKU-000011"))
            await suggestions.wait_for("s1")
            await suggestions.wait_for("s2")
            await wait_until(lambda: len(personalizer(agent).stats.recent) == 2, 5)
            port = agent.status.port
            before = (await asyncio.to_thread(http_get, f"http://127.0.0.1:{port}/status"))[1]
            page = (await asyncio.to_thread(http_get, f"http://127.0.0.1:{port}/"))[1]
            # What the downlink calls once an erasure for this customer is applied.
            personalizer(agent).forget_customer("c-secret-42")
            after = await status_of(agent)
    assert "c-secret-42" not in before.decode()
    assert "c-other-7" not in before.decode()
    assert "c-secret" not in page.decode()
    shown = json.loads(before)["suggestions"]["recent"]
    assert all(entry["customer"].startswith("cu-") for entry in shown)
    assert len({entry["customer"] for entry in shown}) == 2
    remaining = after["suggestions"]["recent"]
    assert len(remaining) == 1  # c-other-7's suggestion stays, c-secret-42's is gone
    assert remaining[0]["customer"] in {entry["customer"] for entry in shown}


async def test_a_corrupt_model_leaves_suggestions_flowing_from_the_fallbacks(
    tmp_path: Path, store_id: str, mqtt_broker: Broker
) -> None:
    corrupt = model_copy(tmp_path, "corrupt")
    with (corrupt / "model.onnx").open("r+b") as handle:
        handle.seek(1000)
        byte = handle.read(1)
        handle.seek(1000)
        handle.write(bytes([byte[0] ^ 0xFF]))
    model = {**FAST, "path": str(corrupt)}
    document = agent_config_dict(
        tmp_path, store_id, mqtt_broker, model=model, governance={"require_consent": False}
    )
    topic = event_topic(store_id)
    with clients(mqtt_broker, store_id) as (publisher, suggestions):
        async with agent_running(document) as agent:
            part = personalizer(agent)
            publisher.publish(topic, event("t0", "product.pickup", "c-1", sku="SKU-000001"))
            early = await suggestions.wait_for("t0")
            assert early["source"] == "bestsellers"  # an empty buffer has no popularity yet
            assert early["model_version"] is None
            picked = ["SKU-000100", "SKU-000101", "SKU-000101", "SKU-000102", "SKU-000103"]
            for n, sku in enumerate(picked):  # this store's day so far, by other customers
                publisher.publish(topic, event(f"s{n}", "basket.add", f"o-{n}", sku=sku))
            await wait_until(lambda: len(part.popularity.ranked) >= 5, 10)
            publisher.publish(topic, event("t1", "product.pickup", "c-1", sku="SKU-000100"))
            later = await suggestions.wait_for("t1")
            status = await status_of(agent)
    assert later["source"] == "store_popularity"
    assert later["items"][0]["sku"] == "SKU-000101"  # taken twice; SKU-000100 is masked
    assert "SKU-000100" not in {item["sku"] for item in later["items"]}
    assert status["model"]["version"] is None
    assert status["model"]["source"] == "store_popularity"
    assert "ModelIntegrityError" in status["model"]["last_error"]


async def test_without_personalization_consent_suggestions_are_store_popularity(
    tmp_path: Path, store_id: str, mqtt_broker: Broker
) -> None:
    document = agent_config_dict(tmp_path, store_id, mqtt_broker, model=FAST)
    topic = event_topic(store_id)
    with clients(mqtt_broker, store_id) as (publisher, suggestions):
        async with agent_running(document) as agent:
            part = personalizer(agent)
            for n in range(8):
                publisher.publish(
                    topic, event(f"s{n}", "product.scan", f"o-{n}", sku=f"SKU-00020{n % 4}")
                )
            await wait_until(lambda: len(part.popularity.ranked) >= 4, 10)
            publisher.publish(topic, consent("no", "c-9", False))
            publisher.publish(topic, event("t-no", "product.pickup", "c-9", sku="SKU-000200"))
            publisher.publish(topic, event("t-unknown", "product.pickup", "c-7", sku="SKU-1"))
            refused = await suggestions.wait_for("t-no")
            unknown = await suggestions.wait_for("t-unknown")
            assert "c-9" not in part.sessions
            assert "c-7" not in part.sessions
    assert refused["source"] == unknown["source"] == "store_popularity"
    assert [item["sku"] for item in refused["items"]] == ["SKU-000201", "SKU-000202", "SKU-000203"]


async def test_implicit_and_explicit_feedback_count_per_model_version(
    tmp_path: Path, store_id: str, mqtt_broker: Broker
) -> None:
    document = agent_config_dict(tmp_path, store_id, mqtt_broker, model=FAST)
    topic = event_topic(store_id)
    with clients(mqtt_broker, store_id) as (publisher, suggestions):
        async with agent_running(document) as agent:
            publisher.publish(topic, consent("yes", "c-1", True))
            publisher.publish(topic, event("t1", "product.pickup", "c-1", sku="SKU-000010"))
            first = await suggestions.wait_for("t1")
            taken = first["items"][1]["sku"]
            publisher.publish(topic, event("t2", "product.pickup", "c-1", sku=taken))
            second = await suggestions.wait_for("t2")
            publisher.publish(
                topic,
                event("d", "suggestion.dismissed", "c-1", suggestion_id=second["suggestion_id"]),
            )
            part = personalizer(agent)
            await wait_until(lambda: part.feedback.totals().dismissed == 1, 10)
            status = await status_of(agent)
            metrics = (
                await asyncio.to_thread(http_get, f"http://127.0.0.1:{agent.status.port}/metrics")
            )[1].decode()
    accepted = buffered(tmp_path / "data" / "buffer.db", "suggestion.accepted")
    assert [e["data"] for e in accepted] == [
        {"suggestion_id": first["suggestion_id"], "sku": taken, "implicit": True}
    ]
    figures = status["suggestions"]
    assert (figures["shown"], figures["accepted"], figures["dismissed"]) == (2, 1, 1)
    assert figures["by_model_version"]["sim-8bf6d734370d"]["acceptance_rate"] == 0.5
    assert 'edge_suggestion_acceptance_rate{model_version="sim-8bf6d734370d"} 0.5' in metrics
    assert "edge_suggestion_latency_seconds_count 2.0" in metrics


async def test_hot_swaps_under_load_drop_no_suggestion_and_rollback_follows_the_cli(
    tmp_path: Path, store_id: str, mqtt_broker: Broker
) -> None:
    document = agent_config_dict(
        tmp_path, store_id, mqtt_broker, model=FAST, governance={"require_consent": False}
    )
    config_path = tmp_path / "agent.toml"
    config_path.write_text(f'[agent]\nstore_id = "{store_id}"\ndata_dir = "{tmp_path / "data"}"\n')
    incoming = tmp_path / "data" / "models" / "incoming"
    staged = model_copy(tmp_path, "v2", version="sim-test-v2")
    corrupt = model_copy(tmp_path, "bad", version="sim-test-bad")
    (corrupt / "model.onnx").write_bytes(b"not a model")
    topic = event_topic(store_id)
    total = 400
    with clients(mqtt_broker, store_id) as (publisher, suggestions):
        async with agent_running(document) as agent:
            part = personalizer(agent)
            deadline = time.monotonic() + 30
            for n in range(total):
                publisher.publish(
                    topic,
                    event(f"t{n}", "product.pickup", f"c-{n % 7}", sku=f"SKU-{1 + n % 50:06d}"),
                )
                if n == 100:  # dropped in: picked up by the watcher while triggers flow
                    staged.rename(incoming / "v2")
                if n == 250:  # offered by the uploader: refused, the old one stays
                    await wait_until(lambda: part.slot.version == "sim-test-v2", 10)
                    offer = await part.offer_model(corrupt)
                    assert not offer.accepted
                    assert part.slot.version == "sim-test-v2"
                await asyncio.sleep(0.005)
                assert time.monotonic() < deadline
            await wait_until(lambda: len(suggestions.by_trigger()) == total, 20)
            assert part.slot.version == "sim-test-v2"
            assert (
                await asyncio.to_thread(
                    cli.main, ["model", "rollback", "--config", str(config_path)]
                )
                == 0
            )
            await wait_until(lambda: part.slot.version == "sim-8bf6d734370d", 10)
            status = await status_of(agent)
    answers = suggestions.by_trigger()
    assert set(answers) == {f"t{n}" for n in range(total)}
    assert {payload["source"] for payload in answers.values()} == {"model"}
    versions = [answers[f"t{n}"]["model_version"] for n in range(total)]
    assert versions[0] == "sim-8bf6d734370d"
    assert versions[-1] == "sim-test-v2"
    # Once switched, never back: the swap is one reference, read once per request.
    switched = versions.index("sim-test-v2")
    assert set(versions[switched:]) == {"sim-test-v2"}
    assert status["model"]["refused"] == 1
    assert status["model"]["previous_version"] == "sim-test-v2"
    assert not (incoming / "v2").exists()


def start_simulator(link: Path) -> subprocess.Popen[str]:
    """firmware-sim on a pty behind ``link``: pickups and putbacks from a few customers."""
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "firmware_bridge.sim",
            "--device-id",
            "shelf-sim",
            "--rate",
            "10",
            "--link",
            str(link),
            "--timeout",
            "40",
            "--seed",
            "5",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )


async def test_a_serial_device_gets_its_suggestion_as_a_command(
    tmp_path: Path, store_id: str, mqtt_broker: Broker
) -> None:
    link = tmp_path / "shelf-sim"
    sim = start_simulator(link)
    try:
        assert sim.stdout is not None
        assert (await asyncio.to_thread(sim.stdout.readline)).strip() == str(link)
        document = agent_config_dict(
            tmp_path,
            store_id,
            mqtt_broker,
            model=FAST,
            governance={"require_consent": False},
            serial={"ports": [{"url": str(link)}]},
        )
        with clients(mqtt_broker, store_id) as (_, suggestions):
            async with agent_running(document):
                await wait_until(lambda: len(suggestions.ids_for("shelf-sim")) >= 3, 20)
                await asyncio.sleep(0.5)  # let the last commands get their RESULT
            # The agent's last publishes may still be on their way through the broker.
            await asyncio.sleep(0.5)
        sim.send_signal(signal.SIGTERM)
        out, _ = await asyncio.to_thread(sim.communicate, timeout=20)
    finally:
        if sim.poll() is None:
            sim.kill()
            sim.wait(10)
    summary = json.loads(out.strip().splitlines()[-1])
    assert len(summary["shown"]) >= 2
    assert set(summary["shown"]) <= suggestions.ids_for("shelf-sim")


async def test_the_personalizers_own_records_never_come_back_through_the_taps(
    tmp_path: Path, store_id: str, mqtt_broker: Broker
) -> None:
    document = agent_config_dict(tmp_path, store_id, mqtt_broker, model=FAST)
    topic = event_topic(store_id, "shelf-07")
    tapped: list[Event] = []
    observed: list[Event] = []
    with clients(mqtt_broker, store_id) as (publisher, suggestions):
        async with agent_running(document) as agent:
            agent.pipeline.taps.append(tapped.extend)  # what every tap is handed
            agent.pipeline.observers.append(observed.extend)
            publisher.publish(topic, consent("t-consent", "c-tap", True))
            publisher.publish(topic, event("t1", "product.pickup", "c-tap", sku="SKU-000010"))
            await suggestions.wait_for("t1")
            await wait_until(lambda: any(e.type == "suggestion.shown" for e in observed), 10)
    assert [e.event_id for e in tapped] == ["t-consent", "t1"]  # device input only
    shown = [e for e in observed if e.type == "suggestion.shown"]
    assert [e.data["trigger_event_id"] for e in shown] == ["t1"]  # committed and observed


async def test_a_serial_trigger_is_answered_on_that_devices_display(
    tmp_path: Path, store_id: str, mqtt_broker: Broker
) -> None:
    """The display sink port: a pickup from a serial shelf comes back to that shelf as a
    COMMAND (a real simulator on a real pty), and is recorded like any suggestion."""
    sims = SimLauncher()
    try:
        sim = await sims.start("--device-id", "shelf-serial", "--rate", "20", "--seed", "7")
        document = agent_config_dict(
            tmp_path, store_id, mqtt_broker, model=FAST, serial={"ports": [{"url": sim.path}]}
        )
        async with agent_running(document) as agent:
            feedback = personalizer(agent).feedback
            await wait_until(lambda: feedback.totals().shown >= 3, 20)
            sim.proc.send_signal(signal.SIGTERM)  # this test's own simulator, by its pid
            _, summary = await sim.wait()
    finally:
        await sims.kill_all()
    assert summary["commands"] >= 1
    served = {
        e["data"]["suggestion_id"]: e["device_id"]
        for e in buffered(tmp_path / "data" / "buffer.db", "suggestion.shown")
    }
    assert summary["shown"]  # the display showed suggestions, each one the agent served
    assert {served.get(shown) for shown in summary["shown"]} == {"shelf-serial"}
