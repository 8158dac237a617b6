"""The single customer view: facts from the database shaped into one profile document.

A profile is every id linked by ``customer.identified`` aliases (a loyalty card and an app
account are one person); any of its ids finds it. Consent is resolved across those ids by
the trust model (``trust.resolve_consent``: the most restrictive value, a withdrawal wins at
once). Pseudonymised ids are profiles like any other.
"""

from __future__ import annotations

import base64
import binascii
import json
from datetime import datetime
from typing import Any, Final

from cloud_sync.store.errors import BadRequestError
from cloud_sync.store.records import (
    ConsentFacts,
    CustomerFacts,
    ProfileFacts,
    StoredEvent,
    format_ts,
    is_pseudonym,
    parse_ts,
    sortable_ts,
)
from cloud_sync.store.trust import CONSENT_FLAGS, resolve_consent

__all__ = ["is_pseudonym"]  # re-exported: the feed and the export ask it here

RECENT_ITEMS: Final = 10
# What an agent's model may learn from (GET /v1/profiles): interactions with products and
# identification; not consent records or the suggestions themselves.
INTERACTION_TYPES: Final = (
    "product.pickup",
    "product.putback",
    "product.scan",
    "kiosk.view",
    "basket.add",
    "checkout.purchase",
    "customer.identified",
)
DEFAULT_INTERACTIONS: Final = 200
MAX_INTERACTIONS: Final = 1000


def resolved_flags(facts: ConsentFacts) -> dict[str, bool] | None:
    consent = resolve_consent(facts.consent_changes, facts.history_ids)
    return None if consent is None else dict(consent.flags)


def shares_profile(flags: dict[str, bool] | None) -> bool:
    """An agent gets a profile only with personalization AND profile sharing."""
    return flags is not None and flags["personalization"] and flags["profile_sharing"]


def agent_profile_document(
    customer_id: str, flags: dict[str, bool], facts: ProfileFacts, now: datetime
) -> dict[str, Any]:
    """The body of GET /v1/profiles/{customer_id} (the agents code against it)."""
    return {
        "customer_id": customer_id,
        "consent": {flag: flags[flag] for flag in CONSENT_FLAGS},
        "interactions": [
            {
                "ts": format_ts(i.ts),
                "type": i.type,
                "sku": i.sku,
                "store_id": i.store_id,
                "event_id": i.event_id,
            }
            for i in facts.interactions
        ],
        "aggregates": {"by_sku": dict(sorted(facts.by_sku.items()))},
        "generated_at": format_ts(now),
    }


# Read more sku events than items shown, so repeats of one sku do not crowd out the others.
RECENT_SKU_EVENTS: Final = 50


def shares_with_partners(facts: CustomerFacts) -> bool:
    """A partner sees a profile only when its resolved consent says partner_sharing=true."""
    consent = resolve_consent(facts.consent_changes, facts.history_ids)
    return consent is not None and consent.flags["partner_sharing"]


def profile_document(customer_id: str, facts: CustomerFacts) -> dict[str, Any]:
    counts = dict(sorted(facts.counts.items()))
    shown = counts.get("suggestion.shown", 0)
    accepted = counts.get("suggestion.accepted", 0)
    return {
        "customer_id": customer_id,
        "identities": list(facts.ids),
        "first_seen": format_ts(facts.first_seen),
        "last_seen": format_ts(facts.last_seen),
        "events": sum(counts.values()),
        "counts": counts,
        "stores": list(facts.stores),
        "channels": sorted({d.channel for d in facts.devices}),
        "devices": [
            {
                "channel": d.channel,
                "store_id": d.store_id,
                "device_id": d.device_id,
                "events": d.events,
            }
            for d in facts.devices
        ],
        "recent_items": recent_items(facts),
        "suggestions": {
            "shown": shown,
            "accepted": accepted,
            "dismissed": counts.get("suggestion.dismissed", 0),
            "acceptance_rate": round(accepted / shown, 4) if shown else None,
        },
        "consent": consent_state(facts),
    }


def recent_items(facts: CustomerFacts) -> list[dict[str, str]]:
    """Distinct skus, newest interaction first."""
    items: list[dict[str, str]] = []
    seen: set[str] = set()
    for sku, ts in facts.recent_skus:
        if sku not in seen:
            seen.add(sku)
            items.append({"sku": sku, "last_ts": format_ts(ts)})
        if len(items) == RECENT_ITEMS:
            break
    return items


def consent_state(facts: CustomerFacts) -> dict[str, Any] | None:
    consent = resolve_consent(facts.consent_changes, facts.history_ids)
    if consent is None:
        return None
    state: dict[str, Any] = dict(consent.flags)
    state["updated_at"] = format_ts(consent.updated_at)
    return state


def encode_cursor(event: StoredEvent) -> str:
    """An opaque position after ``event`` in (ts, seq) order."""
    raw = json.dumps([sortable_ts(event.ts), event.seq], separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[datetime, int]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        text, seq = json.loads(raw)
    except (binascii.Error, ValueError, TypeError) as exc:
        raise BadRequestError(400, "bad_cursor", "use the next_cursor of a previous page") from exc
    ts = parse_ts(text) if isinstance(text, str) else None
    if ts is None or isinstance(seq, bool) or not isinstance(seq, int):
        raise BadRequestError(400, "bad_cursor", "use the next_cursor of a previous page")
    return ts, seq


def events_page(events: list[StoredEvent], limit: int) -> dict[str, Any]:
    """A page of history; ``next_cursor`` is null on the last page."""
    more = len(events) > limit
    page = events[:limit]
    return {
        "events": [e.envelope for e in page],
        "next_cursor": encode_cursor(page[-1]) if more and page else None,
    }
