"""A fetched batch of JetStream messages as the pieces the HTTP ingest's checks judge.

Each message holds one envelope, and its subject names the store. Reading a message the HTTP
way (``ingest.decode_body`` on a one-element array: a NumPy span scan, then ``json.loads``)
cost the workers about 42% of their CPU (a py-spy profile of ``customer-store ingest`` in
the 1,000-store fleet, docs/scaling.md). Here the common case is parsed by msgspec (C, one
call a message, no array built around it), and ``decode_body`` stays the one judge of
everything unusual: a message msgspec refuses, one that might nest deeper than the limit,
one larger than an envelope may be, or one with a run of 19 or more digits (an integer
``json`` and msgspec might read differently: past 4,300 digits ``json`` refuses it) is read
by it, so every refusal keeps its reason. The two parsers agree on the value of every text
msgspec accepts that passes those checks (``tests/cloud_sync/test_nats_ingest.py`` compares
them on valid, hostile and generated messages).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Final, Protocol

import msgspec

from cloud_sync.store.errors import BadRequestError
from cloud_sync.store.ingest import RISKY_ESCAPES, Limits, Piece, decode_body

__all__ = ["Message", "read_batch", "read_envelope", "store_of_subject"]

_FAST: Final = msgspec.json.Decoder()
_LONG_DIGITS: Final = re.compile(rb"[0-9]{19}")


class Message(Protocol):
    """What a fetched message offers here (``nats.aio.msg.Msg``)."""

    @property
    def subject(self) -> str: ...

    @property
    def data(self) -> bytes: ...


def store_of_subject(subject: str, prefix: str, shard_prefix: str) -> str:
    """``<shard prefix>.<k>.<store_id>`` or ``<prefix>.<store_id>``: the store id, else ""."""
    if subject.startswith(shard_prefix + "."):
        shard, _, store_id = subject[len(shard_prefix) + 1 :].partition(".")
        return store_id if shard.isdigit() and "." not in store_id else ""
    if subject.startswith(prefix + "."):
        return subject[len(prefix) + 1 :]
    return ""


def read_envelope(data: bytes, limits: Limits) -> Piece:
    """The message's one envelope, parsed, or refused with the HTTP ingest's reason."""
    if (
        len(data) <= limits.max_envelope_bytes
        # Nesting is at most the count of openers (those inside strings only over-count).
        and data.count(b"{") + data.count(b"[") <= limits.max_depth
        and _LONG_DIGITS.search(data) is None
    ):
        try:
            value = _FAST.decode(data)
        except (msgspec.DecodeError, ValueError):
            pass  # not plain JSON (or bad UTF-8, a lone surrogate): the strict reader says why
        else:
            return Piece(value, None, any(escape in data for escape in RISKY_ESCAPES))
    return _read_strictly(data, limits)


def _read_strictly(data: bytes, limits: Limits) -> Piece:
    try:
        items = decode_body(b"[" + data + b"]", None, limits).items
    except BadRequestError as exc:
        return Piece(refused=exc.reason)
    except ValueError:
        return Piece(refused="malformed_json")
    if len(items) != 1:
        return Piece(refused="not_one_envelope")
    return items[0]


def read_batch(
    msgs: Sequence[Message], prefix: str, shard_prefix: str, limits: Limits
) -> list[tuple[str, Piece]]:
    """Per message, in order: the store its subject names ("" if none) and its envelope."""
    found = []
    for msg in msgs:
        store_id = store_of_subject(msg.subject, prefix, shard_prefix)
        piece = read_envelope(msg.data, limits) if store_id else Piece(refused="bad_subject")
        found.append((store_id, piece))
    return found
