"""The trust model for consent and identity: which claims of an agent the store believes.

Any agent token can post any envelope for its store, so a compromised store box can claim
anything about any customer id. The rules here keep one forged message from winning:

- Consent of one id: a flag is on only when the latest ``consent.update`` the store
  *received* grants it and every withdrawal of it is dated before that grant. A withdrawal
  received later wins at once, whatever its date; an old grant arriving from a backlog does
  not undo a newer withdrawal; far-future dates are refused at ingest (``ts_in_future``).
- Consent of a profile (linked ids): the most restrictive value. Every id with a history
  of its own counts, and an id with a history but no consent record counts as "no".
- Links (``customer.identified`` with ``data.alias``): only from declared identifier kinds
  (``data.method``). Two profiles that both have a history are never merged on one store's
  word, and an id is never attached to a history the asserting store has not seen itself;
  such links are held until a second store asserts the same link or an operator applies
  them (``customer-store audit apply``).

Every consent and link change is recorded with its origin in ``identity_changes`` and can be
undone. Pure functions: the backends fetch the facts and apply the decision.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final

from cloud_sync.store.errors import AuditError
from cloud_sync.store.records import ConsentChange

CONSENT_FLAGS: Final = ("personalization", "profile_sharing", "partner_sharing")
# Identifier kinds a link may come from: things a customer presents, not free text.
DEFAULT_LINK_METHODS: Final = frozenset({"loyalty_card", "card", "app", "web", "kiosk_login"})

APPLIED: Final = "applied"
HELD: Final = "held"
REFUSED: Final = "refused"
UNDONE: Final = "undone"


@dataclass(frozen=True, slots=True)
class ResolvedConsent:
    flags: dict[str, bool]
    updated_at: datetime  # the newest event time among the changes that count


@dataclass(frozen=True, slots=True)
class LinkFacts:
    """What the store knows about the two sides of a link when it arrives."""

    method: str | None
    store_id: str  # the asserting store
    same_profile: bool
    stores_a: Collection[str]  # stores where side a's profile has a history of its own
    stores_b: Collection[str]
    corroborated: bool  # another store asserted the same link and it is held


def resolve_consent(
    changes: Iterable[ConsentChange], history_ids: Iterable[str]
) -> ResolvedConsent | None:
    """A profile's consent from its ids' applied changes; None when none has any record."""
    by_id: dict[str, list[ConsentChange]] = {}
    for change in changes:
        by_id.setdefault(change.customer_id, []).append(change)
    if not by_id:
        return None
    counted = set(history_ids) | set(by_id)
    flags = {
        flag: all(_id_allows(by_id.get(cid, []), flag) for cid in counted) for flag in CONSENT_FLAGS
    }
    updated_at = max(c.event_ts for changes_ in by_id.values() for c in changes_)
    return ResolvedConsent(flags, updated_at)


def _id_allows(changes: list[ConsentChange], flag: str) -> bool:
    """On only when the last change received grants it and every withdrawal is dated before
    that grant: a withdrawal wins on receipt whatever its date, and an old grant arriving
    late (or a grant dated ahead and then withdrawn) cannot reopen what was withdrawn."""
    if not changes:
        return False  # a history without any consent record: no
    grant = max(changes, key=lambda c: c.change_id)
    if not _flag(grant.flags, flag):
        return False
    return all(c.event_ts < grant.event_ts for c in changes if not _flag(c.flags, flag))


def _flag(flags: Mapping[str, Any], flag: str) -> bool:
    return flags.get(flag) is True


def decide_link(facts: LinkFacts, methods: Collection[str]) -> tuple[str, str]:
    """(status, reason) for a new link: applied, held (may be applied later) or refused."""
    if facts.method not in methods:
        return REFUSED, "undeclared_method"
    if facts.same_profile:
        return APPLIED, "already_linked"
    if facts.corroborated:
        return APPLIED, "corroborated"
    if facts.stores_a and facts.stores_b:
        return HELD, "merges_established_profiles"
    established = facts.stores_a or facts.stores_b
    if established and facts.store_id not in established:
        return HELD, "history_unseen_by_store"
    return APPLIED, ""


def transition(kind: str, status: str, action: str) -> tuple[str, str | None]:
    """An operator's ``undo`` or ``apply`` of one change: its new status, and whether the
    link edge is to be added or removed (None: no edge changes)."""
    if action == "undo" and status in (APPLIED, HELD):
        return UNDONE, "remove" if kind == "link" and status == APPLIED else None
    if action == "apply" and status in (HELD, UNDONE, REFUSED):
        return APPLIED, "add" if kind == "link" else None
    raise AuditError(f"cannot {action} a {kind} change that is {status}")
