"""The event envelope's schema, shared by the agent and the central store.

This module is pure standard library and imports nothing else from the project but its two
siblings (``envelope_rules``: the parsed rules; ``envelope_compile``: each rule compiled into
a direct check), so the central store (which never imports ``edge_agent``) and the agent
validate envelopes with the same rules, read from one registry file (``event_types.json``).

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
import re
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cache
from importlib import resources
from typing import Any, Final, NamedTuple

from cloud_sync.envelope_compile import WRONG, FieldsCheck, compile_fields
from cloud_sync.envelope_rules import (
    DEFAULT_MAX_ITEMS,
    DEFAULT_MAX_STRING,
    PYTHON_TYPES,
    FieldSpec,
    Rule,
    make_rule,
)

__all__ = [
    "ENVELOPE_FIELDS",
    "MAX_ID_LENGTH",
    "Cleaned",
    "FieldSpec",
    "Registry",
    "Rule",
    "TypeSpec",
    "check_envelope",
    "check_envelope_head",
    "default_registry",
    "parse_registry",
]

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


@dataclass(frozen=True, slots=True)
class TypeSpec:
    name: str
    customer: bool  # a customer interaction (kept longest), as opposed to telemetry
    fields: tuple[FieldSpec, ...]
    data: Rule = field(default_factory=lambda: make_rule(("object",)))  # the whole data object
    # ``data``'s fields compiled once into a direct check (the object itself is checked by
    # the caller, without data's own bound on keys: its fields are declared one by one).
    clean: FieldsCheck = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "clean", compile_fields(self.data))

    @property
    def identity_fields(self) -> frozenset[str]:
        return frozenset(f.name for f in self.fields if f.identity)


class Cleaned(NamedTuple):  # a tuple: built for every event, cheaper than a dataclass
    """``data`` with only its declared fields, and how many undeclared ones were dropped."""

    data: dict[str, Any]
    dropped: int


_cleaned: Final = functools.partial(tuple.__new__, Cleaned)  # Cleaned without its Python __new__


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
        if clean is WRONG:
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


def _parsemake_rule(where: str, rule: Mapping[str, Any]) -> Rule:
    kinds = rule.get("type") or ("object" if "fields" in rule else None)
    kinds = (kinds,) if isinstance(kinds, str) else tuple(kinds or ())
    unknown = [k for k in kinds if k not in PYTHON_TYPES]
    if not kinds or unknown:
        raise ValueError(f"{where}: unknown or missing field kinds {unknown or kinds}")
    if "array" in kinds and "items" not in rule:
        raise ValueError(f"{where}: an array must declare its items")
    if "object" in kinds and "fields" not in rule and "values" not in rule:
        raise ValueError(f"{where}: an object must declare its fields or its values")
    pattern = rule.get("key_pattern")
    return make_rule(
        kinds,
        nullable=bool(rule.get("nullable", False)),
        max_length=int(rule.get("max_length", DEFAULT_MAX_STRING)),
        items=_parsemake_rule(f"{where}[]", rule["items"]) if "items" in rule else None,
        max_items=int(rule.get("max_items", DEFAULT_MAX_ITEMS)),
        fields={f.name: f for f in _parse_fields(where, rule.get("fields", {}))},
        values=_parsemake_rule(f"{where}{{}}", rule["values"]) if "values" in rule else None,
        key_pattern=re.compile(pattern) if pattern else None,
    )


def _parse_fields(where: str, fields: Mapping[str, Any]) -> tuple[FieldSpec, ...]:
    specs = []
    for name, rule in fields.items():
        spec = FieldSpec(
            name,
            _parsemake_rule(f"{where}.{name}", rule),
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
        data = make_rule(("object",), fields={f.name: f for f in fields})
        types[name] = TypeSpec(name, bool(spec["customer"]), fields, data)
    return Registry(int(document["version"]), types)


@cache
def default_registry() -> Registry:
    text = resources.files("cloud_sync").joinpath("event_types.json").read_text("utf-8")
    return parse_registry(json.loads(text))
