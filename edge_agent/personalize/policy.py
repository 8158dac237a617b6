"""What the personalizer may show: masked skus (consent is governance's ``ConsentLedger``).

Masks: out-of-stock and policy-blocked skus come from two plain text files (one sku per line,
``#`` comments), re-read when they change, so a store system or a person can update them
without a restart. The basket and the picked item are masked per request by the caller.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)


@dataclass
class _WatchedFile:
    path: Path
    signature: tuple[int, int] | None = None  # (mtime_ns, size) when last read
    skus: frozenset[str] = frozenset()


class MaskFiles:
    """Out-of-stock and blocked skus from text files; ``refresh()`` runs off the loop."""

    def __init__(self, *paths: Path) -> None:
        self._files = [_WatchedFile(path) for path in paths]
        self.skus: frozenset[str] = frozenset()  # replaced whole: readers never see a half set

    def refresh(self) -> bool:
        """Re-read the files that changed; returns whether the mask changed."""
        changed = False
        for watched in self._files:
            try:
                stat = watched.path.stat()
            except FileNotFoundError:
                changed |= bool(watched.skus)
                watched.signature, watched.skus = None, frozenset()
                continue
            signature = (stat.st_mtime_ns, stat.st_size)
            if signature == watched.signature:
                continue
            watched.signature = signature
            try:
                text = watched.path.read_text("utf-8")
            except (OSError, UnicodeDecodeError) as exc:
                log.warning("mask.file.unreadable path=%s error=%r", watched.path, exc)
                continue
            watched.skus = frozenset(_skus(text))
            changed = True
            log.info("mask.file.loaded path=%s skus=%d", watched.path, len(watched.skus))
        if changed:
            self.skus = frozenset().union(*(watched.skus for watched in self._files))
        return changed


def _skus(text: str) -> list[str]:
    lines = (line.split("#", 1)[0].strip() for line in text.splitlines())
    return [line for line in lines if line]
