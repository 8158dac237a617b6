"""The non-personal rankings: store popularity over the last day, then static bestsellers.

They answer when the model is missing, failed to load or raised, and for every customer
without personalization consent. Both are plain ranked lists read by the inference thread;
a refresh builds a new tuple and swaps the reference, so a reader never sees a half list.
"""

from __future__ import annotations

import collections
import json
import logging
import time
from collections.abc import Collection, Sequence
from functools import cache
from importlib import resources
from typing import TYPE_CHECKING, Final

if TYPE_CHECKING:
    from edge_agent.buffer import Buffer

log = logging.getLogger(__name__)

# What counts as "taking" an item for popularity: the same events the model learns from.
POPULAR_TYPES: Final = ("basket.add", "product.pickup", "product.scan", "kiosk.view")
FIRST_SCAN_MAX_ROWS: Final = 200_000  # bounds the first scan of a big buffer
BUCKET_S: Final = 3600.0
RANKED_MAX: Final = 500  # nobody shows the 501st most popular item

Ranked = tuple[tuple[str, float], ...]  # (sku, score in (0, 1]), best first


def top_k(ranked: Ranked, k: int, masked: Collection[str]) -> list[tuple[str, float]]:
    """The first ``k`` items of a ranking that are not masked."""
    chosen: list[tuple[str, float]] = []
    for sku, score in ranked:
        if sku not in masked:
            chosen.append((sku, score))
            if len(chosen) == k:
                break
    return chosen


class StorePopularity:
    """Item counts of this store's buffer over a sliding window, in hourly buckets.

    ``refresh`` asks the buffer only for the rows that arrived since the last refresh (a
    seq range), so it stays cheap however big the buffer is; buckets older than the window
    fall off.
    """

    def __init__(self, window_s: float) -> None:
        self.window_s = window_s
        self.ranked: Ranked = ()
        self.refreshed_at: float | None = None
        self._buckets: collections.OrderedDict[int, collections.Counter[str]] = (
            collections.OrderedDict()
        )
        self._last_seq: int | None = None

    async def refresh(self, buffer: Buffer, now: float | None = None) -> Ranked:
        now = time.time() if now is None else now
        if self._last_seq is None:
            self._last_seq = max(0, await buffer.newest_seq() - FIRST_SCAN_MAX_ROWS)
        rows = await buffer.items_taken(POPULAR_TYPES, self._last_seq, now - self.window_s)
        for seq, received_at, sku in rows:
            self._last_seq = seq
            if isinstance(sku, str):
                bucket = int(received_at // BUCKET_S)
                self._buckets.setdefault(bucket, collections.Counter())[sku] += 1
        oldest = int((now - self.window_s) // BUCKET_S)
        for bucket in [b for b in self._buckets if b < oldest]:
            del self._buckets[bucket]
        total: collections.Counter[str] = collections.Counter()
        for counts in self._buckets.values():
            total.update(counts)
        best = sorted(total.items(), key=lambda item: (-item[1], item[0]))[:RANKED_MAX]
        top = best[0][1] if best else 1
        self.ranked = tuple((sku, round(count / top, 4)) for sku, count in best)
        self.refreshed_at = now
        return self.ranked


@cache
def bestsellers() -> Ranked:
    """The bundled static list (``bestsellers.json``, taken from the default model)."""
    text = resources.files("edge_agent.personalize").joinpath("bestsellers.json").read_text()
    return parse_bestsellers(json.loads(text)["items"])


def parse_bestsellers(items: Sequence[Sequence[object]]) -> Ranked:
    ranked: list[tuple[str, float]] = []
    for entry in items:
        sku, score = entry[0], entry[1]
        if isinstance(sku, str) and isinstance(score, int | float):
            ranked.append((sku, float(score)))
    return tuple(ranked)
