"""Events file in, verified model directory out: train, export, and (with a holdout) score."""

from __future__ import annotations

import logging
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from models.evaluate import evaluate
from models.events import EventLog, format_ts, load_event_log, split_last_take
from models.export import GoldenInput, write_model_dir
from models.manifest import MANIFEST_NAME, write_json_atomically
from models.serving import SuggestionModel
from models.train import TrainedModel, TrainingParams, train_model

logger = logging.getLogger(__name__)

GOLDEN_CUSTOMERS = 3


def golden_inputs(log: EventLog, trained: TrainedModel, *, holdout_last: bool) -> list[GoldenInput]:
    """A few deterministic requests from the training data, plus a cold and a masked one."""
    requests: list[GoldenInput] = []
    for timeline in sorted(log.consenting(), key=lambda t: t.customer_id):
        interactions = timeline.interactions
        if holdout_last:
            interactions, _ = split_last_take(interactions)
        if len(interactions) < 3:
            continue
        recent = interactions[-10:]
        last = recent[-1]
        hour = datetime.fromtimestamp(last.ts, UTC).hour
        requests.append(
            GoldenInput(
                history=tuple((event.sku, event.event_type, event.ts) for event in recent),
                context=(hour, last.store_id, last.device_id),
                now=last.ts,
            )
        )
        if len(requests) == GOLDEN_CUSTOMERS:
            break
    store = trained.spec.stores[0] if trained.spec.stores else "store-unknown"
    requests.append(GoldenInput(history=(), context=(9, store, None)))
    if requests[0].history:
        first = requests[0]
        requests.append(replace(first, penalty_skus=tuple(trained.items[:50])))
    return requests


def train_to_dir(
    events: Path,
    out_dir: Path,
    *,
    holdout_last: bool = False,
    params: TrainingParams | None = None,
    top_k: int = 10,
    version: str | None = None,
    created_at: str | None = None,
    progress: bool | None = None,
) -> tuple[SuggestionModel, dict[str, Any]]:
    """Train on ``events`` and write ``out_dir``; returns the loaded model and its metrics
    (the holdout evaluation when ``holdout_last``, else the training statistics only)."""
    log = load_event_log(events)
    trained = train_model(log, params, holdout_last=holdout_last, progress=progress)
    extra: dict[str, Any] = {
        "training_window": {"start": format_ts(log.first_ts), "end": format_ts(log.last_ts)},
        "training": {
            "events_file": events.name,
            "holdout_last": holdout_last,
            "stats": trained.stats,
            "params": trained.params_json(),
        },
        "metrics": {},
    }
    model = write_model_dir(
        out_dir,
        tensors=trained.tensors,
        items=trained.items,
        spec=trained.spec,
        top_k=top_k,
        golden_inputs=golden_inputs(log, trained, holdout_last=holdout_last),
        extra=extra,
        version=version,
        created_at=created_at,
    )
    metrics: dict[str, Any] = {}
    if holdout_last:
        metrics = {"holdout_last": evaluate(model, log, progress=progress)}
        document = dict(model.manifest.raw, metrics=metrics)
        write_json_atomically(out_dir / MANIFEST_NAME, document)
        model = SuggestionModel.load(out_dir)
    logger.info("pipeline.trained dir=%s version=%s", out_dir, model.version)
    return model, metrics
