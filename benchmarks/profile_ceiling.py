"""The ceiling of what any profile can add at a store: an oracle that knows the simulator.

The simulator (``models.simulator``) draws a shopper's next take as a complement of the last
take (chance ``complement_rate``, one of its three complements) or else from the customer's
*true* category affinity and topic taste at the visit's hour, avoiding what the customer took
recently. ``OracleRanker`` ranks by that very distribution: it knows the customer's hidden
taste exactly, which no history (local, central or both) can tell better. Its HitRate@10 is
therefore an upper bound for the "with profile" figure, and its ratio to the "without" figure
is the largest benefit a central profile could bring in this world.

``OracleRanker.rank_estimated`` is the same ranker with the taste *estimated* from the history
it is given (the posterior mean of the simulator's Dirichlet priors over topics and
categories, counting the history's takes by the items' true topic and category): what a model
that knew the world's structure exactly could make of the local history vs the merged one.

Approximations (all in the oracle's favour or neutral): the visit's hour is taken from the
trigger's time (the simulator fixes it at the visit's start, seconds to minutes earlier);
the rejection of recently taken items is applied as a mask; accepted suggestions (which
replace a draw with a shown item) are ignored.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final

import numpy as np
import numpy.typing as npt

from models.simulator import RECENT_MEMORY, ShopperSimulator, SimulationConfig

SECONDS_PER_DAY: Final = 86_400.0
TOPIC_PRIOR: Final = 0.25  # the simulator's Dirichlet concentrations (build_customers)
CATEGORY_PRIOR: Final = 0.6


class OracleRanker:
    """Top-k by the simulator's own next-take distribution, for one simulated world."""

    def __init__(self, config: SimulationConfig) -> None:
        simulator = ShopperSimulator(config)  # same seed: the same catalogue and customers
        self.config = config
        self.catalogue = catalogue = simulator.catalogue
        self.customers = {customer.customer_id: customer for customer in simulator.customers}
        self.index = {sku: index for index, sku in enumerate(catalogue.skus)}
        self._weights = catalogue.popularity**0.6  # within a category, before taste
        self._categories = len(catalogue.category_items)

    def distribution(
        self,
        customer_id: str,
        ts: float,
        last_sku: str | None,
        estimate_from: Sequence[str] | None = None,
    ) -> npt.NDArray[np.float64]:
        """P(next take = item) as the simulator draws it (before the recent-items rejection),
        with the customer's true taste, or the one estimated from ``estimate_from`` (skus)."""
        catalogue, customer = self.catalogue, self.customers[customer_id]
        taste_of_topic, affinity = customer.taste, customer.category_affinity
        if estimate_from is not None:
            taste_of_topic, affinity = self._estimate(estimate_from)
        hour = (ts % SECONDS_PER_DAY) / 3600.0
        closeness = np.exp(-((hour - catalogue.category_peak) ** 2) / 8.0)
        category_weights = affinity * (1.0 + catalogue.category_peak_strength * closeness)
        category_share = category_weights / category_weights.sum()
        fit = 0.01 + taste_of_topic[catalogue.topic]
        within = self._weights * fit**2
        totals = np.bincount(catalogue.category, weights=within, minlength=len(category_share))
        taste: npt.NDArray[np.float64] = (
            within / totals[catalogue.category] * category_share[catalogue.category]
        )
        last = self.index.get(last_sku) if last_sku is not None else None
        if last is None:
            return taste
        complement = np.zeros_like(taste)
        np.add.at(complement, catalogue.complements[last], 1.0 / 3.0)
        rate = self.config.complement_rate
        mixed: npt.NDArray[np.float64] = rate * complement + (1.0 - rate) * taste
        return mixed

    def _estimate(
        self, skus: Sequence[str]
    ) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
        """Posterior means of topic taste and category affinity (the simulator's priors:
        Dirichlet 0.25 over topics, 0.6 over categories) given the takes in ``skus``."""
        known = [self.index[sku] for sku in skus if sku in self.index]
        topics = np.full(self.config.topics, TOPIC_PRIOR)
        categories = np.full(self._categories, CATEGORY_PRIOR)
        if known:
            topics += np.bincount(self.catalogue.topic[known], minlength=self.config.topics)
            categories += np.bincount(self.catalogue.category[known], minlength=self._categories)
        return topics / topics.sum(), categories / categories.sum()

    def rank(
        self,
        customer_id: str,
        ts: float,
        last_sku: str | None,
        past: Sequence[str],
        k: int,
        *,
        estimate: bool = False,
    ) -> list[str]:
        """The k most likely next takes; the customer's last ``RECENT_MEMORY`` distinct
        takes (``past``, oldest first) are masked, as the simulator avoids them. With
        ``estimate`` the taste is estimated from ``past`` instead of known."""
        scores = self.distribution(customer_id, ts, last_sku, past if estimate else None)
        recent: list[int] = []
        for sku in reversed(past):
            index = self.index.get(sku)
            if index is not None and (not recent or recent[-1] != index):
                recent.append(index)
            if len(recent) == RECENT_MEMORY:
                break
        scores[recent] = -1.0
        top = np.argsort(-scores, kind="stable")[:k]
        return [self.catalogue.skus[index] for index in top]
