"""Per-customer session state in memory: recent takes and the basket, bounded by an LRU.

The model needs a customer's recent trigger events (sku, type, time); the personalizer keeps
them here, on the event loop, for at most ``cap`` customers (the least recently active are
forgotten first) and at most ``history_length`` entries each. After a restart the state is
rebuilt from the buffer (``parse_recent``), so a restart does not make every customer a stranger.
"""

from __future__ import annotations

import array
import collections
import json
import logging
import sys
import time
from collections.abc import Iterable
from typing import Final

from edge_agent.buffer.reads import StateRow
from edge_agent.events import Event, parse_ts

log = logging.getLogger(__name__)

TRIGGER_TYPES: Final = frozenset(
    {"product.pickup", "product.scan", "kiosk.view", "basket.add", "customer.identified"}
)
# Types that change session state without triggering a suggestion.
STATE_TYPES: Final = TRIGGER_TYPES | {"product.putback", "checkout.purchase"}
REBUILD_MAX_ROWS: Final = 200_000  # bounds the start-up scan on a big buffer
MAX_BASKET: Final = 200

HistoryEntry = tuple[str, str, float]  # (sku, event type, ts seconds), as models.serving takes
# The history's event types by code (one byte per entry instead of a reference).
_KINDS: Final = tuple(sorted(TRIGGER_TYPES))
_KIND_CODES: Final = {kind: code for code, kind in enumerate(_KINDS)}


class Session:
    """One customer's recent takes (at most ``history_length``) and basket.

    The history is three flat columns (the sku, a one-byte type code, the time as a C
    double) rather than a deque of tuples: with a full history of 32, about 1.3 KB a
    customer instead of 8.4 KB (``benchmarks/memory.py``, "per-customer state"); skus are
    interned, so a sku named by many customers is one string.
    """

    __slots__ = ("_kinds", "_skus", "_times", "basket", "last_seen")

    def __init__(self) -> None:
        self._skus: list[str] = []
        self._kinds = bytearray()
        self._times = array.array("d")
        self.basket: set[str] = set()
        self.last_seen = 0.0  # ts seconds of the newest event

    @property
    def history(self) -> list[HistoryEntry]:
        """(sku, event type, ts seconds), oldest first."""
        return [
            (sku, _KINDS[code], ts)
            for sku, code, ts in zip(self._skus, self._kinds, self._times, strict=True)
        ]

    def add_take(self, sku: str, event_type: str, ts: float, limit: int) -> None:
        self._skus.append(sys.intern(sku))  # freed with its last reference (CPython)
        self._kinds.append(_KIND_CODES[event_type])
        self._times.append(ts)
        if len(self._skus) > limit:
            del self._skus[0], self._kinds[0], self._times[0]

    def since(self, horizon: float) -> list[HistoryEntry]:
        return [entry for entry in self.history if entry[2] >= horizon]


def event_seconds(event_ts: str) -> float:
    moment = parse_ts(event_ts)
    return moment.timestamp() if moment is not None else time.time()


class SessionStore:
    """customer id → Session, least recently active evicted beyond ``cap``."""

    def __init__(self, cap: int, history_length: int, max_age_s: float) -> None:
        self.cap = cap
        self.history_length = history_length
        self.max_age_s = max_age_s
        self.evicted = 0
        self._sessions: collections.OrderedDict[str, Session] = collections.OrderedDict()

    def __len__(self) -> int:
        return len(self._sessions)

    def __contains__(self, customer_id: object) -> bool:
        return customer_id in self._sessions

    def get(self, customer_id: str) -> Session | None:
        return self._sessions.get(customer_id)

    def forget(self, customer_id: str) -> None:
        """Drop everything about a customer (consent withdrawn, erasure)."""
        self._sessions.pop(customer_id, None)

    def observe(self, customer_id: str, event_type: str, sku: str | None, ts: float) -> Session:
        """Record one event of a customer and mark them most recently active."""
        session = self._sessions.get(customer_id)
        if session is None:
            session = Session()
            self._sessions[customer_id] = session
            while len(self._sessions) > self.cap:
                self._sessions.popitem(last=False)
                self.evicted += 1
        else:
            self._sessions.move_to_end(customer_id)
        session.last_seen = max(session.last_seen, ts)
        if event_type == "checkout.purchase":
            session.basket.clear()  # a new visit starts with an empty basket
            return session
        if sku is None:
            return session
        if event_type == "product.putback":
            session.basket.discard(sku)
            return session
        if event_type in TRIGGER_TYPES:
            session.add_take(sku, event_type, ts, self.history_length)
        if event_type == "basket.add" and len(session.basket) < MAX_BASKET:
            session.basket.add(sku)
        return session

    def history(self, customer_id: str, now: float) -> list[HistoryEntry]:
        """The customer's recent takes, oldest first, without those older than max_age_s."""
        session = self._sessions.get(customer_id)
        if session is None:
            return []
        return session.since(now - self.max_age_s)

    def observe_event(self, event: Event) -> Session | None:
        if event.customer_id is None or event.type not in STATE_TYPES:
            return None
        sku = event.data.get("sku")
        return self.observe(
            event.customer_id,
            event.type,
            sku if isinstance(sku, str) else None,
            event_seconds(event.ts),
        )

    def load(self, rows: Iterable[tuple[str, str, str, float]]) -> int:
        """Replay (customer id, type, sku-or-'', ts) rows, oldest first; returns rows used."""
        used = 0
        for customer_id, event_type, sku, ts in rows:
            self.observe(customer_id, event_type, sku or None, ts)
            used += 1
        return used


def parse_recent(rows: Iterable[StateRow]) -> list[tuple[str, str, str, float]]:
    """(customer id, type, sku or '', ts seconds) of the buffer's recent state events
    (``Buffer.recent_customer_events``), for ``SessionStore.load``."""
    parsed: list[tuple[str, str, str, float]] = []
    for customer_id, event_type, envelope in rows:
        try:
            document = json.loads(envelope)
        except ValueError:
            log.warning("session.rebuild.bad_envelope type=%s", event_type)
            continue
        sku = document.get("data", {}).get("sku")
        ts = event_seconds(str(document.get("ts", "")))
        parsed.append((customer_id, event_type, sku if isinstance(sku, str) else "", ts))
    return parsed
