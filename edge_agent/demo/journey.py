"""The demo's cross-store customer: shops at a second store and in the web shop, then is
recognised at the demo's store, whose suggestion is shaped by that history.

1. A second agent (``store-002``, in this process, its own data directory, the same broker
   and central store) sees the customer consent and pick up a few items; it syncs them.
2. The web shop, a channel of the central store (``customer-store channel create --name
   web-shop``), posts the customer's basket.
3. At the demo's store the customer is identified at the entrance kiosk (no consent record
   there, no local history): the agent fetches the central profile in the background, and
   the customer's next pickup gets the model's suggestion with ``history.central > 0``. The
   live page's "Recent suggestions" show it ("here 1 · elsewhere 6").

Every wait is bounded; a step that does not happen in time ends the journey with a reason
in the summary, never the demo.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import sys
import threading
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Final

import aiohttp
import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from edge_agent.app import RunningAgent, run_agent
from edge_agent.config import config_from_dict
from edge_agent.demo.processes import run_command
from edge_agent.errors import DemoError

log = logging.getLogger(__name__)

SECOND_STORE: Final = "store-002"
CHANNEL: Final = "web-shop"
CUSTOMER: Final = "c-journey-0001"
AT_SECOND_STORE: Final = ("SKU-000101", "SKU-000102", "SKU-000103", "SKU-000104")
IN_WEB_SHOP: Final = ("SKU-000105", "SKU-000106")
STEP_TIMEOUT_S: Final = 15.0
GRANT: Final = {"personalization": True, "profile_sharing": True, "partner_sharing": False}


class JourneyStepError(Exception):
    """A step of the journey did not happen in time (the summary says which)."""


class Journey:
    def __init__(
        self,
        *,
        host: str,
        port: int,
        embedded: bool,
        store_url: str,
        db: str,
        data_dir: Path,
        main_store: str,
    ) -> None:
        self.host, self.port, self.embedded = host, port, embedded
        self.store_url, self.db, self.data_dir = store_url, db, data_dir
        self.main_store = main_store
        self.published_to_main = 0  # MQTT messages sent to the demo's store (the summary adds)
        self._suggestions: dict[str, dict[str, Any]] = {}
        self._lock = threading.Lock()

    async def run(self, main: RunningAgent) -> dict[str, Any]:
        try:
            return await self._run(main)
        except (JourneyStepError, DemoError, OSError, aiohttp.ClientError, ValueError) as exc:
            log.warning("demo.journey.incomplete reason=%s", exc)
            return {"customer": CUSTOMER, "completed": False, "reason": str(exc)}

    async def _run(self, main: RunningAgent) -> dict[str, Any]:
        second_token = await _store_cli(self.db, "token", "create", "--store", SECOND_STORE)
        channel_token = await _store_cli(self.db, "channel", "create", "--name", CHANNEL)
        client = await self._mqtt()
        try:
            await self._shop_at_second_store(client, second_token)
            await self._shop_online(channel_token)
            return await self._visit_main_store(client, main)
        finally:
            client.disconnect()
            client.loop_stop()

    async def _mqtt(self) -> paho.Client:
        client = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"demo-journey-{uuid.uuid4()}")
        client.on_message = self._on_message
        await asyncio.to_thread(client.connect, self.host, self.port, 30)
        client.loop_start()
        client.subscribe(f"edge/{self.main_store}/suggestions/+", qos=0)
        return client

    def _on_message(self, _client: paho.Client, _userdata: Any, message: paho.MQTTMessage) -> None:
        with contextlib.suppress(ValueError, TypeError, KeyError):
            suggestion = json.loads(message.payload)
            with self._lock:
                self._suggestions[str(suggestion["trigger_event_id"])] = suggestion

    async def _shop_at_second_store(self, client: paho.Client, token: str) -> None:
        document = {
            "agent": {"store_id": SECOND_STORE, "data_dir": str(self.data_dir / SECOND_STORE)},
            "mqtt": {
                "host": self.host,
                "port": self.port,
                "client_id": f"edge-agent-demo-{SECOND_STORE}-{time.time_ns()}",
                "protocol": "3.1.1" if self.embedded else "auto",
            },
            "http": {"host": "127.0.0.1", "port": 0},
            "sync": {"url": self.store_url, "token": token, "interval_s": 0.5},
        }
        stop = asyncio.Event()
        ready: asyncio.Future[RunningAgent] = asyncio.get_running_loop().create_future()
        task = asyncio.create_task(
            run_agent(config_from_dict(document), stop, on_ready=ready.set_result),
            name="journey:second-store",
        )
        try:
            waited: set[asyncio.Future[Any]] = {ready, task}
            await asyncio.wait(waited, timeout=STEP_TIMEOUT_S, return_when="FIRST_COMPLETED")
            if not ready.done():
                raise JourneyStepError(f"{SECOND_STORE}'s agent did not start")
            second = ready.result()
            await _until(
                lambda: all(s.stats.connected for s in second.sources),
                f"{SECOND_STORE}'s agent did not connect to the broker",
            )
            await asyncio.sleep(0.2)  # the SUBACK follows the CONNACK
            topic = f"edge/{SECOND_STORE}/devices/shelf-21/events"
            messages = [_event("consent.update", GRANT)] + [
                _event("product.pickup", {"sku": sku}) for sku in AT_SECOND_STORE
            ]
            infos = [client.publish(topic, json.dumps(m), qos=1) for m in messages]
            await asyncio.to_thread(_wait_published, infos, STEP_TIMEOUT_S)
            counters = second.buffer.counters
            await _until(
                lambda: counters.total >= len(messages) and counters.pending == 0,
                f"{SECOND_STORE} did not sync the customer's events",
            )
        finally:
            stop.set()
            await asyncio.wait({task}, timeout=STEP_TIMEOUT_S)

    async def _shop_online(self, token: str) -> None:
        now = datetime.now(UTC)
        events = [
            {
                "event_id": str(uuid.uuid4()),
                "type": "basket.add",
                "ts": _ts(now - timedelta(minutes=10 - n)),
                "store_id": CHANNEL,
                "device_id": "browser",
                "customer_id": CUSTOMER,
                "source": "https:browser",
                "schema": 1,
                "data": {"sku": sku},
            }
            for n, sku in enumerate(IN_WEB_SHOP)
        ]
        headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
        timeout = aiohttp.ClientTimeout(total=STEP_TIMEOUT_S)
        async with (
            aiohttp.ClientSession(timeout=timeout) as session,
            session.post(
                f"{self.store_url}/v1/events", data=json.dumps(events), headers=headers
            ) as response,
        ):
            answer = await response.json(content_type=None)
        if response.status != 200 or answer.get("accepted") != len(events):
            raise JourneyStepError(f"the web shop's events were not accepted: {answer}")

    async def _visit_main_store(self, client: paho.Client, main: RunningAgent) -> dict[str, Any]:
        from edge_agent.personalize.profiles import CentralProfiles

        profiles = next((p for p in main.components if isinstance(p, CentralProfiles)), None)
        if profiles is None:
            raise JourneyStepError("the demo's agent runs without central profiles")
        topic = f"edge/{self.main_store}/devices/kiosk-entrance/events"
        identified = _event("customer.identified", {"method": "card"})
        await asyncio.to_thread(
            _wait_published, [client.publish(topic, json.dumps(identified), qos=1)], 10
        )
        self.published_to_main += 1
        await _until(
            lambda: profiles.fetches["found"] > 0 and profiles.lookup(CUSTOMER) is not None,
            f"{self.main_store} did not receive the customer's central profile",
        )
        pickup = _event("product.pickup", {"sku": "SKU-000107"})
        pickup_topic = f"edge/{self.main_store}/devices/shelf-22/events"
        await asyncio.to_thread(
            _wait_published, [client.publish(pickup_topic, json.dumps(pickup), qos=1)], 10
        )
        self.published_to_main += 1
        trigger = str(pickup["event_id"])
        await _until(lambda: trigger in self._suggestions, f"no suggestion at {self.main_store}")
        with self._lock:
            suggestion = self._suggestions[trigger]
        return {
            "customer": CUSTOMER,
            "completed": True,
            "shopped_at": SECOND_STORE,
            "web_shop_items": len(IN_WEB_SHOP),
            "recognised_at": self.main_store,
            "suggestion_source": suggestion.get("source"),
            "history": suggestion.get("history"),
            "items": [item.get("sku") for item in suggestion.get("items", [])],
        }


def _event(kind: str, data: dict[str, Any]) -> dict[str, Any]:
    return {"event_id": str(uuid.uuid4()), "type": kind, "customer_id": CUSTOMER, "data": data}


def _ts(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def _wait_published(infos: list[paho.MQTTMessageInfo], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    for info in infos:
        info.wait_for_publish(max(0.0, deadline - time.monotonic()))
        if not info.is_published():
            raise JourneyStepError("the broker did not acknowledge the journey's messages")


async def _until(predicate: Callable[[], bool], failure: str) -> None:
    deadline = time.monotonic() + STEP_TIMEOUT_S
    while not predicate():
        if time.monotonic() > deadline:
            raise JourneyStepError(failure)
        await asyncio.sleep(0.05)


async def _store_cli(db: str, *args: str) -> str:
    out = await run_command(sys.executable, "-m", "cloud_sync.store", *args, "--db", db)
    return out.strip().splitlines()[-1]
