"""The registry's rules walked one by one: the check as it was before it was compiled.

Kept as the oracle for ``Registry.clean_data`` (compiled closures and generated source):
the property tests in test_envelope_registry.py hold both to the same answers.
"""

from __future__ import annotations

import math
from typing import Any

from cloud_sync.envelope_schema import Cleaned, Registry, Rule

_WRONG = object()


def reference_clean_data(registry: Registry, event_type: str, data: object) -> Cleaned | str:
    spec = registry.types.get(event_type)
    if spec is None:
        return "unknown_type"
    if not isinstance(data, dict):
        return "wrong_type"
    dropped = [0]
    clean = _clean_fields(data, spec.data, dropped)
    if clean is _WRONG:
        return "wrong_type"
    if clean is None:
        return "missing_field"
    return Cleaned(clean, dropped[0])


def _clean(value: Any, rule: Rule, dropped: list[int]) -> Any:
    kind = type(value)
    if kind not in rule.exact_types:
        return _WRONG
    if kind is str:
        return value if len(value) <= rule.max_length else _WRONG
    if kind is float:
        return value if math.isfinite(value) else _WRONG
    if kind is list:
        items = rule.items
        if items is None or len(value) > rule.max_items:
            return _WRONG
        kept: list[Any] = []
        for element in value:
            clean = _clean(element, items, dropped)
            if clean is _WRONG:
                return _WRONG
            kept.append(clean)
        return kept
    if kind is dict:
        if len(value) > rule.max_items:
            return _WRONG
        if rule.values is not None:
            return _clean_map(value, rule, dropped)
        fields = _clean_fields(value, rule, dropped)
        return _WRONG if fields is None else fields
    return value  # int, bool, None


def _clean_fields(value: dict[str, Any], rule: Rule, dropped: list[int]) -> Any:
    kept: dict[str, Any] = {}
    declared = rule.fields
    for name, element in value.items():
        spec = declared.get(name)
        if spec is None:
            dropped[0] += 1
            continue
        clean = _clean(element, spec.rule, dropped)
        if clean is _WRONG:
            return _WRONG
        kept[name] = clean
    if len(kept) < len(declared):
        for spec in declared.values():
            if spec.required and spec.name not in kept:
                return None
    return kept


def _clean_map(value: dict[str, Any], rule: Rule, dropped: list[int]) -> Any:
    kept: dict[str, Any] = {}
    assert rule.values is not None
    for name, element in value.items():
        if rule.key_pattern is None or not rule.key_pattern.fullmatch(name):
            dropped[0] += 1
            continue
        clean = _clean(element, rule.values, dropped)
        if clean is _WRONG:
            return _WRONG
        kept[name] = clean
    return kept
