"""JSON as the rest of the pipe can hold it: refuse at parse what SQLite or UTF-8 cannot.

Python's ``json`` accepts ``NaN``/``Infinity``, turns ``1e400`` into infinity, reads integers
of any size up to its 4,300-digit limit (beyond it a ``ValueError`` that is not a
``JSONDecodeError``), and keeps a lone ``\\ud800`` escape as a string no UTF-8 encoder can
write (and ``\\u0000`` as a NUL, which PostgreSQL's text and jsonb refuse). SQLite's JSON
functions then call the text malformed, 64-bit columns overflow, the buffer's
``executemany`` raises, the central store refuses the event. Used by the MQTT decoder and
the serial messages.

The common case is parsed by msgspec (C, several times faster than ``json`` with hooks); the
strict ``json`` parser below stays the one judge of everything unusual: whatever msgspec
refuses, and any text with a run of 19 or more digits (the only way to spell an integer
beyond 64 bits or a float that overflows without a 3-digit exponent, which msgspec refuses
itself), is parsed again by it, so every refusal keeps its reason.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any, Final, NoReturn

import msgspec

_INT64_MIN: Final = -(2**63)
_INT64_MAX: Final = 2**63 - 1
_INT64_DIGITS: Final = len(str(_INT64_MIN))  # 20 characters with the sign
# A \uD800-\uDFFF or \u0000 escape: only then can a parsed string hold what the pipe
# cannot (raw control characters are not JSON: the parser refuses them itself).
_RISKY_ESCAPE: Final = re.compile(rb"\\u(?:[dD][89abcdefABCDEF]|0000)")
# Text the fast parser may read differently from the strict one: 19+ digits in a row
# (int64 has at most 19; msgspec reads any integer and would let 2**63 through).
_LONG_DIGITS: Final = re.compile(r"[0-9]{19}")
_FAST: Final = msgspec.json.Decoder()


class BadNumberError(ValueError):
    """A JSON number the pipe cannot hold; raised from inside ``json.loads``."""


def _bounded_int(text: str) -> int:
    if len(text) > _INT64_DIGITS:  # before int(): Python refuses beyond 4,300 digits
        raise BadNumberError(f"integer of {len(text)} digits")
    value = int(text)
    if not _INT64_MIN <= value <= _INT64_MAX:
        raise BadNumberError(f"integer {text} is outside signed 64 bits")
    return value


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise BadNumberError(f"{text[:40]} overflows a float")
    return value


def _no_constant(name: str) -> NoReturn:
    raise BadNumberError(f"{name} is not a JSON number")


# Built once: json.loads() with hooks builds a decoder per call (~3 us); the hooks
# themselves cost about 0.1 us a number (measured: no difference on a typical event).
_STRICT: Final = json.JSONDecoder(
    parse_int=_bounded_int, parse_float=_finite_float, parse_constant=_no_constant
)


def load_json(text: str) -> Any:
    """``json.loads`` that raises ``BadNumberError`` for a number the pipe cannot hold
    (``JSONDecodeError`` for text that is not JSON, ``RecursionError`` for deep nesting)."""
    if _LONG_DIGITS.search(text) is None:
        try:
            return _FAST.decode(text)
        except (msgspec.DecodeError, RecursionError, ValueError):
            pass  # not plain JSON (or NaN, 1e400, a lone surrogate): the strict parser says why
    return _STRICT.decode(text)


def may_hold_unholdable(raw: bytes) -> bool:
    """Cheap pre-check: without a surrogate or NUL escape no parsed string needs a look."""
    return _RISKY_ESCAPE.search(raw) is not None


def unholdable_string(document: Any) -> str | None:
    """Where a string (key or value, any depth) sits that UTF-8 cannot encode (a lone
    surrogate) or that holds U+0000 (PostgreSQL's text and jsonb refuse it), or None."""
    stack: list[tuple[Any, str]] = [(document, "$")]
    while stack:
        node, path = stack.pop()
        if isinstance(node, str):
            if (not node.isascii() and _unencodable(node)) or "\x00" in node:
                return path
        elif isinstance(node, dict):
            for key, child in node.items():
                if _unencodable(key) or "\x00" in key:
                    return f"{path} key"
                stack.append((child, f"{path}.{key[:32]}"))
        elif isinstance(node, list):
            stack.extend((child, f"{path}[{index}]") for index, child in enumerate(node))
    return None


def _unencodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False
