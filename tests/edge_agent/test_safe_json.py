"""The fast parse (msgspec) and the strict one (``json`` with hooks) must agree on every text:
the same document, or the same kind of refusal, so no hostile-input rule of decode.py
depends on which parser read a payload."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edge_agent import safe_json

CORPUS = Path(__file__).parent.parent / "fuzz" / "corpus" / "mqtt"
NUMBERS = st.sampled_from(
    [
        "9223372036854775807",
        "-9223372036854775808",
        "9223372036854775808",
        "-9223372036854775809",
        "18446744073709551616",
        "1" * 4301,
        "1e400",
        "-1E999",
        "1e308",
        "1.7976931348623157e308",
        "5e-324",
        "1e-400",
        "NaN",
        "Infinity",
        "-Infinity",
        "-0",
        "-0.0",
        "01",
        "1.",
        ".5",
        "0." + "0" * 30 + "1",
        "123456789012345678",
        "1234567890123456789",
    ]
)
STRINGS = st.sampled_from(
    [
        '"\\ud800"',
        '"a\\udfffb"',
        '"\\u0000"',
        '"\\ud83d\\ude00"',
        '"\t"',
        '"\\x"',
        '"é"',
        '"\ufeff"',
    ]
)
TOKENS = NUMBERS | STRINGS | st.sampled_from(["{", "}", "[", "]", ",", ":", " ", "true", "null"])


def _outcome(parse: Any, text: str) -> Any:
    try:
        return ("ok", _comparable(parse(text)))
    except safe_json.BadNumberError:
        return ("bad_number",)
    except json.JSONDecodeError:
        return ("not_json",)
    except RecursionError:
        return ("too_deep",)


def _comparable(value: Any) -> Any:
    """Types kept (1 and 1.0 and True differ), -0.0 kept apart from 0.0."""
    if isinstance(value, float):
        return ("float", math.copysign(1.0, value), value)
    if isinstance(value, dict):
        return ("dict", [(key, _comparable(child)) for key, child in value.items()])
    if isinstance(value, list):
        return ("list", [_comparable(child) for child in value])
    return (type(value).__name__, value)


def _strict(text: str) -> Any:
    return safe_json._STRICT.decode(text)


def _agree(text: str) -> None:
    assert _outcome(safe_json.load_json, text) == _outcome(_strict, text), text[:200]


@given(st.lists(TOKENS, max_size=12).map("".join))
@settings(max_examples=2000, deadline=None)
def test_token_soup_parses_alike(text: str) -> None:
    _agree(text)


@given(
    st.recursive(
        st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
        lambda c: st.lists(c) | st.dictionaries(st.text(), c),
        max_leaves=20,
    )
)
@settings(max_examples=1000, deadline=None)
def test_any_python_document_parses_alike(document: Any) -> None:
    _agree(json.dumps(document))  # with NaN, Infinity, lone surrogates, huge integers


@given(st.text(max_size=60))
@settings(max_examples=1000, deadline=None)
def test_any_text_parses_alike(text: str) -> None:
    _agree(text)


def test_the_fuzz_corpus_parses_alike() -> None:
    files = sorted(CORPUS.iterdir())
    assert files
    for path in files:
        try:
            text = path.read_bytes().decode("utf-8")
        except UnicodeDecodeError:
            continue
        _agree(text)


@pytest.mark.parametrize(
    ("text", "outcome"),
    [
        ('{"n": 9223372036854775808}', "bad_number"),
        ('{"n": 1e400}', "bad_number"),
        ('{"n": NaN}', "bad_number"),
        ('{"n": 1}x', "not_json"),
        ("[" * 100_000 + "]" * 100_000, "too_deep"),
    ],
)
def test_refusals_keep_their_reason(text: str, outcome: str) -> None:
    assert _outcome(safe_json.load_json, text)[0] == outcome


def test_duplicate_keys_keep_the_last_like_json() -> None:
    assert safe_json.load_json('{"a": 1, "a": 2}') == {"a": 2}
