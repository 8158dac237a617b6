"""The one small interface both databases implement, and the ``--db`` URL that picks one.

``sqlite:///abs/path`` or ``sqlite:relative/path`` is the embedded default; ``postgresql://...``
(or ``postgres://``) is the real deployment. Both apply the same versioned migrations on open.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import date, datetime
from typing import Final, Protocol

from cloud_sync.store.acceptance import Performance
from cloud_sync.store.errors import DatabaseUrlError, MissingExtraError
from cloud_sync.store.fleet import Heartbeat
from cloud_sync.store.records import (
    AggregateRow,
    ConsentFacts,
    Credential,
    CustomerFacts,
    Erasure,
    EventRow,
    IdentityChange,
    IngestCounts,
    Kind,
    ModelRecord,
    Principal,
    ProfileFacts,
    RolloutEntry,
    RolloutState,
    Stats,
    StoredEvent,
)
from cloud_sync.store.rollout import RolloutDecision

# A rollout decision: from the state and the log (oldest first), the new state and log line.


class Backend(Protocol):
    """Everything the service asks of its database. Every multi-row write is one transaction."""

    async def ping(self) -> None: ...

    async def ingest(
        self, rows: Sequence[EventRow], now: datetime, credential_id: int | None = None
    ) -> IngestCounts:
        """Insert new events (by store_id and event_id), drop events of erased customers, and
        record their consent and link changes with their origin, applying links only as the
        trust model allows (``trust``)."""
        ...

    async def find_principal(self, token_hash: str) -> Principal | None: ...

    async def add_credential(
        self, kind: Kind, name: str, store_id: str | None, scopes: Sequence[str], token_hash: str
    ) -> int: ...

    async def identities(self, customer_id: str) -> list[str]:
        """Every id linked to ``customer_id`` (itself included) by ``customer.identified``."""
        ...

    async def customer_facts(self, ids: Sequence[str], recent: int) -> CustomerFacts | None: ...

    async def customer_events(
        self, ids: Sequence[str], after: tuple[datetime, int] | None, limit: int
    ) -> list[StoredEvent]:
        """Events of these ids ordered by (ts, seq), strictly after the cursor."""
        ...

    async def erase(self, ids: Sequence[str], requested_by: str, now: datetime) -> int:
        """Delete the ids' events and links, record one erasure per id; returns events deleted."""
        ...

    async def erasures(
        self, after: int, limit: int, *, agent_reports: bool = True
    ) -> list[Erasure]:
        """Erasures after a cursor; ``agent_reports=False`` leaves out the pseudonyms agents
        reported (each is one agent's own name for a customer: noise to every agent, and the
        reporting agent would match a returning customer again and again)."""
        ...

    async def erasure_exists(self, seq: int) -> bool: ...

    async def erase_pseudonyms(
        self, store_id: str, pseudonyms: Sequence[str], requested_by: str, now: datetime
    ) -> int:
        """Delete one store's events of these pseudonyms (and their links), record them as
        erased so a late upload stays out; returns events deleted."""
        ...

    async def pseudonymise(self, store_id: str, pairs: Sequence[tuple[str, str]]) -> int:
        """Rewrite one store's events of each clear id (and aliases naming it) to its
        pseudonym and rebuild the links those events made; returns events rewritten."""
        ...

    async def credentials(self, kind: Kind) -> list[Credential]: ...

    async def agent_keys(self) -> list[tuple[str, str]]:
        """``(store_id, token_hash)`` of every agent credential valid now (a rotation's old
        token included until its grace ends): the keys erasure notices are blinded with."""
        ...

    async def credential(self, kind: Kind, credential_id: int) -> Credential | None: ...

    async def revoke_credential(self, kind: Kind, credential_id: int, at: datetime) -> bool:
        """Revoked from ``at`` (now, or later for a grace period); False: no such active one."""
        ...

    async def audit(self, customer_id: str | None, limit: int) -> list[IdentityChange]:
        """Consent and link changes (of one id, as either side), oldest first."""
        ...

    async def decide_change(
        self, change_id: int, action: str, decided_by: str, now: datetime
    ) -> IdentityChange:
        """An operator's ``undo`` or ``apply`` of one change; AuditError when it does not apply."""
        ...

    async def publish_model(self, record: ModelRecord, artifact: bytes, now: datetime) -> bool:
        """Store a model version; False when that version already holds the same sha256."""
        ...

    async def latest_model(self) -> ModelRecord | None: ...

    async def model(self, version: str) -> tuple[ModelRecord, bytes] | None: ...

    async def aggregates(
        self, since: date | None, until: date | None, store_id: str | None
    ) -> list[AggregateRow]: ...

    async def stats(self) -> Stats: ...

    # ---- the fleet view (cloud_sync.store.fleet) ----

    async def record_heartbeat(self, heartbeat: Heartbeat) -> None:
        """Keep ``heartbeat`` as its store's latest (replacing an older one)."""
        ...

    async def heartbeats(self) -> list[Heartbeat]:
        """The latest heartbeat of every agent that ever sent one."""
        ...

    async def consent_facts(self, ids: Sequence[str]) -> ConsentFacts:
        """The applied consent changes of these ids and which of them have a history."""
        ...

    async def profile_facts(
        self, customer_id: str, types: Sequence[str], limit: int
    ) -> ProfileFacts:
        """The profile of ``customer_id`` as agents see it, pseudonyms left out of its ids:
        consent facts, the newest ``limit`` events of ``types``, their counts per sku."""
        ...

    async def feed_high_water(self) -> int:
        """The highest event seq below which no ingest in progress can still add a row."""
        ...

    async def events_after(
        self, after: int, upto: int | None, limit: int, since: datetime | None = None
    ) -> list[StoredEvent]:
        """Events of identified customers with after < seq <= upto, in seq order; with
        ``since`` only those dated since then, and every consent.update."""
        ...

    async def model_record(self, version: str) -> ModelRecord | None: ...

    async def rollout(self) -> RolloutState: ...

    async def rollout_log(self, limit: int) -> list[RolloutEntry]:
        """The newest ``limit`` rollout changes, newest first."""
        ...

    async def update_rollout(
        self, decide: RolloutDecision, decided_by: str, now: datetime
    ) -> RolloutEntry:
        """Apply ``decide`` to the state in one transaction and log it; RolloutError passes."""
        ...

    async def shown_performance(self, version: str, since: datetime | None) -> Performance:
        """Fleet acceptance of a model version from its suggestion.shown events (since a
        time) and their acceptances, streamed through ``acceptance.Tally``."""
        ...

    async def close(self) -> None: ...


def sqlite_path(url: str) -> str | None:
    """The file path of a ``sqlite:`` URL, or None when the URL is not one."""
    if url.startswith("sqlite://"):
        return url.removeprefix("sqlite://") or None
    if url.startswith("sqlite:"):
        return url.removeprefix("sqlite:") or None
    return None


_POSTGRES_DRIVER: Final = frozenset({"psycopg", "psycopg_pool"})


def is_postgres(url: str) -> bool:
    return url.startswith(("postgresql://", "postgres://"))


async def open_backend(url: str, *, pool_size: int = 10) -> Backend:
    """Open the database named by ``url`` and bring its schema up to date."""
    # Imported here so that a run loads only the driver it uses.
    path = sqlite_path(url)
    if path is not None:
        from cloud_sync.store.db_sqlite import SqliteBackend

        return await SqliteBackend.open(path)
    if is_postgres(url):
        try:
            from cloud_sync.store.db_postgres import PostgresBackend
        except ModuleNotFoundError as exc:  # psycopg is the [store] extra
            if exc.name not in _POSTGRES_DRIVER:
                raise
            raise MissingExtraError(exc.name, "store") from exc

        return await PostgresBackend.open(url, pool_size=pool_size)
    raise DatabaseUrlError(url, "expected sqlite:///path or postgresql://...")
