"""Reading event envelopes from JSON Lines into per-customer timelines of item interactions.

Training and evaluation see the same view of the data: the trigger events that name an sku,
in time order, for customers whose latest ``consent.update`` allows personalization. A
customer with no ``consent.update`` at all is left out (DESIGN "Consent": with the default
``require_consent = true`` no record means no consent), and counted as excluded.
Consecutive trigger events on the same sku (a kiosk view, then the pickup, then the basket
add of one product) are one *take*: the customer took that item once. The last take of a
customer is what leave-last-out holds out and evaluates.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

from models.errors import EventDataError

logger = logging.getLogger(__name__)

# DESIGN.md / issue 4: the events that make the agent suggest something.
TRIGGER_TYPES: Final = frozenset(
    {"product.pickup", "product.scan", "kiosk.view", "basket.add", "customer.identified"}
)


@dataclass(frozen=True, slots=True)
class Interaction:
    """One trigger event that names an sku."""

    sku: str
    event_type: str
    ts: float  # seconds since the epoch (UTC)
    store_id: str
    device_id: str


@dataclass(slots=True)
class CustomerTimeline:
    """One customer's trigger interactions in time order, and whether they may be used."""

    customer_id: str
    interactions: list[Interaction] = field(default_factory=list)
    personalization: bool = False  # the latest consent.update wins; no record: not allowed
    consent_ts: float = -math.inf


@dataclass(frozen=True, slots=True)
class EventLog:
    """What one JSON Lines file holds, reduced to what the model needs."""

    timelines: dict[str, CustomerTimeline]
    lines: int
    malformed: int
    first_ts: float
    last_ts: float

    def consenting(self) -> list[CustomerTimeline]:
        """Customers with interactions whose latest consent allows personalization."""
        return [
            timeline
            for timeline in self.timelines.values()
            if timeline.personalization and timeline.interactions
        ]

    def excluded_customers(self) -> int:
        return sum(1 for timeline in self.timelines.values() if not timeline.personalization)

    def until(self, cut: float) -> EventLog:
        """The same log with only the interactions before ``cut`` (a time-based split: what
        a model trained at ``cut`` could have seen). Consent stays the latest known: a
        withdrawal after the cut still keeps the customer out."""
        timelines = {
            customer_id: CustomerTimeline(
                customer_id,
                [event for event in timeline.interactions if event.ts < cut],
                timeline.personalization,
                timeline.consent_ts,
            )
            for customer_id, timeline in self.timelines.items()
        }
        last_ts = min(self.last_ts, cut)
        return EventLog(timelines, self.lines, self.malformed, min(self.first_ts, last_ts), last_ts)


def format_ts(ts: float) -> str:
    """Epoch seconds to the envelope's RFC 3339 form: UTC, milliseconds, a Z."""
    moment = datetime.fromtimestamp(ts, UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def parse_ts(text: Any) -> float | None:
    """RFC 3339 text to epoch seconds; None when it is not a timestamp with a time zone."""
    if not isinstance(text, str):
        return None
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
        if moment.tzinfo is None:
            return None
        return moment.timestamp()
    except (ValueError, OverflowError):  # not a date, or one outside what a timestamp holds
        return None


def iter_envelopes(path: Path) -> Iterator[tuple[int, dict[str, Any] | None]]:
    """(line number, envelope) for each non-blank line; None for a line that is not an object."""
    with path.open("r", encoding="utf-8", errors="replace", newline="\n") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                envelope = json.loads(line)
            except (ValueError, RecursionError):  # not JSON, or nested beyond reason
                yield number, None
                continue
            yield number, envelope if isinstance(envelope, dict) else None


def load_event_log(path: Path) -> EventLog:
    """Read a JSON Lines export; malformed lines are counted and skipped, never fatal."""
    if not path.is_file():
        raise EventDataError(f"events file not found: {path}")
    timelines: dict[str, CustomerTimeline] = {}
    lines = malformed = 0
    first_ts, last_ts = math.inf, -math.inf
    for _, envelope in iter_envelopes(path):
        lines += 1
        ts = parse_ts(envelope.get("ts")) if envelope is not None else None
        if envelope is None or ts is None:
            malformed += 1
            continue
        first_ts, last_ts = min(first_ts, ts), max(last_ts, ts)
        customer_id = envelope.get("customer_id")
        if not isinstance(customer_id, str) or not customer_id:
            continue  # anonymous telemetry says nothing about what a customer takes
        data = envelope.get("data")
        data = data if isinstance(data, dict) else {}
        event_type = envelope.get("type")
        if not isinstance(event_type, str):
            malformed += 1
            continue
        timeline = timelines.get(customer_id)
        if timeline is None:
            timeline = timelines[customer_id] = CustomerTimeline(customer_id)
        if event_type == "consent.update":
            allowed = data.get("personalization")
            if isinstance(allowed, bool) and ts >= timeline.consent_ts:
                timeline.personalization, timeline.consent_ts = allowed, ts
            continue
        sku = data.get("sku")
        if event_type in TRIGGER_TYPES and isinstance(sku, str) and sku:
            timeline.interactions.append(
                Interaction(
                    sku=sku,
                    event_type=event_type,
                    ts=ts,
                    store_id=str(envelope.get("store_id") or ""),
                    device_id=str(envelope.get("device_id") or ""),
                )
            )
    for timeline in timelines.values():
        timeline.interactions.sort(key=lambda interaction: interaction.ts)  # stable: file order
    if malformed:
        logger.warning("events.malformed path=%s lines=%d", path, malformed)
    if not math.isfinite(first_ts):
        first_ts = last_ts = 0.0
    return EventLog(timelines, lines, malformed, first_ts, last_ts)


def split_last_take(
    interactions: list[Interaction],
) -> tuple[list[Interaction], Interaction | None]:
    """(context, target): the target is the last interaction; the context drops the events
    on the same sku just before it, since they are the same take, not earlier ones."""
    if not interactions:
        return [], None
    target = interactions[-1]
    end = len(interactions) - 1
    while end > 0 and interactions[end - 1].sku == target.sku:
        end -= 1
    return interactions[:end], target


def collapse_takes(interactions: list[Interaction]) -> list[list[Interaction]]:
    """Group consecutive interactions on the same sku; each group is one take."""
    takes: list[list[Interaction]] = []
    for interaction in interactions:
        if takes and takes[-1][-1].sku == interaction.sku:
            takes[-1].append(interaction)
        else:
            takes.append([interaction])
    return takes
