"""What the personalizer may use and show: consent per customer, and masked skus.

Consent (DESIGN.md, "Consent"): the latest ``consent.update`` per customer wins. With
``require_consent`` an unknown customer has no personalization consent; without it, only an
explicit ``personalization: false`` opts a customer out.

Masks: out-of-stock and policy-blocked skus come from two plain text files (one sku per line,
``#`` comments), re-read when they change, so a store system or a person can update them
without a restart. The basket and the picked item are masked per request by the caller.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from edge_agent.events import Event

log = logging.getLogger(__name__)


class ConsentBook:
    """customer id → personalization allowed, kept current from consent.update events."""

    def __init__(self, require_consent: bool) -> None:
        self.require_consent = require_consent
        self._latest: dict[str, tuple[str, bool]] = {}  # customer → (ts, personalization)

    def allows(self, customer_id: str) -> bool:
        known = self._latest.get(customer_id)
        if known is None:
            return not self.require_consent
        return known[1]

    def update(self, customer_id: str, ts: str, personalization: bool) -> bool:
        """Apply one consent; returns whether it was the latest (and so took effect)."""
        known = self._latest.get(customer_id)
        # RFC 3339 strings in one format (events.format_ts) compare in time order.
        if known is not None and ts < known[0]:
            return False
        self._latest[customer_id] = (ts, personalization)
        return True

    def observe(self, event: Event) -> bool | None:
        """Apply a consent.update event; the new personalization value, or None."""
        if event.type != "consent.update" or event.customer_id is None:
            return None
        allowed = bool(event.data.get("personalization"))
        if not self.update(event.customer_id, event.ts, allowed):
            return None
        return allowed

    def load(self, rows: Iterable[tuple[str, str, bool]]) -> None:
        for customer_id, ts, personalization in rows:
            self.update(customer_id, ts, bool(personalization))


@dataclass
class _WatchedFile:
    path: Path
    signature: tuple[int, int] | None = None  # (mtime_ns, size) when last read
    skus: frozenset[str] = frozenset()


class MaskFiles:
    """Out-of-stock and blocked skus from text files; ``refresh()`` runs off the loop."""

    def __init__(self, *paths: Path) -> None:
        self._files = [_WatchedFile(path) for path in paths]
        self.skus: frozenset[str] = frozenset()  # replaced whole: readers never see a half set

    def refresh(self) -> bool:
        """Re-read the files that changed; returns whether the mask changed."""
        changed = False
        for watched in self._files:
            try:
                stat = watched.path.stat()
            except FileNotFoundError:
                changed |= bool(watched.skus)
                watched.signature, watched.skus = None, frozenset()
                continue
            signature = (stat.st_mtime_ns, stat.st_size)
            if signature == watched.signature:
                continue
            watched.signature = signature
            try:
                text = watched.path.read_text("utf-8")
            except (OSError, UnicodeDecodeError) as exc:
                log.warning("mask.file.unreadable path=%s error=%r", watched.path, exc)
                continue
            watched.skus = frozenset(_skus(text))
            changed = True
            log.info("mask.file.loaded path=%s skus=%d", watched.path, len(watched.skus))
        if changed:
            self.skus = frozenset().union(*(watched.skus for watched in self._files))
        return changed


def _skus(text: str) -> list[str]:
    lines = (line.split("#", 1)[0].strip() for line in text.splitlines())
    return [line for line in lines if line]
