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
from typing import Any

from tqdm import tqdm

from models.baselines import PopularityBaselines, RankMetrics
from models.events import EventLog, Interaction, load_event_log, split_last_take
from models.serving import SuggestionModel

logger = logging.getLogger(__name__)


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


def evaluate(
    model: SuggestionModel, log: EventLog, *, cutoff: int = 10, progress: bool | None = None
) -> dict[str, Any]:
    """The contract's report: model, popularity and session_popularity metrics, customers."""
    progress = sys.stderr.isatty() if progress is None else progress
    cases = list(evaluation_cases(log))
    # The baselines learn from what a --holdout-last model trains on: no target is counted.
    training = [
        event
        for timeline in log.consenting()
        for event in split_last_take(timeline.interactions)[0]
    ]
    baselines = PopularityBaselines(training, model.items)
    metrics = {name: RankMetrics(cutoff) for name in ("model", "popularity", "session")}
    for case in tqdm(cases, desc="evaluate", disable=not progress):
        taken, target, last = case.taken, case.target.sku, case.context[-1]
        suggested = model.suggest(case.history, case.suggestion_context, taken, k=cutoff)
        metrics["model"].add([sku for sku, _ in suggested], target)
        metrics["popularity"].add(baselines.global_ranking(taken, cutoff), target)
        session = baselines.session_ranking(last.store_id, last.ts, taken, cutoff)
        metrics["session"].add(session, target)
    report: dict[str, Any] = {
        "model": metrics["model"].report(),
        "popularity": metrics["popularity"].report(),
        "session_popularity": metrics["session"].report(),
        "customers": len(cases),
    }
    logger.info("evaluate.complete customers=%d", len(cases))
    return report


def evaluate_files(model_dir: Path, events: Path, *, cutoff: int = 10) -> dict[str, Any]:
    model = SuggestionModel.load(model_dir)
    training = model.manifest.raw.get("training", {})
    if training.get("events_file") == events.name and not training.get("holdout_last"):
        # the targets were in the training data: the figures flatter the model
        logger.warning(
            "evaluate.leak model=%s trained on %s without --holdout-last", model_dir, events
        )
    return evaluate(model, load_event_log(events), cutoff=cutoff)
