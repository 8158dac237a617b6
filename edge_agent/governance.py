"""Governance, one stage: the consent in force per customer, the agent's keys, and the
rules that follow from them (DESIGN "Consent").

Consent: a ``consent.update`` event is read here and nowhere else (``consent_update``). The
``ConsentLedger`` is the one in-memory view the agent decides from: loaded from the buffer's
``consent`` table at start (the durable copy, written in the same transaction as the event),
and updated by the pipeline's governance step before each commit, so a withdrawal is in
force before any later event of that customer can be read back for upload or reach the
personalizer's tap. The personalizer asks it ``allows_personalization``, the uploader
``shares_profile``; the latest update (by event time) wins.

What leaves the store:

The rule, decided per event at upload time from the customer's latest ``consent.update``:
every event is uploaded, but with ``require_consent`` on, a customer without
``profile_sharing`` (or with no consent record at all) leaves the store only as a keyed
pseudonym, ``ps-`` + HMAC-SHA256(pseudonym_key, customer_id) in hex (128 bits). The same
applies to every other id an event names: the ``data`` fields the registry marks
``"identity": true`` (``customer.identified`` ``data.alias``: a loyalty card, an app account)
are pseudonymised with the same key, so the store still links the pseudonyms into one profile
without ever seeing a clear id. Consent is looked up by the event's ``customer_id`` only (an
alias's own consent record does not apply to it).

The decision reads the envelope's structure (its top-level ``customer_id``, its declared
identity fields), never its text, and every string in ``data`` that repeats one of those ids
gets the pseudonym in its place: a device cannot smuggle a clear id out in another field.

The pseudonym is deterministic: the same customer always maps to the same pseudonym, so the
store's profile of a pseudonymised customer is coherent and an erasure request naming the
pseudonym can be matched back to the clear id in the agent's buffer.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import secrets
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, NamedTuple

from cloud_sync.envelope_schema import Registry, default_registry
from edge_agent.config import Config
from edge_agent.errors import ConfigError
from edge_agent.events import Event

log = logging.getLogger(__name__)

KEY_FILE_NAME: Final = "pseudonym.key"
PSEUDONYM_PREFIX: Final = "ps-"
_PSEUDONYM_HEX_CHARS: Final = 32
_MIN_KEY_CHARS: Final = 16
# Derived ids get their own key, so an id never equals a pseudonym of the same input.
_EVENT_ID_LABEL: Final = b"edge-agent/event-id/v1"
# Shorter ids are replaced only where a whole string equals them: "c-1" inside "SKU-c-12"
# would be a false match, and ids that short are not worth hiding inside other words.
_MIN_ID_FOR_SUBSTRING: Final = 6


def pseudonym_key(config: Config) -> bytes:
    """The key from ``governance.pseudonym_key`` (or its env override), else the kept file.

    Generated once (32 random bytes, hex) into ``<data_dir>/pseudonym.key`` with 0600
    permissions and kept: a new key would split every pseudonymised profile in two.
    """
    configured = config.governance.pseudonym_key
    if configured:
        if len(configured) < _MIN_KEY_CHARS:
            raise ConfigError(
                "governance.pseudonym_key", f"must be at least {_MIN_KEY_CHARS} characters"
            )
        return configured.encode("utf-8")
    path = config.data_dir / KEY_FILE_NAME
    if path.exists():
        text = path.read_text("ascii").strip()
        if len(text) < _MIN_KEY_CHARS:
            raise ConfigError("governance.pseudonym_key", f"key file {path} is damaged or empty")
        return text.encode("ascii")
    return _generate_key_file(path)


def event_id_key(config: Config) -> bytes:
    """The key of derived event ids: HMAC(pseudonym key, a label of its own).

    Deterministic per agent (a redelivered message keeps its id across restarts), and
    unknown outside it: the id of a message that names a customer reveals nothing.
    """
    return hmac.new(pseudonym_key(config), _EVENT_ID_LABEL, hashlib.sha256).digest()


def _generate_key_file(path: Path) -> bytes:
    path.parent.mkdir(parents=True, exist_ok=True)
    key = secrets.token_hex(32)
    temporary = path.with_suffix(".tmp")
    # Written whole, fsynced, then renamed: a crash never leaves a half key behind.
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(descriptor, key.encode("ascii"))
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
    os.replace(temporary, path)
    log.info("governance.pseudonym_key.generated path=%s", path)
    return key.encode("ascii")


def pseudonymise(customer_id: str, key: bytes) -> str:
    """A keyed pseudonym: stable for one key, not reversible without it."""
    digest = hmac.new(key, customer_id.encode("utf-8"), hashlib.sha256).hexdigest()
    return PSEUDONYM_PREFIX + digest[:_PSEUDONYM_HEX_CHARS]


class ConsentRecord(NamedTuple):
    """One customer's consent as the buffer's ``consent`` table keeps it."""

    customer_id: str
    personalization: bool
    profile_sharing: bool
    partner_sharing: bool
    ts: str  # the event's time (RFC 3339, one format: strings compare in time order)
    event_id: str


def consent_update(
    event_type: object, customer_id: object, data: object, ts: object, event_id: object
) -> ConsentRecord | None:
    """The consent a ``consent.update`` envelope states; None for any other envelope."""
    if event_type != "consent.update" or not isinstance(data, dict):
        return None
    if not isinstance(customer_id, str) or not customer_id:
        return None
    return ConsentRecord(
        customer_id,
        bool(data.get("personalization")),
        bool(data.get("profile_sharing")),
        bool(data.get("partner_sharing")),
        str(ts),
        str(event_id),
    )


def consent_of(event: Event) -> ConsentRecord | None:
    return consent_update(event.type, event.customer_id, event.data, event.ts, event.event_id)


class CentralGrant(NamedTuple):
    """The central store's consent for a customer with no local record: a fetched profile
    whose store-resolved consent allows personalization and profile sharing (buffer table
    ``central_consent``). It lets the customer's events committed after ``after_seq`` leave
    the store with the clear id; the events committed before it stay pseudonymised."""

    customer_id: str
    ts: str  # when the profile said yes (RFC 3339, UTC)
    after_seq: int  # the newest buffered event when it was granted


@dataclass(frozen=True, slots=True)
class _Flags:
    ts: str
    personalization: bool
    profile_sharing: bool


class ConsentLedger:
    """The consent in force per customer (customer id → latest flags), kept on the event
    loop and read by the inference and upload threads (one dict lookup each)."""

    def __init__(self, require_consent: bool) -> None:
        self.require_consent = require_consent
        self._latest: dict[str, _Flags] = {}
        self._central: dict[str, CentralGrant] = {}

    def __len__(self) -> int:
        return len(self._latest)

    def load(self, records: Iterable[ConsentRecord]) -> None:
        for record in records:
            self._apply(record)

    def observe(self, events: Sequence[Event]) -> None:
        """The governance step of the pipeline: apply the consent updates among ``events``."""
        for event in events:
            if event.type == "consent.update" and (record := consent_of(event)) is not None:
                self._apply(record)

    def forget(self, customer_id: str) -> None:
        """An erased customer: as if no consent record had ever been seen."""
        self._latest.pop(customer_id, None)
        self._central.pop(customer_id, None)

    def load_central(self, grants: Iterable[CentralGrant]) -> None:
        for grant in grants:
            self.grant_central(grant)

    def grant_central(self, grant: CentralGrant) -> bool:
        """Apply the central store's consent; refused (False) for a pseudonym or when a local
        record exists (a local record, even an older one, always wins)."""
        if grant.customer_id.startswith(PSEUDONYM_PREFIX) or grant.customer_id in self._latest:
            return False
        self._central[grant.customer_id] = grant
        return True

    def revoke_central(self, customer_id: str) -> bool:
        """The central store withdrew it: in force for the next row read for upload."""
        return self._central.pop(customer_id, None) is not None

    def central_grant(self, customer_id: str) -> CentralGrant | None:
        return self._central.get(customer_id)

    @property
    def central_grants(self) -> int:
        return len(self._central)

    def allows_personalization(self, customer_id: str) -> bool:
        known = self._latest.get(customer_id)
        return not self.require_consent if known is None else known.personalization

    def shares_profile(self, customer_id: str | None, seq: int | None = None) -> bool:
        """Whether a customer's id may leave the store in clear: the local record decides;
        without one, a central grant does for the buffered event ``seq`` committed after it
        (no ``seq``: no central grant applies)."""
        if not self.require_consent:
            return True
        if not customer_id:
            return False
        known = self._latest.get(customer_id)
        if known is not None:
            return known.profile_sharing
        grant = self._central.get(customer_id)
        return grant is not None and seq is not None and seq > grant.after_seq

    def has_record(self, customer_id: str) -> bool:
        """Whether a consent update of this customer was seen here (or loaded)."""
        return customer_id in self._latest

    def profile_fetch_allowed(self, customer_id: str) -> bool:
        """Whether the agent may ask the central store for this customer's profile: not when
        the local record withholds personalization or profile sharing. Without a local record
        the store decides (it answers 404 unless its resolved consent allows sharing)."""
        known = self._latest.get(customer_id)
        return (
            known is None
            or not self.require_consent
            or (known.personalization and known.profile_sharing)
        )

    def _apply(self, record: ConsentRecord) -> bool:
        known = self._latest.get(record.customer_id)
        if known is not None and record.ts < known.ts:
            return False  # an older update arriving late changes nothing
        self._latest[record.customer_id] = _Flags(
            record.ts, record.personalization, record.profile_sharing
        )
        self._central.pop(record.customer_id, None)  # a local record wins from now on
        return True


def pseudonymise_envelope(envelope_json: str, key: bytes, registry: Registry | None = None) -> str:
    """The envelope with every id it names, wherever it repeats, replaced by its pseudonym.

    The ids are its top-level ``customer_id`` and the ``data`` fields ``registry`` (default:
    the shipped one) marks as identities for its type.
    """
    envelope: dict[str, Any] = json.loads(envelope_json)
    event_type = envelope.get("type")
    identity_fields = (registry or default_registry()).identity_fields(
        event_type if isinstance(event_type, str) else ""
    )
    clear: dict[str, str] = {}
    customer_id = envelope.get("customer_id")
    if isinstance(customer_id, str) and customer_id:
        clear[customer_id] = envelope["customer_id"] = pseudonymise(customer_id, key)
    data = envelope.get("data")
    if isinstance(data, dict):
        for name in identity_fields & data.keys():
            value = data[name]
            if isinstance(value, str) and value:
                clear[value] = pseudonymise(value, key)
        if clear:  # the longest first: an id inside another must not break its replacement
            longest_first = dict(sorted(clear.items(), key=lambda item: -len(item[0])))
            envelope["data"] = _replace_ids(data, longest_first)
    return json.dumps(envelope, separators=(",", ":"), ensure_ascii=False)


def _replace_ids(value: Any, clear: dict[str, str]) -> Any:
    """``value`` with each clear id in any string (keys too) replaced by its pseudonym."""
    if isinstance(value, str):
        if value in clear:
            return clear[value]
        for text, pseudonym in clear.items():
            if len(text) >= _MIN_ID_FOR_SUBSTRING and text in value:
                value = value.replace(text, pseudonym)
        return value
    if isinstance(value, dict):
        return {_replace_ids(k, clear): _replace_ids(v, clear) for k, v in value.items()}
    if isinstance(value, list):
        return [_replace_ids(element, clear) for element in value]
    return value
