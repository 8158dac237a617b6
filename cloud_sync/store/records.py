"""Plain records passed between the HTTP layer and the database backends, and time helpers.

Backends speak only these types, so routes and profile assembly never see a driver's rows.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from typing import Any, Final, Literal

Kind = Literal["agent", "partner", "admin", "channel"]
SCOPE_PROFILES: Final = "profiles:read"
SCOPE_AGGREGATES: Final = "aggregates:read"
SCOPE_EVENTS: Final = "events:read"  # the live feed of consented events (GET /v1/feed)
PARTNER_SCOPES: Final = frozenset({SCOPE_PROFILES, SCOPE_AGGREGATES, SCOPE_EVENTS})
# The agents' pseudonyms (edge_agent.governance): "ps-" and 128 bits of an HMAC in hex.
PSEUDONYM_REGEX: Final = r"^ps-[0-9a-f]{32}$"
PSEUDONYM_PATTERN: Final = re.compile(PSEUDONYM_REGEX)


def is_pseudonym(customer_id: str) -> bool:
    return PSEUDONYM_PATTERN.match(customer_id) is not None


def parse_ts(text: str) -> datetime | None:
    """An RFC 3339 timestamp with a time zone, in UTC; None when it is not one."""
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00").replace("z", "+00:00"))
        if moment.tzinfo is None:
            return None
        return moment.astimezone(UTC)
    except (ValueError, OverflowError):  # 9999-12-31T23:59:59-01:00 overflows in UTC
        return None


def sortable_ts(moment: datetime) -> str:
    """Fixed-width UTC text (microseconds), so SQLite's text order is time order."""
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def format_ts(moment: datetime) -> str:
    """The envelope's time format: RFC 3339, UTC, milliseconds, a Z."""
    utc = moment.astimezone(UTC)
    return utc.strftime("%Y-%m-%dT%H:%M:%S.") + f"{utc.microsecond // 1000:03d}Z"


@dataclass(frozen=True, slots=True)
class EventRow:
    """One valid envelope, ready to insert."""

    event_id: str
    type: str
    ts: datetime
    store_id: str
    device_id: str | None
    customer_id: str | None
    source: str
    schema: int
    data_json: str
    received_at: str | None
    alias: str | None  # customer.identified's data.alias: links two ids into one profile
    method: str | None = None  # customer.identified's data.method: the identifier kind


@dataclass(frozen=True, slots=True)
class IngestCounts:
    accepted: int  # newly stored
    duplicates: int  # already stored (or repeated within the batch)
    erased: int  # belonged to a customer erased after the event happened: dropped on purpose


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is calling: an agent (one store), a partner (scopes) or an admin."""

    credential_id: int
    kind: Kind
    name: str
    store_id: str | None
    scopes: frozenset[str]


@dataclass(frozen=True, slots=True)
class DeviceFacts:
    channel: str
    store_id: str
    device_id: str | None
    events: int


@dataclass(frozen=True, slots=True)
class CustomerFacts:
    """What the database knows about one profile (a set of linked ids)."""

    ids: tuple[str, ...]
    counts: dict[str, int]
    first_seen: datetime
    last_seen: datetime
    stores: tuple[str, ...]
    devices: tuple[DeviceFacts, ...]
    recent_skus: tuple[tuple[str, datetime], ...]  # newest first, may repeat a sku
    consent_changes: tuple[ConsentChange, ...]  # applied ones, of every id of the profile
    history_ids: tuple[str, ...]  # ids with events of their own (customer.identified aside)


@dataclass(frozen=True, slots=True)
class ConsentChange:
    change_id: int  # receipt order
    customer_id: str
    flags: dict[str, Any]
    event_ts: datetime


@dataclass(frozen=True, slots=True)
class IdentityChange:
    """One consent or link change as the audit trail keeps it, with its origin."""

    change_id: int
    kind: str  # "consent" or "link"
    customer_id: str
    alias: str | None
    method: str | None
    flags: dict[str, Any] | None
    event_id: str
    store_id: str
    credential_id: int | None  # None: recorded before the audit trail existed
    event_ts: datetime
    received_at: datetime
    status: str  # applied, held, refused, undone
    reason: str
    decided_at: datetime | None
    decided_by: str | None

    def as_json(self) -> dict[str, Any]:
        return {
            "id": self.change_id,
            "kind": self.kind,
            "customer_id": self.customer_id,
            "alias": self.alias,
            "method": self.method,
            "flags": self.flags,
            "event_id": self.event_id,
            "store_id": self.store_id,
            "credential_id": self.credential_id,
            "event_ts": format_ts(self.event_ts),
            "received_at": format_ts(self.received_at),
            "status": self.status,
            "reason": self.reason,
            "decided_at": None if self.decided_at is None else format_ts(self.decided_at),
            "decided_by": self.decided_by,
        }


@dataclass(frozen=True, slots=True)
class StoredEvent:
    seq: int
    ts: datetime
    envelope: dict[str, Any]


@dataclass(frozen=True, slots=True)
class Erasure:
    seq: int
    customer_id: str
    requested_at: datetime


@dataclass(frozen=True, slots=True)
class ModelRecord:
    version: str
    sha256: str
    size: int
    manifest: dict[str, Any]
    published_at: datetime | None = None

    @property
    def etag(self) -> str:
        """The ETag of ``GET /v1/models/latest``; two versions may share an artifact
        (re-signed, re-labelled), so it names both."""
        return f'"{self.sha256}.{self.version}"'


@dataclass(frozen=True, slots=True)
class AggregateRow:
    day: date
    store_id: str
    type: str
    events: int


@dataclass(slots=True)
class Stats:
    events: int = 0
    customers: int = 0
    stores: int = 0
    erasures: int = 0
    models: int = 0
    credentials: dict[str, int] = field(default_factory=dict)

    def as_json(self) -> dict[str, Any]:
        return {
            "events": self.events,
            "customers": self.customers,
            "stores": self.stores,
            "erasures": self.erasures,
            "models": self.models,
            "credentials": dict(sorted(self.credentials.items())),
        }


@dataclass(frozen=True, slots=True)
class Credential:
    """A credential as ``customer-store token|partner|admin list`` shows it: never the token."""

    id: int
    kind: Kind
    name: str
    store_id: str | None
    scopes: frozenset[str]
    created_at: datetime
    revoked_at: datetime | None  # in the future: still valid until then (a rotation's grace)

    def as_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "kind": self.kind,
            "name": self.name,
            "store_id": self.store_id,
            "scopes": sorted(self.scopes),
            "created_at": format_ts(self.created_at),
            "revoked_at": None if self.revoked_at is None else format_ts(self.revoked_at),
        }


@dataclass(frozen=True, slots=True)
class Interaction:
    """One event of a profile as an agent's model sees it."""

    ts: datetime
    type: str
    sku: str | None
    store_id: str
    event_id: str


@dataclass(frozen=True, slots=True)
class ConsentFacts:
    """What resolving a profile's consent needs (``trust.resolve_consent``)."""

    consent_changes: tuple[ConsentChange, ...]
    history_ids: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class ProfileFacts:
    """A profile as the agents read it: consent facts, newest interactions, counts per sku."""

    consent: ConsentFacts
    interactions: tuple[Interaction, ...]  # newest first
    by_sku: dict[str, int]


@dataclass(frozen=True, slots=True)
class RolloutState:
    """Which model version each store is served: the promoted one, or a canary for a share."""

    current_version: str | None
    canary_version: str | None
    canary_percent: int
    canary_since: datetime | None


@dataclass(frozen=True, slots=True)
class RolloutEntry:
    """One line of the rollout's log: publish, canary, promote, rollback (by hand or not)."""

    id: int
    action: str
    version: str
    percent: int | None
    reason: str
    decided_by: str
    at: datetime

    def as_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "action": self.action,
            "version": self.version,
            "percent": self.percent,
            "reason": self.reason,
            "decided_by": self.decided_by,
            "at": format_ts(self.at),
        }


@dataclass(frozen=True, slots=True)
class ShownRow:
    """A ``suggestion.shown`` event reduced to what fleet acceptance needs."""

    store_id: str
    suggestion_id: str
    data: dict[str, Any]
    accepted_skus: tuple[str | None, ...]  # one per suggestion.accepted event naming it
