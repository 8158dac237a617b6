"""Find the envelopes of a batch body without parsing it: byte spans, sizes and nesting depth.

``json.loads`` of a whole body builds every value at once: 63 MiB of nested empty arrays
became 1.7 GB of Python lists before anything could look at them. This scanner walks only the
structural tokens (strings, brackets, commas) with one compiled regular expression, so memory
stays at the body itself, and reports each element of the batch array as a span with its size
and deepest nesting. The caller then parses one envelope at a time, and only those within the
limits; an element's own syntax is checked by that parse, not here.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Final

from cloud_sync.store.errors import BadRequestError

# A JSON string (escapes included) or one structural character. Strings are matched whole so
# that brackets and commas inside them are never counted.
_TOKEN: Final = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"|[\[\]{},]')
_WRAPPED: Final = re.compile(rb'[ \t\r\n]*\{[ \t\r\n]*"events"[ \t\r\n]*:[ \t\r\n]*')
_WRAPPED_END: Final = re.compile(rb"[ \t\r\n]*\}[ \t\r\n]*")
_SPACE: Final = re.compile(rb"[ \t\r\n]*")
_OPEN: Final = frozenset(b"[{")
_CLOSE: Final = frozenset(b"]}")
_COMMA: Final = ord(",")
_QUOTE: Final = ord('"')


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
    spans: list[Span] = []
    depth = 0  # 1 inside the batch array
    deepest = 1
    start = pos + 1
    for token in _TOKEN.finditer(body, pos):
        char = body[token.start()]
        if char == _QUOTE:
            continue
        if char in _OPEN:
            depth += 1
            deepest = max(deepest, depth)
        elif char in _CLOSE:
            depth -= 1
            if depth == 0:
                if char != ord("]"):
                    raise BadRequestError(400, "malformed_json", "the batch array is not closed")
                _finish(body, start, token.start(), deepest, spans, closing=True)
                _check_count(spans, max_events)
                _check_tail(body, token.end(), wrapped is not None)
                return spans
        elif depth == 1:  # a comma between two envelopes
            _finish(body, start, token.start(), deepest, spans, closing=False)
            _check_count(spans, max_events)
            start, deepest = token.end(), 1
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
