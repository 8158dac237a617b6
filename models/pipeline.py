"""Events file in, verified model directory out: train, export, and (with a holdout) score."""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path
from typing import Any, Final

from models.evaluate import evaluate
from models.events import format_ts, load_event_log
from models.export import GoldenInput, write_model_dir
from models.manifest import MANIFEST_NAME, write_json_atomically
from models.serving import SuggestionModel
from models.train import TrainedModel, TrainingParams, train_model

logger = logging.getLogger(__name__)

GOLDEN_REQUESTS = 3
# Golden requests ship to every agent and can never be erased there, so they are made up:
# skus picked from the catalogue by a fixed stride, at fixed synthetic times, never a real
# customer's history (issue 10).
_SYNTHETIC_NOW: Final = 1_767_225_600.0  # 2026-01-01T00:00:00Z
_SYNTHETIC_TYPES: Final = ("kiosk.view", "product.pickup", "basket.add", "product.scan")
_STRIDES: Final = (7919, 104_729, 1_299_709)


def golden_inputs(trained: TrainedModel) -> list[GoldenInput]:
    """A few deterministic synthetic requests, plus a cold and a masked one."""
    items, spec = trained.items, trained.spec
    requests: list[GoldenInput] = []
    for number in range(GOLDEN_REQUESTS):
        length = min(4 + 3 * number, len(items))
        history = tuple(
            (
                items[(number + 1 + step * _STRIDES[number]) % len(items)],
                _SYNTHETIC_TYPES[step % len(_SYNTHETIC_TYPES)],
                _SYNTHETIC_NOW - 60.0 * (length - step),
            )
            for step in range(length)
        )
        store = spec.stores[number % len(spec.stores)] if spec.stores else "store-unknown"
        device = spec.devices[number % len(spec.devices)] if spec.devices else None
        requests.append(
            GoldenInput(
                history=history, context=(9 + 4 * number, store, device), now=_SYNTHETIC_NOW
            )
        )
    store = spec.stores[0] if spec.stores else "store-unknown"
    requests.append(GoldenInput(history=(), context=(9, store, None)))
    requests.append(replace(requests[0], penalty_skus=tuple(items[:50])))
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
    until: float | None = None,
) -> tuple[SuggestionModel, dict[str, Any]]:
    """Train on ``events`` and write ``out_dir``; returns the loaded model and its metrics
    (the holdout evaluation when ``holdout_last``, else the training statistics only).
    With ``until`` only the interactions before that time are used (a time-based holdout:
    ``edge-models evaluate --holdout-from`` scores what comes after)."""
    log = load_event_log(events)
    if until is not None:
        log = log.until(until)
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
    if until is not None:  # only then: the bundled model's manifest stays byte for byte
        extra["training"]["until"] = format_ts(until)
    model = write_model_dir(
        out_dir,
        tensors=trained.tensors,
        items=trained.items,
        spec=trained.spec,
        top_k=top_k,
        golden_inputs=golden_inputs(trained),
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
