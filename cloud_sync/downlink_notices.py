"""The NATS downlink's messages: erasure notices and model announcements for one store.

The central store's announcer (``cloud_sync.store.nats_announce``) publishes them to the
JetStream stream ``EDGE_DOWNLINK``; the agent (``cloud_sync.sync_nats_downlink``) reads its
own store's subjects. Shared by both sides, like ``erasure_blinding`` (stdlib only: the
store's server never imports ``edge_agent``).

Subjects (docs/contracts.md): ``edge.downlink.<store_id>.erasure`` and
``edge.downlink.<store_id>.model``; NATS permissions give each store's user only its own.

Every message carries ``auth``: one HMAC-SHA256 per agent credential of that store valid when
it was published (a rotation's two tokens), over the subject and the message without
``auth``, keyed with ``HMAC(sha256(token), "edge.downlink.auth")``. The store keeps sha256
of every token and the agent knows its own, so only the store can write a notice the agent
accepts: a publisher that got past the NATS permissions still cannot forge one, nor replay
another store's on this store's subject. Erasure notices name the customer only blinded
exactly as ``GET /v1/erasures`` blinds it for each of those credentials.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
from dataclasses import dataclass
from typing import Any, Final

from cloud_sync.erasure_blinding import BLINDED_HEX_CHARS, blind

STREAM: Final = "EDGE_DOWNLINK"
SUBJECT_PREFIX: Final = "edge.downlink"
ERASURE: Final = "erasure"
MODEL: Final = "model"
# A notice names one id or carries one manifest (the bundled model's is 40 KB); below NATS's
# default max_payload of 1 MiB. A larger manifest is announced without it (``model_notice``).
MAX_NOTICE_BYTES: Final = 512 * 1024
MAX_KEYS_PER_STORE: Final = 16  # a store has one or two valid tokens; more is a bug
_AUTH_LABEL: Final = b"edge.downlink.auth"
_STORE_ID: Final = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_CURSOR: Final = re.compile(r"^[0-9]{1,19}$")
_HEX: Final = re.compile(rf"^[0-9a-f]{{{BLINDED_HEX_CHARS}}}$")


class NoticeRefusedError(ValueError):
    """A message the agent must not act on; ``reason`` is a short token for the counters."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


@dataclass(frozen=True, slots=True)
class ErasureMessage:
    cursor: int  # the erasure's seq, the HTTP feed's cursor
    previous: int  # the cursor of the notice announced before this one (0: none)
    requested_at: str
    blinded: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class ModelMessage:
    etag: str  # as GET /v1/models/latest would send it
    manifest: dict[str, Any] | None  # its body; None: too large for a message, ask over HTTP


def subject_store_id(store_id: str) -> bool:
    """Whether ``store_id`` can be one subject token and part of a consumer name."""
    return _STORE_ID.match(store_id) is not None


def subject(store_id: str, kind: str, prefix: str = SUBJECT_PREFIX) -> str:
    return f"{prefix}.{store_id}.{kind}"


def store_filter(store_id: str, prefix: str = SUBJECT_PREFIX) -> str:
    """Every downlink subject of one store: what its NATS user may read."""
    return f"{prefix}.{store_id}.>"


def consumer_name(store_id: str) -> str:
    """The one consumer a store's agent may create (fixed, so permissions can name it)."""
    return f"downlink_{store_id}"


def auth_key(blinding: bytes) -> bytes:
    """The MAC key derived from a credential's blinding key (``sha256(token)``)."""
    return hmac.new(blinding, _AUTH_LABEL, hashlib.sha256).digest()


def _signed_bytes(subject_name: str, body: dict[str, Any]) -> bytes:
    unsigned = {key: value for key, value in body.items() if key != "auth"}
    text = json.dumps(unsigned, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return subject_name.encode("utf-8") + b"\n" + text.encode("utf-8")


def _mac(blinding: bytes, subject_name: str, body: dict[str, Any]) -> str:
    return hmac.new(auth_key(blinding), _signed_bytes(subject_name, body), "sha256").hexdigest()


def _sealed(subject_name: str, body: dict[str, Any], keys: list[bytes]) -> bytes:
    body["auth"] = [_mac(key, subject_name, body) for key in keys]
    return json.dumps(body, sort_keys=True, separators=(",", ":")).encode("utf-8")


def erasure_notice(
    subject_name: str,
    customer_id: str,
    keys: list[bytes],
    *,
    cursor: int,
    previous: int,
    requested_at: str,
) -> bytes:
    """One erasure for one store, blinded with each of its credentials' keys."""
    body: dict[str, Any] = {
        "kind": ERASURE,
        "cursor": str(cursor),
        "previous": str(previous),
        "requested_at": requested_at,
        "blinded": [blind(key, customer_id) for key in keys],
    }
    return _sealed(subject_name, body, keys)


def model_notice(
    subject_name: str, etag: str, manifest: dict[str, Any], keys: list[bytes]
) -> bytes:
    """What ``GET /v1/models/latest`` answers this store: the manifest and its ETag; only
    the ETag (``manifest`` null) when the manifest would not fit in ``MAX_NOTICE_BYTES``."""
    body: dict[str, Any] = {"kind": MODEL, "etag": etag, "manifest": manifest}
    sealed = _sealed(subject_name, body, keys)
    if len(sealed) <= MAX_NOTICE_BYTES:
        return sealed
    return _sealed(subject_name, {"kind": MODEL, "etag": etag, "manifest": None}, keys)


def read_notice(subject_name: str, data: bytes, blinding: bytes) -> ErasureMessage | ModelMessage:
    """Parse and authenticate one message for the agent holding ``blinding``.

    Raises NoticeRefusedError (``too_large``, ``not_json``, ``bad_shape``, ``bad_auth``,
    ``wrong_subject``) for anything else; never another exception for any bytes.
    """
    if len(data) > MAX_NOTICE_BYTES:
        raise NoticeRefusedError("too_large", f"{len(data)} bytes")
    try:
        body: Any = json.loads(data)
    except (ValueError, RecursionError) as exc:
        raise NoticeRefusedError("not_json", str(exc)[:100]) from exc
    if not isinstance(body, dict):
        raise NoticeRefusedError("bad_shape", "not a JSON object")
    macs = body.get("auth")
    if not isinstance(macs, list) or not all(isinstance(m, str) for m in macs):
        raise NoticeRefusedError("bad_shape", "auth must be a list of strings")
    expected = _mac(blinding, subject_name, body)
    if not any(hmac.compare_digest(expected, mac) for mac in macs[:MAX_KEYS_PER_STORE]):
        raise NoticeRefusedError("bad_auth", "no MAC made with this agent's key")
    kind = body.get("kind")
    if not subject_name.endswith(f".{kind}"):
        raise NoticeRefusedError("wrong_subject", f"a {kind!r} notice on {subject_name}")
    if kind == ERASURE:
        return _erasure(body)
    if kind == MODEL:
        return _model(body)
    raise NoticeRefusedError("bad_shape", f"unknown kind {kind!r}")


def _erasure(body: dict[str, Any]) -> ErasureMessage:
    cursor, previous = body.get("cursor"), body.get("previous")
    blinded, requested_at = body.get("blinded"), body.get("requested_at")
    if not (
        isinstance(cursor, str)
        and _CURSOR.match(cursor)
        and isinstance(previous, str)
        and _CURSOR.match(previous)
        and int(previous) < int(cursor)
    ):
        raise NoticeRefusedError("bad_shape", "cursor and previous: digits, previous < cursor")
    if not isinstance(blinded, list) or not all(
        isinstance(item, str) and _HEX.match(item) for item in blinded
    ):
        raise NoticeRefusedError("bad_shape", "blinded: a list of 32 hex digits each")
    if not isinstance(requested_at, str):
        raise NoticeRefusedError("bad_shape", "requested_at must be a string")
    return ErasureMessage(int(cursor), int(previous), requested_at[:64], tuple(blinded))


def _model(body: dict[str, Any]) -> ModelMessage:
    etag, manifest = body.get("etag"), body.get("manifest")
    if not isinstance(etag, str) or not 0 < len(etag) <= 256:
        raise NoticeRefusedError("bad_shape", "etag must be a short string")
    if manifest is not None and not isinstance(manifest, dict):
        raise NoticeRefusedError("bad_shape", "manifest must be an object or null")
    return ModelMessage(etag, manifest)
