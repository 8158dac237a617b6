"""The evaluation gate: a candidate model against the current one, written to
``evaluation.json`` for ``customer-store model publish``.

Two measurements on the same events file, split in time at a cut ``T``
(``--holdout-from T``, or ``--holdout-days N``: ``T`` = the file's last event time - N days):

1. **Time-based holdout, HitRate@k and NDCG@k.** Every take (consecutive trigger events on
   one sku) of a consenting customer that starts at or after ``T`` is a target; its context
   is everything that customer did before it (their earlier holdout takes too, as the agent
   would have seen them), the items of the context are masked, and the suggestion is made
   at the hour, store and device of the latest context event. A take without earlier
   context is not scored. Both models answer exactly the same cases. Models should be
   trained on events before ``T`` (``edge-models train --until T``); one whose training
   window reaches past ``T`` is flagged ``"leak": true`` (its figures flatter it).
2. **Off-policy, SNIPS** (``models.offpolicy``): over the ``suggestion.shown`` events at or
   after ``T`` of consenting customers, each model is the deterministic policy "show my top
   k for this customer's history before the suggestion, at its hour, store and device".

The rule (``beats_current``), with Δ = candidate - current:
- HitRate@k must not be worse by more than ``hr_tolerance`` (default 0.005, absolute);
- when both SNIPS estimates rest on at least ``min_snips_items`` logged items each (default
  30), SNIPS must not be significantly lower: Δ >= -1.96 x sqrt(se_candidate² +
  se_current²) (a one-sided 2.5 % non-inferiority check, delta-method standard errors);
  with less support SNIPS is reported but not compared (``snips_compared: false``);
- and the candidate must be better somewhere: Δ HitRate@k > 0, or SNIPS compared and Δ > 0.
With no current model there is nothing to beat: ``current`` is null, ``beats_current`` true.
"""

from __future__ import annotations

import bisect
import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

from models.baselines import PopularityBaselines, RankMetrics
from models.errors import EventDataError
from models.evaluate import EvaluationCase
from models.events import EventLog, collapse_takes, format_ts, load_event_log, parse_ts
from models.manifest import write_json_atomically
from models.offpolicy import FeedbackLog, Snips, SnipsEstimate, load_feedback
from models.serving import SuggestionModel

logger = logging.getLogger(__name__)

EVALUATION_FILE: Final = "evaluation.json"  # what cloud_sync.store.model_publish.gate reads
HR_TOLERANCE: Final = 0.005
MIN_SNIPS_ITEMS: Final = 30
Z_NON_INFERIORITY: Final = 1.96
DAY_S: Final = 86400.0


@dataclass(frozen=True, slots=True)
class GateRule:
    cutoff: int = 10
    hr_tolerance: float = HR_TOLERANCE
    min_snips_items: int = MIN_SNIPS_ITEMS
    z: float = Z_NON_INFERIORITY

    def describe(self) -> str:
        k = self.cutoff
        return (
            f"hit_rate@{k} >= current - {self.hr_tolerance}; snips >= current -"
            f" {self.z} x sqrt(se_c^2 + se_cur^2) when both rest on >= {self.min_snips_items}"
            f" logged items; and hit_rate@{k} or a compared snips strictly higher"
        )


def holdout_cases(log: EventLog, cut: float) -> Iterator[EvaluationCase]:
    """Every take starting at or after ``cut`` with earlier context, customers in id order."""
    for timeline in sorted(log.consenting(), key=lambda t: t.customer_id):
        position = 0
        for take in collapse_takes(timeline.interactions):
            first = take[0]
            if first.ts >= cut and position > 0:
                yield EvaluationCase(timeline.customer_id, timeline.interactions[:position], first)
            position += len(take)


def holdout_cut(log: EventLog, *, holdout_from: float | None, holdout_days: float | None) -> float:
    if holdout_from is not None:
        return holdout_from
    if holdout_days is None or holdout_days <= 0:
        raise EventDataError("a time holdout needs --holdout-from TS or --holdout-days N > 0")
    return log.last_ts - holdout_days * DAY_S


def _model_snips(
    model: SuggestionModel, log: EventLog, feedback: FeedbackLog, cutoff: int
) -> SnipsEstimate:
    estimator = Snips()
    times_of: dict[str, list[float]] = {}
    for suggestion in feedback.suggestions:
        timeline = log.timelines[suggestion.customer_id]  # consenting: evaluate_gate kept them
        times = times_of.get(timeline.customer_id)
        if times is None:
            times = times_of[timeline.customer_id] = [e.ts for e in timeline.interactions]
        history = timeline.interactions[: bisect.bisect_left(times, suggestion.ts)]
        hour = datetime.fromtimestamp(suggestion.ts, UTC).hour
        context = (hour, suggestion.store_id, suggestion.device_id or None)
        ranked = model.suggest(
            [(e.sku, e.event_type, e.ts) for e in history], context, k=cutoff, now=suggestion.ts
        )
        top = {sku for sku, _ in ranked}
        for sku, propensity in suggestion.items:
            estimator.add(1.0 if sku in top else 0.0, propensity, float(sku in suggestion.accepted))
    return estimator.result()


def _side(
    model: SuggestionModel, metrics: RankMetrics, estimate: SnipsEstimate, cut: float
) -> dict[str, Any]:
    report = metrics.report()
    k = metrics.cutoff
    window = model.manifest.raw.get("training_window")
    end = window.get("end") if isinstance(window, dict) else None
    end_ts = parse_ts(end)
    return {
        "version": model.version,
        f"hit_rate@{k}": report[f"hit_rate@{k}"],
        f"ndcg@{k}": report[f"ndcg@{k}"],
        **estimate.as_json(),
        "training_window_end": end,
        "leak": end_ts is not None and end_ts > cut,
    }


def decide(
    candidate: dict[str, Any], current: dict[str, Any] | None, rule: GateRule
) -> tuple[bool, dict[str, Any]]:
    """``beats_current`` and the figures it was decided on (see the module's rule)."""
    if current is None:
        return True, {"reason": "no current model: nothing to beat"}
    key = f"hit_rate@{rule.cutoff}"
    hr_delta = float(candidate[key]) - float(current[key])
    hr_ok = hr_delta >= -rule.hr_tolerance
    compared = (
        candidate["snips"] is not None
        and current["snips"] is not None
        and min(candidate["snips_matched_items"], current["snips_matched_items"])
        >= rule.min_snips_items
    )
    snips_delta = snips_margin = None
    snips_ok = True
    if compared:
        snips_delta = float(candidate["snips"]) - float(current["snips"])
        spread = math.hypot(float(candidate["snips_se"]), float(current["snips_se"]))
        snips_margin = -rule.z * spread
        snips_ok = snips_delta >= snips_margin
    improves = hr_delta > 0 or (snips_delta is not None and snips_delta > 0)
    beats = hr_ok and snips_ok and improves
    if not hr_ok:
        reason = f"{key} worse by {-hr_delta:.4f} > tolerance {rule.hr_tolerance}"
    elif not snips_ok:
        reason = f"snips lower by {-(snips_delta or 0.0):.4f}, beyond {-(snips_margin or 0.0):.4f}"
    elif not improves:
        reason = "not better on any measure"
    else:
        reason = "beats_current"
    return beats, {
        "reason": reason,
        "hit_rate_delta": round(hr_delta, 6),
        "hit_rate_ok": hr_ok,
        "snips_compared": compared,
        "snips_delta": None if snips_delta is None else round(snips_delta, 6),
        "snips_margin": None if snips_margin is None else round(snips_margin, 6),
        "snips_ok": snips_ok,
    }


def evaluate_gate(
    candidate_dir: Path,
    events: Path,
    *,
    current_dir: Path | None = None,
    holdout_from: float | None = None,
    holdout_days: float | None = None,
    rule: GateRule | None = None,
    write: bool = True,
) -> dict[str, Any]:
    """Score the candidate (and the current model) and write ``evaluation.json`` into the
    candidate's directory; returns the document."""
    rule = rule or GateRule()
    log = load_event_log(events)
    cut = holdout_cut(log, holdout_from=holdout_from, holdout_days=holdout_days)
    cases = list(holdout_cases(log, cut))
    if not cases:
        raise EventDataError(f"{events}: no take at or after {format_ts(cut)} to evaluate")
    feedback = load_feedback(events, since=cut)
    consenting = {timeline.customer_id for timeline in log.consenting()}
    kept = [s for s in feedback.suggestions if s.customer_id in consenting]
    if len(kept) < len(feedback.suggestions):  # as in training: no consent, no evaluation
        feedback.skipped["shown_customer_not_consenting"] += len(feedback.suggestions) - len(kept)
        feedback.suggestions = kept
    models = {"candidate": SuggestionModel.load(candidate_dir)}
    if current_dir is not None:
        models["current"] = SuggestionModel.load(current_dir)
    training = [e for t in log.until(cut).consenting() for e in t.interactions]
    baselines = PopularityBaselines(training, models["candidate"].items)
    metrics = {name: RankMetrics(rule.cutoff) for name in (*models, "popularity")}
    for case in cases:
        taken, target = case.taken, case.target.sku
        for name, model in models.items():
            suggested = model.suggest(case.history, case.suggestion_context, taken, k=rule.cutoff)
            metrics[name].add([sku for sku, _ in suggested], target)
        metrics["popularity"].add(baselines.global_ranking(taken, rule.cutoff), target)
    sides = {
        name: _side(model, metrics[name], _model_snips(model, log, feedback, rule.cutoff), cut)
        for name, model in models.items()
    }
    beats, decision = decide(sides["candidate"], sides.get("current"), rule)
    document: dict[str, Any] = {
        "candidate": sides["candidate"],
        "current": sides.get("current"),
        "beats_current": beats,
        "decision": decision,
        "rule": rule.describe(),
        "holdout": {
            "from": format_ts(cut),
            "events_file": events.name,
            "cases": len(cases),
            "customers": len({case.customer_id for case in cases}),
            "popularity": metrics["popularity"].report(),
        },
        "feedback": {
            "suggestions": len(feedback.suggestions),
            "logged_items": sum(len(s.items) for s in feedback.suggestions),
            "accepted": sum(1 for s in feedback.suggestions if s.accepted),
            "by_version": dict(sorted(feedback.by_version().items())),
            "skipped": dict(sorted(feedback.skipped.items())),
        },
    }
    if write:
        write_json_atomically(candidate_dir / EVALUATION_FILE, document)
    logger.info(
        "gate.evaluated candidate=%s current=%s beats=%s reason=%s",
        sides["candidate"]["version"],
        sides["current"]["version"] if "current" in sides else None,
        beats,
        decision["reason"],
    )
    return document
