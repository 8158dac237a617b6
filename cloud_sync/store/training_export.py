"""``customer-store training export``: consented events as JSON Lines for ``edge-models train``.

Only customers whose profile's consent, resolved by the trust model (``trust``), allows
personalization: a customer without any consent record, or with a withdrawal, is left out
(DESIGN "Consent"). Each event is written under its profile's id (the smallest clear id
of the linked ids), so a loyalty card and an app account train as one customer. With
``--since`` only events dated since then are written, but every consent.update of an exported
profile is, so the trainer sees each customer's consent. Events are read in pages in store
order; memory holds one page and one verdict per customer met.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Final

from cloud_sync.store import profiles
from cloud_sync.store.backend import Backend
from cloud_sync.store.errors import StoreError

log = logging.getLogger(__name__)
PAGE: Final = 5000


class ExportError(StoreError):
    """The export file cannot be written."""


@dataclass(slots=True)
class ExportSummary:
    events: int = 0
    customers: int = 0
    excluded_customers: int = 0
    skipped_events: int = 0  # events of excluded customers

    def as_json(self) -> dict[str, int]:
        return {
            "events": self.events,
            "customers": self.customers,
            "excluded_customers": self.excluded_customers,
            "skipped_events": self.skipped_events,
        }


class _Profiles:
    """Each customer id's profile id, or None when the profile may not be trained on."""

    def __init__(self, backend: Backend) -> None:
        self._backend = backend
        self._verdicts: dict[str, str | None] = {}

    async def profile_id(self, customer_id: str) -> tuple[str | None, bool]:
        """(profile id or None, whether this id was met for the first time)."""
        if customer_id in self._verdicts:
            return self._verdicts[customer_id], False
        ids = await self._backend.identities(customer_id)
        # A pseudonym is its own profile: it never joins a clear id's.
        if not profiles.is_pseudonym(customer_id):
            ids = [i for i in ids if not profiles.is_pseudonym(i)]
        else:
            ids = [customer_id]
        flags = profiles.resolved_flags(await self._backend.consent_facts(ids))
        verdict = min(ids) if flags is not None and flags["personalization"] else None
        self._verdicts[customer_id] = verdict
        return verdict, True


async def export(backend: Backend, out: Path, since: datetime | None) -> ExportSummary:
    """Write the export to ``out`` (through a temporary file, renamed when complete)."""
    summary = ExportSummary()
    verdicts = _Profiles(backend)
    exported: set[str] = set()
    temporary = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        with temporary.open("w", encoding="utf-8") as handle:
            cursor = 0
            while True:
                events = await backend.events_after(cursor, None, PAGE, since)
                if not events:
                    break
                cursor = events[-1].seq
                for event in events:
                    customer_id = str(event.envelope["customer_id"])
                    profile_id, first = await verdicts.profile_id(customer_id)
                    if profile_id is None:
                        summary.excluded_customers += first
                        summary.skipped_events += 1
                        continue
                    exported.add(profile_id)
                    envelope = dict(event.envelope, customer_id=profile_id)
                    handle.write(json.dumps(envelope, separators=(",", ":")) + "\n")
                    summary.events += 1
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, out)
    except OSError as exc:
        temporary.unlink(missing_ok=True)
        raise ExportError(f"{out}: cannot write: {exc.strerror}") from exc
    summary.customers = len(exported)
    log.info(
        "store.training.exported events=%d customers=%d excluded=%d",
        summary.events,
        summary.customers,
        summary.excluded_customers,
    )
    return summary
