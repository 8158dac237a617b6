"""Blinded erasure entries: the store tells each agent only what that agent can recognise.

An erased customer id goes to an agent as ``HMAC-SHA256(k, id)`` (hex, 32 characters) where
``k = sha256(the agent's token)``: the agent knows its token, the store keeps only its sha256,
nobody else has either. The agent blinds every id it holds (clear, and its pseudonym) with
the same key and erases the ones that match. The feed one agent reads says nothing usable to
another agent, a proxy log or a partner; the clear ids stay in the store's ``erasures`` table
(they stop late uploads). A holder of the token can still test guesses one id at a time, as it
could by asking for the id's profile: blinding hides the list, not an id the agent can guess.

Shared by the store (``cloud_sync.store.app``) and the agent (``cloud_sync.sync_downlink``).
"""

from __future__ import annotations

import hashlib
import hmac
from typing import Final

BLINDED_HEX_CHARS: Final = 32


def blinding_key(token: str) -> bytes:
    """The per-credential key: sha256 of the bearer token (what the store stores, as bytes)."""
    return hashlib.sha256(token.encode("utf-8")).digest()


def blind(key: bytes, customer_id: str) -> str:
    return hmac.new(key, customer_id.encode("utf-8"), hashlib.sha256).hexdigest()[
        :BLINDED_HEX_CHARS
    ]
