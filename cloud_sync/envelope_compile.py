"""The registry's rules compiled into direct checks (``compile_fields``).

Each object rule of ``event_types.json`` becomes one function, written once when the
registry is loaded, so the check of every value of every event (at both ends) is a dict
lookup and a direct test, not a walk that asks each rule what it is.
``tests/cloud_sync/registry_reference.py`` keeps the plain walk of the rules, and a property
test holds both to the same answers.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Final

from cloud_sync.envelope_rules import Rule

__all__ = ["WRONG", "Dropped", "FieldsCheck", "Wrong", "compile_fields"]

# Undeclared parts dropped while cleaning one value: a one-element list, the cheapest
# mutable counter to make per event.
Dropped = list[int]


class Wrong:
    """A value that does not fit its rule; a distinct type so mypy can narrow it away."""


WRONG: Final = Wrong()


_Test = Callable[[Any], bool]  # a scalar rule: the value is kept as it is when it passes
_Check = Callable[[Any, Dropped], Any]  # the clean value, or WRONG
FieldsCheck = Callable[[dict[str, Any], Dropped], Any]  # WRONG, None (required missing)
_KNOWN_KEYS_LIMIT: Final = 4096  # map keys remembered as matching their pattern, per rule


def _scalar_test(rule: Rule) -> _Test | None:
    """A direct test for a rule without arrays or objects, else None."""
    if "array" in rule.kinds or "object" in rule.kinds:
        return None
    exact = rule.exact_types
    longest = rule.max_length
    if exact == frozenset({str}):
        return lambda value: type(value) is str and len(value) <= longest
    if exact == frozenset({int, float}):
        return lambda value: type(value) is int or (type(value) is float and math.isfinite(value))

    def test(value: Any) -> bool:
        # Decoded JSON holds exact built-in types, so one set lookup judges the kind (and
        # keeps bool apart from int).
        kind = type(value)
        if kind not in exact:
            return False
        if kind is str:
            return len(value) <= longest
        if kind is float:
            return math.isfinite(value)
        return True

    return test


def _compile(rule: Rule) -> _Check:
    test = _scalar_test(rule)
    if test is not None:
        return lambda value, dropped: value if test(value) else WRONG
    exact, longest, most = rule.exact_types, rule.max_length, rule.max_items
    items = _compile(rule.items) if rule.items is not None else None
    if rule.values is not None:
        entries = _compile_map(rule)
    else:
        fields = compile_fields(rule)

        def entries(value: dict[str, Any], dropped: Dropped) -> Any:
            kept = fields(value, dropped)
            return WRONG if kept is None else kept

    def check(value: Any, dropped: Dropped) -> Any:
        kind = type(value)
        if kind not in exact:
            return WRONG
        if kind is dict:
            return WRONG if len(value) > most else entries(value, dropped)
        if kind is list:
            if items is None or len(value) > most:
                return WRONG
            kept: list[Any] = []
            for element in value:
                clean = items(element, dropped)
                if clean is WRONG:
                    return WRONG
                kept.append(clean)
            return kept
        if kind is str:
            return value if len(value) <= longest else WRONG
        if kind is float:
            return value if math.isfinite(value) else WRONG
        return value  # int, bool, None

    return check


def _scalar_source(rule: Rule, name: str) -> str | None:
    """``_scalar_test`` as a Python expression on the variable ``name``, for the common
    kinds; None for the others."""
    exact = rule.exact_types
    if "array" in rule.kinds or "object" in rule.kinds:
        return None
    if exact == frozenset({str}):
        return f"(type({name}) is str and len({name}) <= {int(rule.max_length)})"
    if exact == frozenset({int, float}):
        return f"(type({name}) is int or (type({name}) is float and isfinite({name})))"
    if exact in (frozenset({int}), frozenset({bool})):
        return f"type({name}) is {next(iter(exact)).__name__}"
    return None


def compile_fields(rule: Rule) -> FieldsCheck:
    """An object with declared keys: the clean copy, ``WRONG``, or None (a required key is
    missing; a wrong value anywhere wins over a missing key).

    Written out as Python source once per object rule (as ``dataclasses`` writes its
    ``__init__``), so each declared field is one inlined comparison and test, not a call."""
    checks: dict[str, _Check] = {}
    lines = ["def clean_fields(value, dropped):", "    kept = {}"]
    lines.append("    for name, element in value.items():")
    word = "if"
    for name, spec in rule.fields.items():
        lines.append(f"        {word} name == {name!r}:")
        word = "elif"
        test = _scalar_source(spec.rule, "element")
        if test is not None:
            lines.append(f"            if not {test}: return WRONG")
        else:
            checks[name] = _compile(spec.rule)
            lines.append(f"            element = checks[{name!r}](element, dropped)")
            lines.append("            if element is WRONG: return WRONG")
    indent = "            " if rule.fields else "        "
    if rule.fields:
        lines.append("        else:")
    lines += [f"{indent}dropped[0] += 1", f"{indent}continue"]
    lines += [
        "        kept[name] = element",
        "    if required and not required.issubset(kept):",
        "        return None",
        "    return kept",
    ]
    text = "\n".join(lines) + "\n"
    required = frozenset(spec.name for spec in rule.fields.values() if spec.required)
    scope: dict[str, Any] = {
        "WRONG": WRONG,
        "checks": checks,
        "required": required,
        "isfinite": math.isfinite,
    }
    exec(text, scope)  # noqa: S102 - source built above from the parsed registry's names
    compiled: FieldsCheck = scope["clean_fields"]
    return compiled


def _compile_map(rule: Rule) -> FieldsCheck:
    """Keys matching ``key_pattern`` (others dropped), values of one rule."""
    assert rule.values is not None  # the caller checked
    pattern = rule.key_pattern
    test = _scalar_test(rule.values)
    check = _compile(rule.values)
    # A store's devices send the same few names again and again: each is matched once.
    known: dict[str, bool] = {}

    def matches(name: str) -> bool:
        verdict = known.get(name)
        if verdict is None:
            verdict = pattern is not None and pattern.fullmatch(name) is not None
            if len(known) < _KNOWN_KEYS_LIMIT:
                known[name] = verdict
        return verdict

    def clean_map(value: dict[str, Any], dropped: Dropped) -> Any:
        kept: dict[str, Any] = {}
        for name, element in value.items():
            if not matches(name):
                dropped[0] += 1
                continue
            if test is not None:
                if not test(element):
                    return WRONG
                kept[name] = element
                continue
            clean = check(element, dropped)
            if clean is WRONG:
                return WRONG
            kept[name] = clean
        return kept

    return clean_map
