"""One decision, on the inference thread: model, else store popularity, else bestsellers.

``Ranker.decide`` is the only code that runs per request off the event loop. It reads the
current model once (a hot swap between two requests is invisible inside one), asks it for the
top k, applies the exploration slot, and falls back in order when there is no model, the
customer has no personalization consent, or the model raises. Masked items (out of stock,
blocked, in the basket, the picked item) are never returned, whoever ranks.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Final

from edge_agent.personalize.exploration import Slate, deterministic, explore
from edge_agent.personalize.fallback import Ranked, StorePopularity, top_k
from edge_agent.personalize.model_slot import ModelSlot
from edge_agent.personalize.session import HistoryEntry
from models import SuggestionContext

log = logging.getLogger(__name__)

MODEL: Final = "model"
STORE_POPULARITY: Final = "store_popularity"
BESTSELLERS: Final = "bestsellers"


class Masked:
    """A read-only union of sku sets, without copying them per request."""

    __slots__ = ("_parts",)

    def __init__(self, *parts: frozenset[str] | set[str]) -> None:
        self._parts = parts

    def __contains__(self, sku: object) -> bool:
        return any(sku in part for part in self._parts)

    def __iter__(self) -> Iterator[str]:
        seen: set[str] = set()
        for part in self._parts:
            for sku in part:
                if sku not in seen:
                    seen.add(sku)
                    yield sku

    def __len__(self) -> int:
        return sum(1 for _ in self)


@dataclass(frozen=True, slots=True)
class Request:
    history: list[HistoryEntry]  # oldest first; empty for a non-personal request
    context: SuggestionContext
    masked: Masked
    now: float  # the trigger's ts, seconds
    personal: bool  # personalization consent: may the model use this customer's history
    origin: tuple[int, int] = (0, 0)  # of ``history``: (local entries, central-profile entries)


@dataclass(frozen=True, slots=True)
class Decision:
    slate: Slate
    source: str  # "model" | "store_popularity" | "bestsellers"
    model_version: str | None  # the model that ranked, None for a fallback
    error: str | None = None  # why the model did not answer, when it raised
    history: tuple[int, int] = (0, 0)  # what the model saw: (local, central) entries


class Ranker:
    def __init__(
        self,
        slot: ModelSlot,
        popularity: StorePopularity,
        bestsellers: Ranked,
        *,
        k: int,
        epsilon: float,
        rng: random.Random | None = None,
    ) -> None:
        self.slot = slot
        self.popularity = popularity
        self.bestsellers = bestsellers
        self.k = k
        self.epsilon = epsilon
        self.rng = rng or random.Random()
        self.model_errors = 0  # written on the inference thread only

    def decide(self, request: Request) -> Decision:
        error: str | None = None
        loaded = self.slot.current  # read once: the whole request uses this model
        if request.personal and loaded is not None:
            try:
                greedy = loaded.model.suggest(
                    request.history, request.context, request.masked, k=self.k, now=request.now
                )
            except (
                Exception
            ) as exc:  # ModelRunError, onnxruntime's untyped errors: fall back, count
                self.model_errors += 1
                error = f"{type(exc).__name__}: {exc}"
                if self.model_errors == 1 or self.model_errors % 1000 == 0:
                    log.exception("model.call.failed errors=%d", self.model_errors)
            else:
                if greedy:
                    slate = explore(
                        greedy, loaded.catalogue, request.masked, self.epsilon, self.rng
                    )
                    return Decision(slate, MODEL, loaded.model.version, history=request.origin)
        return self.fallback(request.masked, error)

    def fallback(self, masked: Masked, error: str | None = None) -> Decision:
        """Store popularity when it has a full answer, else the static bestsellers."""
        popular = top_k(self.popularity.ranked, self.k, masked)
        if len(popular) >= self.k:
            return Decision(deterministic(popular), STORE_POPULARITY, None, error)
        best = top_k(self.bestsellers, self.k, masked)
        return Decision(deterministic(best), BESTSELLERS, None, error)
