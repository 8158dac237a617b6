"""The event envelope's schema, shared by the agent and the central store.

This module is pure standard library and imports nothing else from the project, so the
central store (which never imports ``edge_agent``) and the agent validate envelopes with the
same rules, read from one registry file (``event_types.json``).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import Any, Final

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

_PYTHON_TYPES: Final[Mapping[str, tuple[type, ...]]] = {
    "string": (str,),
    "number": (int, float),
    "integer": (int,),
    "boolean": (bool,),
    "object": (dict,),
    "array": (list,),
}


@dataclass(frozen=True, slots=True)
class FieldSpec:
    name: str
    kind: str
    required: bool

    def accepts(self, value: object) -> bool:
        # bool is an int in Python; a JSON true is never a number or an integer here.
        if isinstance(value, bool) and self.kind != "boolean":
            return False
        return isinstance(value, _PYTHON_TYPES[self.kind])


@dataclass(frozen=True, slots=True)
class TypeSpec:
    name: str
    customer: bool  # a customer interaction (kept longest), as opposed to telemetry
    fields: tuple[FieldSpec, ...]


@dataclass(frozen=True, slots=True)
class Registry:
    version: int
    types: Mapping[str, TypeSpec]

    def check_data(self, event_type: str, data: object) -> str | None:
        """Return why ``data`` does not fit ``event_type``, or None when it does."""
        spec = self.types.get(event_type)
        if spec is None:
            return "unknown_type"
        if not isinstance(data, dict):
            return "wrong_type"
        for field in spec.fields:
            if field.name not in data:
                if field.required:
                    return "missing_field"
                continue
            if not field.accepts(data[field.name]):
                return "wrong_type"
        return None

    def is_customer_type(self, event_type: str) -> bool:
        spec = self.types.get(event_type)
        return spec is not None and spec.customer


def _is_id(value: object) -> bool:
    return isinstance(value, str) and 0 < len(value) <= MAX_ID_LENGTH


def check_envelope(envelope: Mapping[str, Any], registry: Registry) -> str | None:
    """Return why a complete envelope is invalid, or None. Reasons are short snake_case words."""
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
    event_type = envelope["type"]
    if not isinstance(event_type, str):
        return "wrong_type"
    return registry.check_data(event_type, envelope.get("data", {}))


def parse_registry(document: Mapping[str, Any]) -> Registry:
    types: dict[str, TypeSpec] = {}
    for name, spec in document["types"].items():
        fields = tuple(
            FieldSpec(field, rule["type"], bool(rule.get("required", False)))
            for field, rule in spec["data"].items()
        )
        unknown = [f.kind for f in fields if f.kind not in _PYTHON_TYPES]
        if unknown:
            raise ValueError(f"event type {name!r} uses unknown field kinds {unknown}")
        types[name] = TypeSpec(name, bool(spec["customer"]), fields)
    return Registry(int(document["version"]), types)


@cache
def default_registry() -> Registry:
    text = resources.files("cloud_sync").joinpath("event_types.json").read_text("utf-8")
    return parse_registry(json.loads(text))
