"""The central profile merged into a customer's history for the model: pure, no I/O.

Two steps, both plain functions so that the agent, the benchmarks and the simulator share
one rule:

- ``parse_profile(body, customer_id)`` reads the body of the store's
  ``GET /v1/profiles/{customer_id}`` (cloud_sync/store/profiles.py,
  ``agent_profile_document``) and refuses, with a short reason (``ProfileRejectedError.reason``),
  what is not that document: not JSON, too deep, wrong types, another customer's profile,
  too many interactions.
- ``merge_history(local, central, own_store_id=...)`` puts the customer's interactions
  elsewhere (other stores, channels such as a web shop) beside the local session's history and
  says how many of each origin the model is given. The store also returns this store's own
  uploaded events: a central interaction of ``own_store_id`` is dropped when the local history
  holds it, found by event id (``local_event_ids``) or, when the local side keeps no ids,
  by (sku, type, ts to the millisecond), which the store keeps exactly as uploaded.

The model's history entry is ``(sku, event type, ts seconds)``, oldest first
(``models.features.HistoryEntry``).
"""

from __future__ import annotations

import math
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final

from edge_agent.safe_json import load_json

HistoryEntry = tuple[str, str, float]  # (sku, event type, ts seconds), as models.serving takes

MAX_PROFILE_INTERACTIONS: Final = 1000  # the store's own cap (profiles.MAX_INTERACTIONS)
MAX_ID_CHARS: Final = 256
# Interactions that become model history: what the local session keeps as history (the
# trigger types) and purchases elsewhere, which the model weighs too. Putbacks and
# identifications without a sku carry no item for the model.
HISTORY_TYPES: Final = frozenset(
    {
        "product.pickup",
        "product.scan",
        "kiosk.view",
        "basket.add",
        "customer.identified",
        "checkout.purchase",
    }
)


class ProfileRejectedError(ValueError):
    """A profile body that is not the store's profile document; ``reason`` is a metric label."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


@dataclass(frozen=True, slots=True)
class CentralInteraction:
    event_id: str
    store_id: str  # the store or channel (e.g. "web-shop") that recorded it
    type: str
    sku: str | None
    ts: float  # epoch seconds


@dataclass(frozen=True, slots=True)
class CentralProfile:
    customer_id: str
    personalization: bool  # the consent as the store resolves it across stores
    profile_sharing: bool
    interactions: tuple[CentralInteraction, ...]  # oldest first

    @property
    def allows_personalization(self) -> bool:
        return self.personalization and self.profile_sharing


@dataclass(frozen=True, slots=True)
class MergedHistory:
    entries: list[HistoryEntry]  # oldest first, at most ``limit``
    local: int  # how many of ``entries`` came from the local session
    central: int  # how many from the central profile (other stores and channels)


def parse_profile(
    body: bytes | str,
    customer_id: str,
    *,
    max_interactions: int = MAX_PROFILE_INTERACTIONS,
) -> CentralProfile:
    """The profile document for ``customer_id``; ``ProfileRejectedError`` for anything else.

    The caller bounds the body's size before reading it; nesting is bounded here (the
    document is two levels of objects inside one list)."""
    try:
        text = body.decode("utf-8") if isinstance(body, bytes) else body
        document = load_json(text)
    except RecursionError as exc:
        raise ProfileRejectedError("too_deep", "nesting beyond the parser's limit") from exc
    except (UnicodeDecodeError, ValueError) as exc:
        raise ProfileRejectedError("not_json", str(exc)[:200]) from exc
    if not isinstance(document, dict):
        raise ProfileRejectedError("bad_type", "the profile is not a JSON object")
    if document.get("customer_id") != customer_id:
        raise ProfileRejectedError("wrong_customer", "the profile names another customer")
    consent = document.get("consent")
    if not isinstance(consent, dict):
        raise ProfileRejectedError("bad_type", "consent is not an object")
    personalization = consent.get("personalization")
    profile_sharing = consent.get("profile_sharing")
    if not isinstance(personalization, bool) or not isinstance(profile_sharing, bool):
        raise ProfileRejectedError("bad_type", "consent flags are not booleans")
    raw = document.get("interactions")
    if not isinstance(raw, list):
        raise ProfileRejectedError("bad_type", "interactions is not a list")
    if len(raw) > max_interactions:
        raise ProfileRejectedError("too_many", f"{len(raw)} interactions > {max_interactions}")
    interactions = sorted((_interaction(item) for item in raw), key=lambda i: i.ts)
    return CentralProfile(customer_id, personalization, profile_sharing, tuple(interactions))


def _interaction(item: Any) -> CentralInteraction:
    if not isinstance(item, dict):
        raise ProfileRejectedError("bad_type", "an interaction is not an object")
    sku = item.get("sku")
    if sku is not None:
        sku = _short_string(item, "sku")
    ts = _seconds(item.get("ts"))
    if ts is None:
        raise ProfileRejectedError("bad_type", "interaction ts is not an RFC 3339 time")
    return CentralInteraction(
        _short_string(item, "event_id"),
        _short_string(item, "store_id"),
        _short_string(item, "type"),
        sku,
        ts,
    )


def _short_string(item: dict[str, Any], name: str) -> str:
    value = item.get(name)
    if not isinstance(value, str) or not 0 < len(value) <= MAX_ID_CHARS:
        raise ProfileRejectedError("bad_type", f"interaction {name} is not a short string")
    return value


def _seconds(value: Any) -> float | None:
    if not isinstance(value, str) or len(value) > 64:
        return None
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        return None
    if moment.tzinfo is None:
        return None
    seconds = moment.timestamp()
    return seconds if math.isfinite(seconds) else None


def _key(sku: str, kind: str, ts: float) -> tuple[str, str, int]:
    return sku, kind, round(ts * 1000)


def merge_history(
    local: Sequence[HistoryEntry],
    central: Sequence[CentralInteraction],
    *,
    own_store_id: str,
    limit: int,
    since: float = -math.inf,
    local_event_ids: Collection[str] = (),
) -> MergedHistory:
    """The newest ``limit`` entries of local and central history together, oldest first.

    ``central`` is oldest first, as ``parse_profile`` returns it (it is read from the newest
    back and only as far as the answer needs: the cost does not grow with the profile).
    Central interactions count only when they carry a sku, are of a ``HISTORY_TYPES``
    type, are not older than ``since``, and are not the local history's own events (see
    the module's docstring). On equal times a local entry sorts after a central one (the
    local one is the freshest signal)."""
    if limit <= 0:
        return MergedHistory([], 0, 0)
    local_keys = {_key(sku, kind, ts) for sku, kind, ts in local}
    seen: set[tuple[str, str]] = set()
    tagged: list[tuple[float, int, HistoryEntry]] = []
    for item in reversed(central):
        if item.ts < since or len(tagged) == limit:
            break  # older ones cannot be among the newest ``limit``
        if item.sku is None or item.type not in HISTORY_TYPES:
            continue
        ident = (item.store_id, item.event_id)
        if ident in seen:
            continue
        seen.add(ident)
        if item.store_id == own_store_id and (
            item.event_id in local_event_ids or _key(item.sku, item.type, item.ts) in local_keys
        ):
            continue
        tagged.append((item.ts, 0, (item.sku, item.type, item.ts)))
    tagged.extend((entry[2], 1, entry) for entry in local)
    tagged.sort(key=lambda row: (row[0], row[1]))
    kept = tagged[-limit:]
    central_count = sum(1 for row in kept if row[1] == 0)
    return MergedHistory(
        [row[2] for row in kept], local=len(kept) - central_count, central=central_count
    )
