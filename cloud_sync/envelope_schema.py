"""The event envelope's schema, shared by the agent and the central store.

This module is pure standard library and imports nothing else from the project, so the
central store (which never imports ``edge_agent``) and the agent validate envelopes with the
same rules, read from one registry file (``event_types.json``).

The registry declares every ``data`` field of every type, down to the elements of arrays and
the keys of objects. ``Registry.clean_data`` keeps only what is declared: an undeclared field
is dropped and counted (the event itself is kept), so a device cannot carry an e-mail address
or a customer id past consent in a field nobody reviewed. A declared field of the wrong shape
rejects the event with a reason. Fields that name a person are marked ``"identity": true``;
they follow the same consent rule as the envelope's ``customer_id`` when uploaded.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cache
from importlib import resources
from typing import Any, Final, NamedTuple

ENVELOPE_FIELDS: Final = (
    "event_id",
    "type",
    "ts",
    "store_id",
    "device_id",
    "customer_id",
    "source",
    "schema",
    "data",
)
MAX_ID_LENGTH: Final = 128
# A declared string without its own max_length (the store adds its own field limits).
DEFAULT_MAX_STRING: Final = 1024
DEFAULT_MAX_ITEMS: Final = 1000

_PYTHON_TYPES: Final[Mapping[str, tuple[type, ...]]] = {
    "string": (str,),
    "number": (int, float),
    "integer": (int,),
    "boolean": (bool,),
    "object": (dict,),
    "array": (list,),
}


@dataclass(frozen=True, slots=True)
class Rule:
    """The declared shape of one value: a field, an array element or a map entry."""

    kinds: tuple[str, ...]  # accepted kinds; an element may be e.g. a string or an object
    nullable: bool = False
    max_length: int = DEFAULT_MAX_STRING  # strings
    items: Rule | None = None  # arrays: the rule of every element
    max_items: int = DEFAULT_MAX_ITEMS  # arrays and maps
    fields: Mapping[str, FieldSpec] = field(default_factory=dict)  # objects with declared keys
    values: Rule | None = None  # maps: objects whose keys match key_pattern, values this rule
    key_pattern: re.Pattern[str] | None = None
    exact_types: frozenset[type] = frozenset()  # derived from kinds and nullable, once


def _rule(kinds: tuple[str, ...], **options: Any) -> Rule:
    exact = {t for k in kinds for t in _PYTHON_TYPES[k]}
    if options.get("nullable"):
        exact.add(type(None))
    return Rule(kinds, exact_types=frozenset(exact), **options)


@dataclass(frozen=True, slots=True)
class FieldSpec:
    name: str
    rule: Rule
    required: bool = False
    identity: bool = False  # names a person: pseudonymised like customer_id without consent


@dataclass(frozen=True, slots=True)
class TypeSpec:
    name: str
    customer: bool  # a customer interaction (kept longest), as opposed to telemetry
    fields: tuple[FieldSpec, ...]
    data: Rule = field(default_factory=lambda: _rule(("object",)))  # the whole data object

    @property
    def identity_fields(self) -> frozenset[str]:
        return frozenset(f.name for f in self.fields if f.identity)


class Cleaned(NamedTuple):  # a tuple: built for every event, cheaper than a dataclass
    """``data`` with only its declared fields, and how many undeclared ones were dropped."""

    data: dict[str, Any]
    dropped: int


class _Dropped:
    __slots__ = ("count",)

    def __init__(self) -> None:
        self.count = 0


class _Wrong:
    """A value that does not fit its rule; a distinct type so mypy can narrow it away."""


_WRONG: Final = _Wrong()


@dataclass(frozen=True, slots=True)
class Registry:
    version: int
    types: Mapping[str, TypeSpec]
    # Undeclared fields dropped, by event type (bounded: only declared types are counted).
    # Shared by every reader of this registry in the process; /status shows it.
    dropped: Counter[str] = field(default_factory=Counter, compare=False)

    def clean_data(self, event_type: str, data: object) -> Cleaned | str:
        """``data`` reduced to its declared fields, or why it does not fit ``event_type``.

        Nothing is counted (``admit_data`` counts); ``data`` itself is never modified.
        """
        spec = self.types.get(event_type)
        if spec is None:
            return "unknown_type"
        if not isinstance(data, dict):
            return "wrong_type"
        dropped = _Dropped()
        clean = _clean_fields(data, spec.data, dropped)
        if isinstance(clean, _Wrong):
            return "wrong_type"
        if clean is None:
            return "missing_field"
        return Cleaned(clean, dropped.count)

    def admit_data(self, event_type: str, data: object) -> Cleaned | str:
        """``clean_data``, counting what is dropped: call it once for each input taken in."""
        cleaned = self.clean_data(event_type, data)
        if isinstance(cleaned, Cleaned) and cleaned.dropped:
            self.dropped[event_type] += cleaned.dropped
        return cleaned

    def check_data(self, event_type: str, data: object) -> str | None:
        """Return why ``data`` does not fit ``event_type``, or None (undeclared fields aside)."""
        cleaned = self.clean_data(event_type, data)
        return cleaned if isinstance(cleaned, str) else None

    def is_customer_type(self, event_type: str) -> bool:
        spec = self.types.get(event_type)
        return spec is not None and spec.customer

    def identity_fields(self, event_type: str) -> frozenset[str]:
        spec = self.types.get(event_type)
        return spec.identity_fields if spec is not None else frozenset()

    def status(self) -> dict[str, dict[str, Any]]:
        """The /status section: fields dropped because the registry does not declare them."""
        return {
            "schema": {
                "version": self.version,
                "undeclared_fields_dropped": sum(self.dropped.values()),
                "undeclared_by_type": dict(self.dropped),
            }
        }


def _clean(value: object, rule: Rule, dropped: _Dropped) -> Any:
    """``value`` with undeclared parts removed, or ``_WRONG``."""
    # Decoded JSON holds exact built-in types, so one set lookup judges the kind (and keeps
    # bool apart from int); this runs for every value of every event at both ends.
    kind = type(value)
    if kind not in rule.exact_types:
        return _WRONG
    if kind is str:
        return value if len(value) <= rule.max_length else _WRONG  # type: ignore[arg-type]
    if kind is float:
        return value if math.isfinite(value) else _WRONG  # type: ignore[arg-type]
    if kind is list:
        items = rule.items
        if items is None or len(value) > rule.max_items:  # type: ignore[arg-type]
            return _WRONG
        kept: list[Any] = []
        for element in value:  # type: ignore[attr-defined]
            clean = _clean(element, items, dropped)
            if clean is _WRONG:
                return _WRONG
            kept.append(clean)
        return kept
    if kind is dict:
        if len(value) > rule.max_items:  # type: ignore[arg-type]
            return _WRONG
        if rule.values is not None:
            return _clean_map(value, rule, dropped)  # type: ignore[arg-type]
        fields = _clean_fields(value, rule, dropped)  # type: ignore[arg-type]
        return _WRONG if fields is None else fields
    return value  # int, bool, None


def _clean_fields(value: dict[str, Any], rule: Rule, dropped: _Dropped) -> Any:
    """An object with declared keys: the clean copy, ``_WRONG``, or None (a required key is
    missing)."""
    kept: dict[str, Any] = {}
    declared = rule.fields
    for name, element in value.items():
        spec = declared.get(name)
        if spec is None:
            dropped.count += 1
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


def _clean_map(value: dict[str, Any], rule: Rule, dropped: _Dropped) -> Any:
    kept: dict[str, Any] = {}
    assert rule.values is not None  # the caller checked
    for name, element in value.items():
        if rule.key_pattern is None or not rule.key_pattern.fullmatch(name):
            dropped.count += 1
            continue
        clean = _clean(element, rule.values, dropped)
        if clean is _WRONG:
            return _WRONG
        kept[name] = clean
    return kept


def _is_id(value: object) -> bool:
    return isinstance(value, str) and 0 < len(value) <= MAX_ID_LENGTH


def check_envelope(envelope: Mapping[str, Any], registry: Registry) -> str | None:
    """Return why a complete envelope is invalid, or None. Reasons are short snake_case words."""
    reason = check_envelope_head(envelope, registry)
    if reason is not None:
        return reason
    return registry.check_data(envelope["type"], envelope.get("data", {}))


def check_envelope_head(envelope: Mapping[str, Any], registry: Registry) -> str | None:
    """``check_envelope`` without ``data``: for a reader that cleans ``data`` next."""
    for name in ("event_id", "type", "ts", "store_id", "source"):
        if name not in envelope:
            return "missing_field"
    if not _is_id(envelope["event_id"]) or not _is_id(envelope["store_id"]):
        return "wrong_type"
    for name in ("device_id", "customer_id"):
        value = envelope.get(name)
        if value is not None and not _is_id(value):
            return "wrong_type"
    if not isinstance(envelope["ts"], str) or not isinstance(envelope["source"], str):
        return "wrong_type"
    schema = envelope.get("schema", registry.version)
    if isinstance(schema, bool) or not isinstance(schema, int):
        return "wrong_type"
    if schema > registry.version or schema < 1:
        return "schema_unsupported"
    if not isinstance(envelope["type"], str):
        return "wrong_type"
    return None


def _parse_rule(where: str, rule: Mapping[str, Any]) -> Rule:
    kinds = rule.get("type") or ("object" if "fields" in rule else None)
    kinds = (kinds,) if isinstance(kinds, str) else tuple(kinds or ())
    unknown = [k for k in kinds if k not in _PYTHON_TYPES]
    if not kinds or unknown:
        raise ValueError(f"{where}: unknown or missing field kinds {unknown or kinds}")
    if "array" in kinds and "items" not in rule:
        raise ValueError(f"{where}: an array must declare its items")
    if "object" in kinds and "fields" not in rule and "values" not in rule:
        raise ValueError(f"{where}: an object must declare its fields or its values")
    pattern = rule.get("key_pattern")
    return _rule(
        kinds,
        nullable=bool(rule.get("nullable", False)),
        max_length=int(rule.get("max_length", DEFAULT_MAX_STRING)),
        items=_parse_rule(f"{where}[]", rule["items"]) if "items" in rule else None,
        max_items=int(rule.get("max_items", DEFAULT_MAX_ITEMS)),
        fields={f.name: f for f in _parse_fields(where, rule.get("fields", {}))},
        values=_parse_rule(f"{where}{{}}", rule["values"]) if "values" in rule else None,
        key_pattern=re.compile(pattern) if pattern else None,
    )


def _parse_fields(where: str, fields: Mapping[str, Any]) -> tuple[FieldSpec, ...]:
    specs = []
    for name, rule in fields.items():
        spec = FieldSpec(
            name,
            _parse_rule(f"{where}.{name}", rule),
            bool(rule.get("required", False)),
            bool(rule.get("identity", False)),
        )
        if spec.identity and spec.rule.kinds != ("string",):
            raise ValueError(f"{where}.{name}: an identity field must be a string")
        specs.append(spec)
    return tuple(specs)


def parse_registry(document: Mapping[str, Any]) -> Registry:
    types: dict[str, TypeSpec] = {}
    for name, spec in document["types"].items():
        fields = _parse_fields(name, spec["data"])
        data = _rule(("object",), fields={f.name: f for f in fields})
        types[name] = TypeSpec(name, bool(spec["customer"]), fields, data)
    return Registry(int(document["version"]), types)


@cache
def default_registry() -> Registry:
    text = resources.files("cloud_sync").joinpath("event_types.json").read_text("utf-8")
    return parse_registry(json.loads(text))
