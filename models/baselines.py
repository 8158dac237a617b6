"""The non-personal rankings the model is measured against, and the ranking metrics.

- global popularity: how often each item was taken in the training portion of the data;
- session popularity: how often it was taken in the customer's current store during the
  24 hours before the suggestion, ties broken by global popularity. This is the agent's
  own first fallback. The literal "popular within the current session" would only re-rank
  items the customer already took, which evaluation masks, so it would collapse into
  global popularity.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Iterable
from typing import Final

import numpy as np
import numpy.typing as npt

from models.events import Interaction

SESSION_WINDOW_S: Final = 86400.0


class RankMetrics:
    """HitRate@k, NDCG@k (one relevant item) and MRR@k over the cases added."""

    def __init__(self, cutoff: int) -> None:
        self.cutoff = cutoff
        self.hits = self.ndcg = self.reciprocal = 0.0
        self.cases = 0

    def add(self, ranked: list[str], target: str) -> None:
        self.cases += 1
        top = ranked[: self.cutoff]
        if target in top:
            rank = top.index(target) + 1
            self.hits += 1.0
            self.ndcg += 1.0 / math.log2(rank + 1)
            self.reciprocal += 1.0 / rank

    def report(self) -> dict[str, float]:
        count = max(self.cases, 1)
        k = self.cutoff
        return {
            f"hit_rate@{k}": round(self.hits / count, 6),
            f"ndcg@{k}": round(self.ndcg / count, 6),
            f"mrr@{k}": round(self.reciprocal / count, 6),
        }


class PopularityBaselines:
    """Both popularity rankings over one catalogue; ties go to the earlier sku in sort order."""

    def __init__(self, training: Iterable[Interaction], catalogue: Iterable[str] = ()) -> None:
        events = sorted(training, key=lambda event: event.ts)
        self.catalogue = sorted({event.sku for event in events} | set(catalogue))
        self.index = {sku: position for position, sku in enumerate(self.catalogue)}
        self.global_counts = np.zeros(len(self.catalogue), np.float64)
        taken_positions = np.array([self.index[event.sku] for event in events], np.intp)
        np.add.at(self.global_counts, taken_positions, 1.0)
        # below one, so any recent take outranks every tie-breaker
        self._tie_breaker = self.global_counts / (self.global_counts.max(initial=0.0) + 1.0)
        self._by_store: dict[str, tuple[list[float], list[int]]] = {}
        for event in events:
            times, positions = self._by_store.setdefault(event.store_id, ([], []))
            times.append(event.ts)
            positions.append(self.index[event.sku])

    def global_ranking(self, taken: set[str], cutoff: int) -> list[str]:
        return self._rank(self.global_counts, taken, cutoff)

    def session_ranking(self, store_id: str, now: float, taken: set[str], cutoff: int) -> list[str]:
        times, positions = self._by_store.get(store_id, ([], []))
        start = bisect.bisect_left(times, now - SESSION_WINDOW_S)
        end = bisect.bisect_right(times, now)
        recent = np.bincount(positions[start:end], minlength=len(self.catalogue))
        return self._rank(recent + self._tie_breaker, taken, cutoff)

    def _rank(self, scores: npt.NDArray[np.float64], taken: set[str], cutoff: int) -> list[str]:
        masked = scores.astype(np.float64, copy=True)
        positions = np.array([self.index[sku] for sku in taken if sku in self.index], np.intp)
        masked[positions] = -np.inf
        order = np.argsort(-masked, kind="stable")
        order = order[np.isfinite(masked[order])][:cutoff]  # a masked item is never ranked
        return [self.catalogue[int(position)] for position in order]
