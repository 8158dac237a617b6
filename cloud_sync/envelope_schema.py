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

import functools
import json
import math
import re
from collections import Counter
from collections.abc import Callable, Mapping
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
    # ``data``'s fields compiled once into a direct check (the object itself is checked by
    # the caller, without data's own bound on keys: its fields are declared one by one).
    clean: _FieldsCheck = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "clean", _compile_fields(self.data))

    @property
    def identity_fields(self) -> frozenset[str]:
        return frozenset(f.name for f in self.fields if f.identity)


class Cleaned(NamedTuple):  # a tuple: built for every event, cheaper than a dataclass
    """``data`` with only its declared fields, and how many undeclared ones were dropped."""

    data: dict[str, Any]
    dropped: int


_cleaned: Final = functools.partial(tuple.__new__, Cleaned)  # Cleaned without its Python __new__

# Undeclared parts dropped while cleaning one value: a one-element list, the cheapest
# mutable counter to make per event.
_Dropped = list[int]


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
        dropped = [0]
        clean = spec.clean(data, dropped)
        if clean is _WRONG:
            return "wrong_type"
        if clean is None:
            return "missing_field"
        return _cleaned((clean, dropped[0]))

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


# The registry is compiled once into nested closures, one per rule, so the check of every
# value of every event (at both ends) is a dict lookup and a direct test, not a walk that
# asks each rule what it is. tests/cloud_sync/registry_reference.py keeps the plain walk of
# the rules, and a property test holds both to the same answers.
_Test = Callable[[Any], bool]  # a scalar rule: the value is kept as it is when it passes
_Check = Callable[[Any, _Dropped], Any]  # the clean value, or _WRONG
_FieldsCheck = Callable[[dict[str, Any], _Dropped], Any]  # _WRONG, None (required missing)
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
        return lambda value, dropped: value if test(value) else _WRONG
    exact, longest, most = rule.exact_types, rule.max_length, rule.max_items
    items = _compile(rule.items) if rule.items is not None else None
    if rule.values is not None:
        entries = _compile_map(rule)
    else:
        fields = _compile_fields(rule)

        def entries(value: dict[str, Any], dropped: _Dropped) -> Any:
            kept = fields(value, dropped)
            return _WRONG if kept is None else kept

    def check(value: Any, dropped: _Dropped) -> Any:
        kind = type(value)
        if kind not in exact:
            return _WRONG
        if kind is dict:
            return _WRONG if len(value) > most else entries(value, dropped)
        if kind is list:
            if items is None or len(value) > most:
                return _WRONG
            kept: list[Any] = []
            for element in value:
                clean = items(element, dropped)
                if clean is _WRONG:
                    return _WRONG
                kept.append(clean)
            return kept
        if kind is str:
            return value if len(value) <= longest else _WRONG
        if kind is float:
            return value if math.isfinite(value) else _WRONG
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


def _compile_fields(rule: Rule) -> _FieldsCheck:
    """An object with declared keys: the clean copy, ``_WRONG``, or None (a required key is
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
        "WRONG": _WRONG,
        "checks": checks,
        "required": required,
        "isfinite": math.isfinite,
    }
    exec(text, scope)  # noqa: S102 - source built above from the parsed registry's names
    compiled: _FieldsCheck = scope["clean_fields"]
    return compiled


def _compile_map(rule: Rule) -> _FieldsCheck:
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

    def clean_map(value: dict[str, Any], dropped: _Dropped) -> Any:
        kept: dict[str, Any] = {}
        for name, element in value.items():
            if not matches(name):
                dropped[0] += 1
                continue
            if test is not None:
                if not test(element):
                    return _WRONG
                kept[name] = element
                continue
            clean = check(element, dropped)
            if clean is _WRONG:
                return _WRONG
            kept[name] = clean
        return kept

    return clean_map


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
