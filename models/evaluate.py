"""Leave-last-out evaluation: the model against global and session popularity.

For each consenting customer the last take is the target and the earlier trigger events the
context. Every method ranks the whole catalogue with the items the customer already took
masked, and is scored by HitRate@k, NDCG@k and MRR@k.

The baselines are described in ``models.baselines``.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

from tqdm import tqdm

from models.baselines import PopularityBaselines, RankMetrics
from models.events import EventLog, Interaction, load_event_log, split_last_take
from models.serving import SuggestionModel

logger = logging.getLogger(__name__)

# The report's methods, in its order: the model and its two baselines.
METHODS: Final = ("model", "popularity", "session_popularity")


@dataclass(frozen=True, slots=True)
class EvaluationCase:
    customer_id: str
    context: list[Interaction]
    target: Interaction

    @property
    def history(self) -> list[tuple[str, str, float]]:
        return [(event.sku, event.event_type, event.ts) for event in self.context]

    @property
    def suggestion_context(self) -> tuple[int, str, str | None]:
        """Hour, store and device of the latest context event: when the suggestion is made."""
        last = self.context[-1]
        return datetime.fromtimestamp(last.ts, UTC).hour, last.store_id, last.device_id

    @property
    def taken(self) -> set[str]:
        return {event.sku for event in self.context}


def evaluation_cases(log: EventLog) -> Iterator[EvaluationCase]:
    """One case per consenting customer with a target and at least one earlier take."""
    for customer in sorted(log.consenting(), key=lambda timeline: timeline.customer_id):
        context, target = split_last_take(customer.interactions)
        if target is not None and context:
            yield EvaluationCase(customer.customer_id, context, target)


class HitRateCurve:
    """HitRate@k for every k up to ``max_k``: the rank of each case's target (0: missed)."""

    def __init__(self, max_k: int) -> None:
        self.max_k = max_k
        self.ranks: list[int] = []

    def add(self, ranked: list[str], target: str) -> None:
        top = ranked[: self.max_k]
        self.ranks.append(top.index(target) + 1 if target in top else 0)

    def hit_rates(self) -> list[float]:
        """Element k-1 is HitRate@k, for k = 1..max_k."""
        count = max(len(self.ranks), 1)
        hits_at = [0] * (self.max_k + 1)
        for rank in self.ranks:
            hits_at[rank] += 1  # rank 0 (a miss) is never summed below
        rates, hits = [], 0
        for k in range(1, self.max_k + 1):
            hits += hits_at[k]
            rates.append(hits / count)
        return rates


def evaluate(
    model: SuggestionModel,
    log: EventLog,
    *,
    cutoff: int = 10,
    progress: bool | None = None,
    curves: dict[str, HitRateCurve] | None = None,
) -> dict[str, Any]:
    """The contract's report: model, popularity and session_popularity metrics, customers.

    With ``curves`` (a name of METHODS → HitRateCurve, e.g. for a plot), every method ranks
    ``max_k`` deep and fills the curves; the report is the same, since each ranking is
    best-first and only its first ``cutoff`` items are scored.
    """
    progress = sys.stderr.isatty() if progress is None else progress
    depth = max([cutoff, *(curve.max_k for curve in (curves or {}).values())])
    cases = list(evaluation_cases(log))
    # The baselines learn from what a --holdout-last model trains on: no target is counted.
    training = [
        event
        for timeline in log.consenting()
        for event in split_last_take(timeline.interactions)[0]
    ]
    baselines = PopularityBaselines(training, model.items)
    metrics = {name: RankMetrics(cutoff) for name in METHODS}
    for case in tqdm(cases, desc="evaluate", disable=not progress):
        taken, target, last = case.taken, case.target.sku, case.context[-1]
        suggested = model.suggest(case.history, case.suggestion_context, taken, k=depth)
        rankings = {
            "model": [sku for sku, _ in suggested],
            "popularity": baselines.global_ranking(taken, depth),
            "session_popularity": baselines.session_ranking(last.store_id, last.ts, taken, depth),
        }
        for name, ranked in rankings.items():
            metrics[name].add(ranked, target)
        for name, curve in (curves or {}).items():
            curve.add(rankings[name], target)
    report: dict[str, Any] = {name: metrics[name].report() for name in METHODS}
    report["customers"] = len(cases)
    logger.info("evaluate.complete customers=%d", len(cases))
    return report


def evaluate_files(
    model_dir: Path,
    events: Path,
    *,
    cutoff: int = 10,
    curves: dict[str, HitRateCurve] | None = None,
) -> dict[str, Any]:
    model = SuggestionModel.load(model_dir)
    training = model.manifest.raw.get("training", {})
    if training.get("events_file") == events.name and not training.get("holdout_last"):
        # the targets were in the training data: the figures flatter the model
        logger.warning(
            "evaluate.leak model=%s trained on %s without --holdout-last", model_dir, events
        )
    return evaluate(model, load_event_log(events), cutoff=cutoff, curves=curves)
