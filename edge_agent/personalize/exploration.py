"""Epsilon exploration in one slot, with the propensity of every item shown.

The first k-1 slots are the model's top k-1 (shown with probability 1 given the request).
With probability epsilon the last slot shows an item drawn uniformly from the catalogue
(minus masked items and the items already shown, and minus the greedy last item), else the
model's k-th item. The logged propensities are the probabilities the policy had of showing
each item in its slot, so later training and off-policy evaluation can reweight
(inverse propensity) without bias.
"""

from __future__ import annotations

import random
from collections.abc import Collection, Sequence
from dataclasses import dataclass

# Rejection sampling is fast when few items are excluded; beyond this many tries, build the pool.
_MAX_DRAWS = 32


@dataclass(frozen=True, slots=True)
class Catalogue:
    """The items exploration draws from (a model's vocabulary), with fast membership."""

    items: tuple[str, ...]
    members: frozenset[str]

    @classmethod
    def of(cls, items: Sequence[str]) -> Catalogue:
        return cls(tuple(items), frozenset(items))


@dataclass(frozen=True, slots=True)
class Slate:
    items: list[tuple[str, float]]  # (sku, score), in display order
    propensities: list[float]  # same order: probability of showing that item in that slot
    explored_slot: int | None  # the slot holding an exploratory item, if any


def deterministic(items: list[tuple[str, float]]) -> Slate:
    """A ranking without exploration (fallbacks): every item is certain."""
    return Slate(items, [1.0] * len(items), None)


def explore(
    greedy: list[tuple[str, float]],
    catalogue: Catalogue,
    masked: Collection[str],
    epsilon: float,
    rng: random.Random,
) -> Slate:
    """Apply one exploration slot to the model's ranking ``greedy`` (best first)."""
    if not greedy or epsilon <= 0.0:
        return deterministic(greedy)
    head = greedy[:-1]
    last = greedy[-1]
    excluded = set(masked).union(sku for sku, _ in greedy)
    pool_size = len(catalogue.items) - sum(1 for sku in excluded if sku in catalogue.members)
    if pool_size <= 0:
        return deterministic(greedy)
    propensities = [1.0] * len(head)
    if rng.random() >= epsilon:
        return Slate(greedy, [*propensities, 1.0 - epsilon], None)
    pick = _draw(catalogue.items, excluded, rng)
    # An exploratory item gets the lowest score shown, so a display that sorts keeps its slot.
    score = min(last[1], head[-1][1] if head else last[1])
    return Slate([*head, (pick, score)], [*propensities, epsilon / pool_size], len(head))


def _draw(catalogue: Sequence[str], excluded: set[str], rng: random.Random) -> str:
    for _ in range(_MAX_DRAWS):
        candidate = catalogue[rng.randrange(len(catalogue))]
        if candidate not in excluded:
            return candidate
    pool = [sku for sku in catalogue if sku not in excluded]
    return pool[rng.randrange(len(pool))]
