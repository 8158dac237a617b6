"""Find the envelopes of a batch body without parsing it: byte spans, sizes and nesting depth.

``json.loads`` of a whole body builds every value at once: 63 MiB of nested empty arrays
became 1.7 GB of Python lists before anything could look at them. This scanner never builds
a value. It works on the bytes with numpy, a window at a time: escape pairs are blanked
(same length, so offsets hold), quotes counted to tell what lies inside a string, and a
running sum of brackets gives each byte's nesting level; commas at level 1 separate the
batch's envelopes. Time and memory are linear in the body with small constants whatever
its shape (one Python step per envelope, not per token). The caller then parses one
envelope at a time, only those within the limits; an envelope's own syntax is checked by
that parse, not here.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Final

import numpy as np

from cloud_sync.store.errors import BadRequestError

_WRAPPED: Final = re.compile(rb'[ \t\r\n]*\{[ \t\r\n]*"events"[ \t\r\n]*:[ \t\r\n]*')
_WRAPPED_END: Final = re.compile(rb"[ \t\r\n]*\}[ \t\r\n]*")
_SPACE: Final = re.compile(rb"[ \t\r\n]*")
# A backslash and the byte it escapes; replaced by two neutral bytes, so an escaped quote
# never counts as one and every offset stays where it was.
_ESCAPE_PAIR: Final = re.compile(rb"\\.", re.DOTALL)
WINDOW: Final = 256 * 1024  # bytes per numpy pass: bounds the temporaries (a few MB)
_QUOTE, _COMMA = ord('"'), ord(",")
_OPENS, _CLOSES = (ord("["), ord("{")), (ord("]"), ord("}"))


@dataclass(frozen=True, slots=True)
class Span:
    """One element of the batch array: ``body[start:end]``, nesting counted from the element."""

    start: int
    end: int
    depth: int  # 0 for a scalar, 1 for a flat object, 2 when it holds an object or array ...

    @property
    def size(self) -> int:
        return self.end - self.start


def batch_spans(body: bytes, max_events: int) -> list[Span]:
    """The elements of ``[envelope, ...]`` or ``{"events": [...]}``, in order.

    Raises ``BadRequestError`` when the skeleton is not a batch: 400 ``malformed_json`` or
    ``bad_batch_shape``, 413 ``too_many_events`` as soon as one element too many is seen.
    """
    wrapped = _WRAPPED.match(body)
    pos = wrapped.end() if wrapped else _skip_space(body, 0)
    if pos >= len(body):
        raise BadRequestError(400, "malformed_json", "empty body")
    first = body[pos]
    if first != ord("["):
        if first == ord("{"):
            raise BadRequestError(
                400, "bad_batch_shape", 'expected [envelope, ...] or {"events": [...]}'
            )
        raise BadRequestError(400, "malformed_json", f"unexpected byte at {pos}")
    plain = _ESCAPE_PAIR.sub(b"__", body) if b"\\" in body else body
    spans: list[Span] = []
    start, deepest = pos + 1, 1  # the element in progress; levels count the batch array as 1
    level, quotes = 0, 0  # carried from one window to the next
    for low in range(pos, len(plain), WINDOW):
        chunk = np.frombuffer(plain, np.uint8, min(WINDOW, len(plain) - low), low)
        quote = chunk == _QUOTE
        # Even count of quotes before a byte: it is outside every string.
        outside = ((np.cumsum(quote, dtype=np.int64) - quote + quotes) & 1) == 0
        step = np.isin(chunk, _OPENS).astype(np.int32) - np.isin(chunk, _CLOSES)
        step *= outside
        levels = np.cumsum(step, dtype=np.int64) + level
        ends = np.flatnonzero(
            ((chunk == _COMMA) & outside & (levels == 1)) | ((step == -1) & (levels == 0))
        )
        if len(ends):
            marks = np.concatenate(([0], ends[:-1] + 1))
            tops = np.maximum.reduceat(levels[: ends[-1] + 1], marks)
            for end, top in zip(ends.tolist(), tops.tolist(), strict=True):
                deepest = max(deepest, top)
                closing = bool(levels[end] == 0)
                _finish(body, start, low + end, deepest, spans, closing=closing)
                _check_count(spans, max_events)
                if closing:
                    if chunk[end] != ord("]"):
                        raise BadRequestError(400, "malformed_json", "the batch is not closed")
                    _check_tail(body, low + end + 1, wrapped is not None)
                    return spans
                start, deepest = low + end + 1, 1
            rest = levels[ends[-1] + 1 :]
        else:
            rest = levels
        if len(rest):
            deepest = max(deepest, int(rest.max()))
        level, quotes = int(levels[-1]), quotes + int(quote.sum())
    raise BadRequestError(400, "malformed_json", "the batch array is not closed")


def _finish(
    body: bytes, start: int, end: int, deepest: int, spans: list[Span], *, closing: bool
) -> None:
    first = _skip_space(body, start)
    if first >= end:
        if closing and not spans:
            return  # "[]": an empty batch
        raise BadRequestError(400, "malformed_json", f"empty element at byte {start}")
    spans.append(Span(first, end, deepest - 1))  # json.loads ignores trailing whitespace


def _check_count(spans: list[Span], max_events: int) -> None:
    if len(spans) > max_events:
        raise BadRequestError(413, "too_many_events", f"more than {max_events}")


def _check_tail(body: bytes, pos: int, wrapped: bool) -> None:
    if wrapped:
        closing = _WRAPPED_END.match(body, pos)
        if closing is None or closing.end() != len(body):
            raise BadRequestError(400, "bad_batch_shape", '{"events": [...]} may hold nothing else')
    elif _skip_space(body, pos) != len(body):
        raise BadRequestError(400, "malformed_json", f"extra data at byte {pos}")


def _skip_space(body: bytes, pos: int) -> int:
    match = _SPACE.match(body, pos)
    return match.end() if match else pos
