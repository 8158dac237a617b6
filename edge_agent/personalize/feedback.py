"""What happened to the suggestions shown: accepted, dismissed, or taken without a word.

Explicit feedback arrives as ``suggestion.accepted`` / ``suggestion.dismissed`` events from the
devices. Implicit acceptance: when a customer picks up (scans, adds) an item that was
suggested to them within the window, the personalizer records a ``suggestion.accepted``
event with ``implicit: true``. Each suggestion is counted accepted at most once, under the
model version (or the fallback) that produced it, for the acceptance rate per version.
Lives on the event loop; bounded by ``MAX_TRACKED`` suggestions.
"""

from __future__ import annotations

import collections
import time
from dataclasses import dataclass, field
from typing import Any, Final

# Suggestions remembered for feedback, the oldest forgotten first (counted: ``evicted``).
# About 480 bytes each; 5,000 is over an hour at a suggestion a second, far beyond the
# implicit-acceptance window, and 2.4 MB (20,000 was 9.7 MB: benchmarks/memory.py).
MAX_TRACKED: Final = 5_000
MAX_PER_CUSTOMER: Final = 8  # recent suggestions per customer checked for implicit acceptance
UNKNOWN_VERSION: Final = "unknown"  # feedback about a suggestion we no longer remember


@dataclass(slots=True)  # thousands of them: slots save about 50 bytes each
class Shown:
    suggestion_id: str
    customer_id: str
    skus: tuple[str, ...]
    version_key: str  # the model version, or the fallback's name
    shown_monotonic: float
    accepted: bool = False
    dismissed: bool = False


@dataclass
class VersionCounts:
    shown: int = 0
    accepted: int = 0
    implicit: int = 0
    dismissed: int = 0

    def as_dict(self) -> dict[str, Any]:
        rate = self.accepted / self.shown if self.shown else 0.0
        return {
            "shown": self.shown,
            "accepted": self.accepted,
            "implicit_accepted": self.implicit,
            "dismissed": self.dismissed,
            "acceptance_rate": round(rate, 4),
        }


@dataclass
class FeedbackBook:
    window_s: float
    by_version: dict[str, VersionCounts] = field(default_factory=dict)
    _shown: collections.OrderedDict[str, Shown] = field(default_factory=collections.OrderedDict)
    # Lists, not deques: a deque costs 760 bytes however short (one per customer).
    _by_customer: dict[str, list[Shown]] = field(default_factory=dict)
    evicted: int = 0  # suggestions forgotten to keep the bound (MAX_TRACKED), oldest first

    def record_shown(self, shown: Shown) -> None:
        self._counts(shown.version_key).shown += 1
        self._shown[shown.suggestion_id] = shown
        recent = self._by_customer.setdefault(shown.customer_id, [])
        recent.append(shown)
        if len(recent) > MAX_PER_CUSTOMER:
            del recent[0]
        while len(self._shown) > MAX_TRACKED:
            _, old = self._shown.popitem(last=False)
            self.evicted += 1
            older = self._by_customer.get(old.customer_id)
            if older is not None and older and older[0] is old:
                del older[0]
                if not older:
                    del self._by_customer[old.customer_id]

    def implicit_match(self, customer_id: str, sku: str, now: float | None = None) -> Shown | None:
        """The newest suggestion to this customer, within the window, that offered ``sku``."""
        if self.window_s <= 0:
            return None
        recent = self._by_customer.get(customer_id)
        if not recent:
            return None
        now = time.monotonic() if now is None else now
        for shown in reversed(recent):
            if now - shown.shown_monotonic > self.window_s:
                break
            if not shown.accepted and sku in shown.skus:
                return shown
        return None

    def accepted(self, suggestion_id: str, implicit: bool) -> bool:
        """Count an acceptance once per suggestion; returns whether it was counted."""
        shown = self._shown.get(suggestion_id)
        if shown is None:
            counts = self._counts(UNKNOWN_VERSION)
        elif shown.accepted:
            return False
        else:
            shown.accepted = True
            counts = self._counts(shown.version_key)
        counts.accepted += 1
        counts.implicit += int(implicit)
        return True

    def dismissed(self, suggestion_id: str) -> bool:
        shown = self._shown.get(suggestion_id)
        if shown is not None and (shown.dismissed or shown.accepted):
            return False
        if shown is not None:
            shown.dismissed = True
        self._counts(shown.version_key if shown else UNKNOWN_VERSION).dismissed += 1
        return True

    def was_accepted(self, suggestion_id: str) -> bool | None:
        """Whether a tracked suggestion was taken; None once it is no longer tracked."""
        shown = self._shown.get(suggestion_id)
        return None if shown is None else shown.accepted

    def forget_customer(self, customer_id: str) -> None:
        self._by_customer.pop(customer_id, None)

    def totals(self) -> VersionCounts:
        total = VersionCounts()
        for counts in self.by_version.values():
            total.shown += counts.shown
            total.accepted += counts.accepted
            total.implicit += counts.implicit
            total.dismissed += counts.dismissed
        return total

    def _counts(self, key: str) -> VersionCounts:
        counts = self.by_version.get(key)
        if counts is None:
            counts = self.by_version[key] = VersionCounts()
        return counts
