"""Where each key of a TOML file is written: a line index for the config's error messages.

``tomllib`` returns plain dicts without positions and ``tomlkit`` keeps formatting but no line
numbers either, so this scans the text (already parsed by ``tomllib``, hence valid TOML) for
table headers and ``key =`` lines. It knows the shapes a config uses: ``[table]``,
``[[array.of.tables]]`` (numbered in order), dotted and quoted keys, multi-line strings and
arrays (skipped). A key it cannot place (inside an inline table, say) is reported at the line
of the nearest enclosing key or table it did place; the index only labels errors, it never
decides what is valid.
"""

from __future__ import annotations

import re
from typing import Final

Path = tuple[str | int, ...]

_HEADER: Final = re.compile(r"(\[\[?)([^\[\]]+)\]\]?")
_KEY_PART: Final = re.compile(r"\s*(?:\"((?:[^\"\\]|\\.)*)\"|'([^']*)'|([A-Za-z0-9_-]+))\s*")
_STRINGS: Final = re.compile(r"\"(?:[^\"\\]|\\.)*\"|'[^']*'")
_MULTILINE_QUOTES: Final = ('"""', "'''")


def key_lines(text: str) -> dict[Path, int]:
    """Each table, array-of-tables entry and key of ``text``, with its 1-based line."""
    lines: dict[Path, int] = {}
    table: Path = ()
    entries: dict[Path, int] = {}  # how many [[x]] headers so far, per array
    closing: str | None = None  # the quotes that end the multi-line string we are in
    depth = 0  # open brackets of a multi-line array or inline table value
    for number, line in enumerate(text.splitlines(), 1):
        if closing is not None:
            if closing in line:
                closing = None
            continue
        if depth > 0:
            depth = max(0, depth + _balance(line))
            continue
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        header = _HEADER.match(stripped)
        if header:
            parts = _split_key(header.group(2))
            if parts is None:
                continue
            if header.group(1) == "[[":
                index = entries.get(parts, 0)
                entries[parts] = index + 1
                lines.setdefault(parts, number)
                table = (*parts, index)
            else:
                table = parts
            lines.setdefault(table, number)
            continue
        key, equals, value = stripped.partition("=")
        parts = _split_key(key) if equals else None
        if parts is None:
            continue
        lines[(*table, *parts)] = number
        for quotes in _MULTILINE_QUOTES:
            if value.count(quotes) == 1:
                closing = quotes
        if closing is None:
            depth = max(0, _balance(value))
    return lines


def line_of(lines: dict[Path, int], path: Path) -> int | None:
    """The line of ``path``, else of its nearest placed parent, else None."""
    for end in range(len(path), 0, -1):
        found = lines.get(path[:end])
        if found is not None:
            return found
    return None


def _split_key(text: str) -> tuple[str, ...] | None:
    parts: list[str] = []
    for piece in _split_dots(text):
        match = _KEY_PART.fullmatch(piece)
        if match is None:
            return None
        parts.append(next(group for group in match.groups() if group is not None))
    return tuple(parts) if parts else None


def _split_dots(text: str) -> list[str]:
    pieces, start, quote = [], 0, ""
    for position, char in enumerate(text):
        if quote:
            quote = "" if char == quote else quote
        elif char in "\"'":
            quote = char
        elif char == ".":
            pieces.append(text[start:position])
            start = position + 1
    pieces.append(text[start:])
    return pieces


def _balance(text: str) -> int:
    """Opening minus closing brackets outside strings and comments (a rough count)."""
    bare = _STRINGS.sub("", text).partition("#")[0]
    return bare.count("[") + bare.count("{") - bare.count("]") - bare.count("}")
