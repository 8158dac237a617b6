"""The declared shape of an envelope's ``data``: the rules the registry file is parsed into.

Pure standard library, like every ``envelope_*`` module: the central store and the agent
share them (``envelope_schema`` parses the registry file, ``envelope_compile`` turns each
rule into a direct check).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final

# A declared string without its own max_length (the store adds its own field limits).
DEFAULT_MAX_STRING: Final = 1024
DEFAULT_MAX_ITEMS: Final = 1000

PYTHON_TYPES: Final[Mapping[str, tuple[type, ...]]] = {
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


def make_rule(kinds: tuple[str, ...], **options: Any) -> Rule:
    exact = {t for k in kinds for t in PYTHON_TYPES[k]}
    if options.get("nullable"):
        exact.add(type(None))
    return Rule(kinds, exact_types=frozenset(exact), **options)


@dataclass(frozen=True, slots=True)
class FieldSpec:
    name: str
    rule: Rule
    required: bool = False
    identity: bool = False  # names a person: pseudonymised like customer_id without consent
