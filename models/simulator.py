"""A seeded shopper simulator that writes event envelopes as JSON Lines.

The world has structure a good model can learn and popularity cannot:
- items belong to a category (one shelf device per category) and to a latent *topic*
  (a lifestyle such as "vegan" or "premium") that cuts across categories;
- each customer's taste is concentrated on a few topics and categories;
- items have complements (mostly of the same topic, in other categories): after taking an
  item, the next take is often one of its complements (a sequential pattern);
- categories have hours of the day when they sell (bakery in the morning, wine at night);
- shown suggestions are accepted more often when they fit the customer's taste.
Customers rarely take the same item twice within their last few dozen takes.

Shoppers who visit several stores (``travellers``, off by default): that share of the
customers has no home store; each of their visits goes to the online shop (the ``web-shop``
channel, its ``store_id``, device ``web-01``) with chance ``web_shop_rate`` and otherwise to
one of the stores uniformly, so at any one store most of their history was made elsewhere.
With ``travellers = 0`` the output is byte for byte what it was before the option existed.
"""

from __future__ import annotations

import json
import logging
import random
import uuid
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

import numpy as np
import numpy.typing as npt

from models.events import format_ts

logger = logging.getLogger(__name__)

CATEGORY_NAMES: Final = (
    "bakery", "dairy", "produce", "meat", "beverages", "snacks", "frozen", "breakfast",
    "pantry", "household", "personal-care", "baby", "pet", "wine-beer", "deli", "sweets",
    "coffee-tea", "health", "ready-meals", "flowers",
)  # fmt: skip
PEAK_HOURS: Final = (8.0, 12.5, 18.5)  # morning, lunch, evening
OPENING_HOURS: Final = (7.0, 21.5)
RECENT_MEMORY: Final = 40  # takes a customer avoids repeating
WEB_SHOP: Final = "web-shop"  # the online channel's store_id (a channel token's name)
WEB_DEVICE: Final = "web-01"


@dataclass(frozen=True, slots=True)
class SimulationConfig:
    seed: int = 7
    customers: int = 500
    days: int = 28
    items: int = 2000
    categories: int = 20
    topics: int = 16
    stores: int = 3
    start: str = "2026-11-01"
    complement_rate: float = 0.45  # chance the next take is a complement of the last one
    suggestion_rate: float = 0.15  # chance a pickup is followed by a shown suggestion
    no_consent_rate: float = 0.08
    telemetry_interval_min: int = 60
    travellers: float = 0.0  # share of customers who shop at every store and online
    web_shop_rate: float = 0.3  # share of a traveller's visits made in the web shop


@dataclass(frozen=True, slots=True)
class Catalogue:
    skus: list[str]
    category: npt.NDArray[np.int64]
    topic: npt.NDArray[np.int64]
    price: npt.NDArray[np.float64]
    popularity: npt.NDArray[np.float64]
    complements: npt.NDArray[np.int64]  # (items, 3)
    category_items: list[npt.NDArray[np.int64]]
    category_peak: npt.NDArray[np.float64]
    category_peak_strength: npt.NDArray[np.float64]


@dataclass(slots=True)
class Customer:
    customer_id: str
    taste: npt.NDArray[np.float64]  # over topics
    category_affinity: npt.NDArray[np.float64]
    home_store: int
    visit_rate: float
    preferred_hour: float
    self_scanner: bool
    personalization: bool
    consent_sent: bool = False
    traveller: bool = False
    recent: deque[int] = field(default_factory=lambda: deque(maxlen=RECENT_MEMORY))


def build_catalogue(config: SimulationConfig, rng: np.random.Generator) -> Catalogue:
    n = config.items
    categories = min(config.categories, len(CATEGORY_NAMES))
    category = np.sort(rng.integers(0, categories, n))
    topic = rng.integers(0, config.topics, n)
    base_price = rng.uniform(1.0, 12.0, categories)
    price = np.round(base_price[category] * rng.lognormal(0.0, 0.35, n), 2)
    ranks = rng.permutation(n).astype(np.float64)
    popularity: npt.NDArray[np.float64] = 1.0 / (1.0 + ranks) ** 0.7  # Zipf-like, random ranks
    popularity /= popularity.sum()
    category_items = [np.flatnonzero(category == c) for c in range(categories)]
    complements = np.zeros((n, 3), np.int64)
    for item in range(n):
        same_topic = np.flatnonzero((topic == topic[item]) & (category != category[item]))
        pool = same_topic if same_topic.size >= 3 else np.flatnonzero(np.arange(n) != item)
        weights = popularity[pool] ** 0.5
        complements[item] = rng.choice(pool, 3, replace=False, p=weights / weights.sum())
    return Catalogue(
        skus=[f"SKU-{index + 1:06d}" for index in range(n)],
        category=category,
        topic=topic,
        price=price,
        popularity=popularity,
        complements=complements,
        category_items=category_items,
        category_peak=rng.choice(PEAK_HOURS, categories),
        category_peak_strength=rng.uniform(0.5, 3.0, categories),
    )


def build_customers(config: SimulationConfig, rng: np.random.Generator) -> list[Customer]:
    categories = min(config.categories, len(CATEGORY_NAMES))
    return [
        Customer(
            customer_id=f"c-{index + 1:06d}",
            taste=rng.dirichlet(np.full(config.topics, 0.25)),
            category_affinity=rng.dirichlet(np.full(categories, 0.6)),
            home_store=int(rng.integers(0, config.stores)),
            visit_rate=float(rng.uniform(0.1, 0.5)),
            preferred_hour=float(rng.choice(PEAK_HOURS) + rng.normal(0.0, 1.0)),
            self_scanner=bool(rng.random() < 0.3),
            personalization=bool(rng.random() >= config.no_consent_rate),
        )
        for index in range(config.customers)
    ]


class ShopperSimulator:
    """Generates the events of every store, day by day, in time order within each day."""

    def __init__(self, config: SimulationConfig) -> None:
        self.config = config
        self._rng = np.random.default_rng(config.seed)
        self._random = random.Random(config.seed)
        self.catalogue = build_catalogue(config, self._rng)
        self.customers = build_customers(config, self._rng)
        if config.travellers > 0.0:  # its own stream: the default data stays as it was
            picks = np.random.default_rng([config.seed, 1]).random(len(self.customers))
            for customer, pick in zip(self.customers, picks, strict=True):
                customer.traveller = bool(pick < config.travellers)
        start = datetime.fromisoformat(config.start).replace(tzinfo=UTC)
        self._start_ts = start.timestamp()

    def events(self) -> Iterator[dict[str, Any]]:
        for day in range(self.config.days):
            day_events: list[dict[str, Any]] = []
            day_start = self._start_ts + day * 86400.0
            for customer in self.customers:
                if self._random.random() < customer.visit_rate:
                    day_events += self._session(customer, day_start)
            day_events += self._telemetry(day_start)
            day_events.sort(key=lambda envelope: envelope["ts"])
            yield from day_events

    # -- envelopes -------------------------------------------------------------------
    def _envelope(
        self,
        event_type: str,
        ts: float,
        store: int,
        device: str,
        *,
        customer: str | None,
        data: Any,
    ) -> dict[str, Any]:
        store_id = self.store_id(store)
        channel = "telemetry" if event_type == "telemetry" else "events"
        return {
            "event_id": str(uuid.UUID(int=self._random.getrandbits(128), version=4)),
            "type": event_type,
            "ts": format_ts(ts),
            "store_id": store_id,
            "device_id": device,
            "customer_id": customer,
            "source": f"mqtt:edge/{store_id}/devices/{device}/{channel}",
            "schema": 1,
            "data": data,
            "received_at": format_ts(ts + self._random.uniform(0.002, 0.05)),
        }

    def store_id(self, store: int) -> str:
        """Index ``stores`` is the web shop; the others are physical stores."""
        return WEB_SHOP if store == self.config.stores else f"store-{store + 1:03d}"

    def _telemetry(self, day_start: float) -> list[dict[str, Any]]:
        interval = self.config.telemetry_interval_min * 60.0
        if interval <= 0:
            return []
        readings = []
        for store in range(self.config.stores):
            for step in range(int(86400.0 // interval)):
                temp = round(4.0 + self._random.gauss(0.0, 0.4), 2)
                readings.append(
                    self._envelope(
                        "telemetry",
                        day_start + step * interval + 1.0,
                        store,
                        "fridge-01",
                        customer=None,
                        data={"values": {"temp_c": temp, "door_open": False}},
                    )
                )
        return readings

    # -- one visit ---------------------------------------------------------------------
    def _session(self, customer: Customer, day_start: float) -> list[dict[str, Any]]:
        rnd, config = self._random, self.config
        store = self._visit_store(customer)
        low, high = OPENING_HOURS
        hour = min(max(customer.preferred_hour + rnd.gauss(0.0, 1.2), low), high - 0.5)
        now = day_start + hour * 3600.0
        who = customer.customer_id
        events = []

        def emit(event_type: str, device: str, data: dict[str, Any]) -> dict[str, Any]:
            nonlocal now
            now += rnd.uniform(8.0, 90.0)
            where = WEB_DEVICE if store == config.stores else device
            events.append(self._envelope(event_type, now, store, where, customer=who, data=data))
            return events[-1]

        alias = f"card-{who[2:]}"
        identified = {
            "method": "login" if store == config.stores else "loyalty_card",
            "alias": alias,
        }
        emit("customer.identified", "door-01", identified)
        if not customer.consent_sent or rnd.random() < 0.02:
            if customer.consent_sent:
                customer.personalization = not customer.personalization
            customer.consent_sent = True
            emit("consent.update", "kiosk-01", self._consent(customer))
        basket: list[tuple[int, float]] = []
        last: int | None = None
        forced: int | None = None  # an accepted suggestion is what the customer takes next
        for _ in range(2 + int(self._rng.poisson(4.0))):
            item = forced if forced is not None else self._next_item(customer, last, hour)
            forced = None
            sku, category = self.catalogue.skus[item], int(self.catalogue.category[item])
            shelf = f"shelf-{category + 1:02d}"
            if rnd.random() < 0.3:
                page = CATEGORY_NAMES[category]
                kiosk = f"kiosk-{rnd.randint(1, 2):02d}"
                emit("kiosk.view", kiosk, {"sku": sku, "page": page, "dwell_s": rnd.randint(2, 40)})
            weight = int(self._rng.integers(80, 1500))
            pickup = emit("product.pickup", shelf, {"sku": sku, "weight_g": weight, "shelf": shelf})
            customer.recent.append(item)
            last = item
            if rnd.random() < 0.15:
                emit("product.putback", shelf, {"sku": sku, "weight_g": weight, "shelf": shelf})
            else:
                price = float(self.catalogue.price[item])
                if customer.self_scanner:
                    emit("product.scan", "scanner-01", {"sku": sku, "code": f"EAN{item:010d}"})
                else:
                    emit("basket.add", shelf, {"sku": sku, "qty": 1, "price": price})
                basket.append((item, price))
            if rnd.random() < config.suggestion_rate:
                forced = self._suggestion(customer, category, shelf, pickup["event_id"], emit)
        if basket:
            items = [{"sku": self.catalogue.skus[i], "qty": 1, "price": p} for i, p in basket]
            total = round(sum(price for _, price in basket), 2)
            emit("checkout.purchase", "pos-01", {"items": items, "total": total, "currency": "EUR"})
        return events

    def _visit_store(self, customer: Customer) -> int:
        """Where this visit happens: mostly the home store; anywhere for a traveller."""
        rnd, config = self._random, self.config
        if customer.traveller:
            online = rnd.random() < config.web_shop_rate
            return config.stores if online else rnd.randrange(config.stores)
        return customer.home_store if rnd.random() < 0.85 else rnd.randrange(config.stores)

    def _consent(self, customer: Customer) -> dict[str, bool]:
        sharing = customer.personalization and self._random.random() < 0.7
        return {
            "personalization": customer.personalization,
            "profile_sharing": sharing,
            "partner_sharing": sharing and self._random.random() < 0.4,
        }

    def _next_item(self, customer: Customer, last: int | None, hour: float) -> int:
        catalogue, rnd = self.catalogue, self._random
        for _ in range(8):  # a few tries to avoid what the customer took recently
            if last is not None and rnd.random() < self.config.complement_rate:
                item = int(catalogue.complements[last, rnd.randrange(3)])
            else:
                closeness = np.exp(-((hour - catalogue.category_peak) ** 2) / 8.0)
                category_weights = customer.category_affinity * (
                    1.0 + catalogue.category_peak_strength * closeness
                )
                category = _draw(category_weights, rnd.random())
                pool = catalogue.category_items[category]
                if pool.size == 0:
                    continue
                fit = 0.01 + customer.taste[catalogue.topic[pool]]
                item = int(pool[_draw(catalogue.popularity[pool] ** 0.6 * fit**2, rnd.random())])
            if item not in customer.recent:
                return item
        return item

    def _suggestion(
        self, customer: Customer, category: int, device: str, trigger: str, emit: Any
    ) -> int | None:
        """Show three items (the store's naive bestsellers of this category or any), and
        accept one with a chance that grows with how well it fits the customer's taste."""
        catalogue, rnd = self.catalogue, self._random
        pool = catalogue.category_items[category]
        if rnd.random() < 0.5 or pool.size < 3:
            pool = np.arange(len(catalogue.skus))
        shown = [int(pool[_draw(catalogue.popularity[pool], rnd.random())]) for _ in range(3)]
        shown = list(dict.fromkeys(shown))
        suggestion_id = str(uuid.UUID(int=rnd.getrandbits(128), version=4))
        propensities = [round(1.0 / len(shown), 4)] * len(shown)
        items = [
            {"sku": catalogue.skus[i], "score": p} for i, p in zip(shown, propensities, strict=True)
        ]
        emit(
            "suggestion.shown",
            device,
            {"suggestion_id": suggestion_id, "items": items, "source": "bestsellers",
             "model_version": "none", "trigger_event_id": trigger, "propensities": propensities},
        )  # fmt: skip
        best_fit = float(customer.taste.max())
        for item in shown:
            fit = float(customer.taste[catalogue.topic[item]]) / best_fit
            if rnd.random() < 0.03 + 0.45 * fit:
                accepted = {"suggestion_id": suggestion_id, "sku": catalogue.skus[item]}
                emit("suggestion.accepted", device, {**accepted, "implicit": False})
                return item
        if rnd.random() < 0.6:
            emit("suggestion.dismissed", device, {"suggestion_id": suggestion_id})
        return None


def _draw(weights: npt.NDArray[np.float64], uniform: float) -> int:
    """Index drawn in proportion to ``weights`` with one uniform number (fast, seeded)."""
    cumulative = np.cumsum(weights)
    position = int(np.searchsorted(cumulative, uniform * cumulative[-1], side="right"))
    return min(position, len(weights) - 1)


def write_events(config: SimulationConfig, out: Path) -> int:
    """Simulate and write JSON Lines; returns the number of events written."""
    simulator = ShopperSimulator(config)
    out.parent.mkdir(parents=True, exist_ok=True)
    count = 0
    with out.open("w", encoding="utf-8") as handle:
        for envelope in simulator.events():
            handle.write(json.dumps(envelope, separators=(",", ":")) + "\n")
            count += 1
    logger.info("simulate.complete events=%d path=%s", count, out)
    return count
