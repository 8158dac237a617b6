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
from cloud_sync.store.records import CustomerFacts, StoredEvent, format_ts, parse_ts, sortable_ts
from cloud_sync.store.trust import resolve_consent

RECENT_ITEMS: Final = 10
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
