"""Credentials and who may do what.

Four kinds of bearer credential, one table: an agent token (one store; uploads events, reads
erasures, models and consented profiles), a channel token (a web shop, an app, a call centre,
a partner brand: uploads like an agent, with ``store_id`` = the channel's name), a partner key
(scopes ``profiles:read``, ``aggregates:read``, ``events:read``) and an admin key (reads every
profile, erases customers). Only the sha256 of a token is stored: a
token is 32 random bytes, so a plain hash is enough and lookups stay one indexed query.

Credentials are listed (never their secret), revoked and rotated here. Every request looks its
token up in the database, so a revocation holds from the next request on, on every instance.
A rotation makes a new credential with the same kind, name, store and scopes and revokes the
old one at once, or after a grace period (``revoked_at`` in the future) so that the agents can
be given the new token first.
"""

from __future__ import annotations

import hashlib
import logging
import secrets
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Final

from cloud_sync.envelope_schema import MAX_ID_LENGTH
from cloud_sync.store.backend import Backend
from cloud_sync.store.records import (
    PARTNER_SCOPES,
    SCOPE_AGGREGATES,
    SCOPE_EVENTS,
    SCOPE_PROFILES,
    Credential,
    Kind,
    Principal,
)

log = logging.getLogger(__name__)

# The prefix tells a person (and a secret scanner) what a leaked string is; it is not trusted.
TOKEN_PREFIX: Final[dict[Kind, str]] = {
    "agent": "cst_agent_",
    "partner": "cst_partner_",
    "admin": "cst_admin_",
    "channel": "cst_channel_",
}
MAX_TOKEN_LENGTH: Final = 200


class CredentialError(ValueError):
    """A credential cannot be created as asked (unknown scope, missing store)."""


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def new_token(kind: Kind) -> str:
    return TOKEN_PREFIX[kind] + secrets.token_urlsafe(32)


def bearer_token(header: str | None) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header, or None."""
    if not header:
        return None
    scheme, _, token = header.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token or len(token) > MAX_TOKEN_LENGTH:
        return None
    return token


async def authenticate(backend: Backend, header: str | None) -> Principal | None:
    token = bearer_token(header)
    if token is None:
        return None
    return await backend.find_principal(hash_token(token))


async def create_credential(
    backend: Backend,
    kind: Kind,
    *,
    name: str,
    store_id: str | None = None,
    scopes: Sequence[str] = (),
) -> str:
    """Store a new credential and return its token: the only time the token exists in clear.

    A channel's events carry its name as ``store_id``; that name must not be a store's."""
    if kind == "channel":
        if not 0 < len(name) <= MAX_ID_LENGTH or name != name.strip() or "\x00" in name:
            raise CredentialError(f"a channel name is 1..{MAX_ID_LENGTH} characters, no padding")
        if any(c.store_id == name for c in await backend.credentials("agent")):
            raise CredentialError(f"{name!r} is a store's id; a channel needs a name of its own")
        store_id = name
    elif kind == "agent" and not store_id:
        raise CredentialError("an agent token needs --store")
    elif kind == "agent" and any(c.name == store_id for c in await backend.credentials("channel")):
        raise CredentialError(f"{store_id!r} is a channel's name; a store needs an id of its own")
    elif kind != "agent" and store_id:
        raise CredentialError("only agent tokens belong to a store")
    unknown = sorted(set(scopes) - PARTNER_SCOPES)
    if unknown:
        raise CredentialError(f"unknown scopes {unknown}; known: {sorted(PARTNER_SCOPES)}")
    if kind == "partner" and not scopes:
        raise CredentialError("a partner key needs at least one --scope")
    if kind != "partner" and scopes:
        raise CredentialError("only partner keys carry scopes")
    token = new_token(kind)
    credential_id = await backend.add_credential(kind, name, store_id, scopes, hash_token(token))
    log.info("store.credential.created id=%d kind=%s name=%s", credential_id, kind, name)
    return token


async def list_credentials(backend: Backend, kind: Kind) -> list[Credential]:
    return await backend.credentials(kind)


async def revoke_credential(
    backend: Backend, kind: Kind, credential_id: int, *, grace: timedelta = timedelta(0)
) -> datetime:
    """Revoke now (or after ``grace``); returns when it stops working."""
    at = datetime.now(UTC) + grace
    if not await backend.revoke_credential(kind, credential_id, at):
        raise CredentialError(f"no active {kind} credential with id {credential_id}")
    log.info("store.credential.revoked id=%d kind=%s at=%s", credential_id, kind, at.isoformat())
    return at


async def rotate_credential(
    backend: Backend, kind: Kind, credential_id: int, *, grace: timedelta = timedelta(0)
) -> str:
    """A new credential like the old one; the old one is revoked (after ``grace``). Returns
    the new token: the only time it exists in clear."""
    old = await backend.credential(kind, credential_id)
    now = datetime.now(UTC)
    if old is None or (old.revoked_at is not None and old.revoked_at <= now):
        raise CredentialError(f"no active {kind} credential with id {credential_id}")
    # Made first: if the revocation then fails, the old token still works and nothing is lost.
    token = await create_credential(
        backend, kind, name=old.name, store_id=old.store_id, scopes=sorted(old.scopes)
    )
    await revoke_credential(backend, kind, credential_id, grace=grace)
    return token


def may_upload(principal: Principal) -> bool:
    """Agents for their store, channels under their own name."""
    return principal.kind in ("agent", "channel")


def may_read_feeds(principal: Principal) -> bool:
    """Erasure feed and model downloads: the agents and channels, and admins for inspection."""
    return principal.kind in ("agent", "channel", "admin")


def may_fetch_profiles(principal: Principal) -> bool:
    """GET /v1/profiles: what an agent (or channel) personalises with, consent-gated."""
    return principal.kind in ("agent", "channel", "admin")


def may_read_events(principal: Principal) -> bool:
    """The partners' live feed (GET /v1/feed); admins read it too, with the same consent rule."""
    return principal.kind == "admin" or (
        principal.kind == "partner" and SCOPE_EVENTS in principal.scopes
    )


def may_read_profiles(principal: Principal) -> bool:
    """Admins read every profile; partners with profiles:read only consented ones."""
    return principal.kind == "admin" or (
        principal.kind == "partner" and SCOPE_PROFILES in principal.scopes
    )


def needs_partner_consent(principal: Principal) -> bool:
    return principal.kind != "admin"


def may_read_aggregates(principal: Principal) -> bool:
    return principal.kind == "admin" or (
        principal.kind == "partner" and SCOPE_AGGREGATES in principal.scopes
    )


def may_erase(principal: Principal) -> bool:
    return principal.kind == "admin"


def is_admin(principal: Principal) -> bool:
    return principal.kind == "admin"
