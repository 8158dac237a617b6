"""Off-policy evaluation from the agent's logged suggestions: self-normalised IPS (SNIPS).

The agent logs every suggestion it shows as ``suggestion.shown`` (``suggestion_id``, the
``items`` in display order, ``propensities``: the probability its policy had of showing each
item in its slot, ``model_version``) and the acceptances as ``suggestion.accepted``
(``suggestion_id``, ``sku``). Each shown item is one logged decision with propensity ``p``
and reward ``r`` (1 when that item is the one accepted, else 0). A target policy that would
show the item with probability ``pi`` (for a deterministic model: 1 when the item is in its
top k for the same customer, time, store and device, else 0) is estimated to have an
acceptance per shown item of

    SNIPS = sum(r * pi / p) / sum(pi / p)

Self-normalising (dividing by the summed weights rather than the count) trades a small bias
for much less variance than plain IPS, and keeps the estimate within [0, 1]. Its standard
error is the delta-method one, ``sqrt(sum(w^2 (r - SNIPS)^2)) / sum(w)``; the effective
sample size ``(sum w)^2 / sum(w^2)`` says how many logged items the estimate really rests on.

Hostile or broken feedback is data: a propensity that is missing, not a number, NaN, 0 or
above 1, an item without an sku, a version that is not a string, an acceptance of a
suggestion never shown: each is counted under a reason and skipped, never fatal.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from models.events import iter_envelopes, parse_ts


@dataclass(slots=True)
class LoggedSuggestion:
    """One ``suggestion.shown``: its usable items, their propensities, what was accepted."""

    suggestion_id: str
    customer_id: str
    ts: float
    store_id: str
    device_id: str
    model_version: str | None
    items: list[tuple[str, float]]  # (sku, propensity), only the items with a valid propensity
    accepted: set[str] = field(default_factory=set)


@dataclass(slots=True)
class FeedbackLog:
    suggestions: list[LoggedSuggestion]
    skipped: Counter[str]  # reason -> count (suggestions, items or acceptances, as named)

    def by_version(self) -> Counter[str]:
        """The logging policy's version (``none``: a fallback) -> suggestions kept."""
        return Counter(s.model_version or "none" for s in self.suggestions)


def valid_propensity(value: Any) -> float | None:
    """A propensity the estimate can divide by: a finite number in (0, 1]; else None."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    number = float(value)
    return number if math.isfinite(number) and 0.0 < number <= 1.0 else None


def _sku_of(item: Any) -> str | None:
    if isinstance(item, str) and item:
        return item
    if isinstance(item, dict):
        sku = item.get("sku")
        if isinstance(sku, str) and sku:
            return sku
    return None


def _shown(envelope: dict[str, Any], ts: float, skipped: Counter[str]) -> LoggedSuggestion | None:
    data = envelope.get("data")
    customer_id = envelope.get("customer_id")
    if not isinstance(data, dict):
        skipped["shown_without_data"] += 1
        return None
    suggestion_id = data.get("suggestion_id")
    if not isinstance(suggestion_id, str) or not suggestion_id:
        skipped["shown_without_suggestion_id"] += 1
        return None
    if not isinstance(customer_id, str) or not customer_id:
        skipped["shown_without_customer"] += 1
        return None
    version = data.get("model_version")
    if version is not None and (not isinstance(version, str) or not version):
        skipped["shown_bad_version"] += 1
        return None
    items = data.get("items")
    propensities = data.get("propensities")
    if not isinstance(items, list) or not items:
        skipped["shown_without_items"] += 1
        return None
    if not isinstance(propensities, list) or len(propensities) != len(items):
        skipped["shown_without_propensities"] += 1
        return None
    usable: list[tuple[str, float]] = []
    for item, value in zip(items, propensities, strict=True):
        sku, propensity = _sku_of(item), valid_propensity(value)
        if sku is None:
            skipped["item_without_sku"] += 1
        elif propensity is None:
            skipped["item_bad_propensity"] += 1
        else:
            usable.append((sku, propensity))
    if not usable:
        skipped["shown_no_usable_item"] += 1
        return None
    return LoggedSuggestion(
        suggestion_id=suggestion_id,
        customer_id=customer_id,
        ts=ts,
        store_id=str(envelope.get("store_id") or ""),
        device_id=str(envelope.get("device_id") or ""),
        model_version=version,
        items=usable,
    )


def load_feedback(path: Path, *, since: float = -math.inf) -> FeedbackLog:
    """The suggestions shown at or after ``since`` and the acceptances (also at or after
    ``since``) naming them.

    An acceptance may come before its suggestion in the file (devices send in their own
    time); one naming no suggestion shown in the window is counted ``accepted_unknown``.
    """
    shown: dict[str, LoggedSuggestion] = {}
    accepted: list[tuple[str, str]] = []
    skipped: Counter[str] = Counter()
    for _, envelope in iter_envelopes(path):
        if envelope is None:
            continue  # load_event_log counts malformed lines already
        event_type = envelope.get("type")
        if event_type not in ("suggestion.shown", "suggestion.accepted"):
            continue
        ts = parse_ts(envelope.get("ts"))
        if ts is None:
            skipped["feedback_bad_ts"] += 1
            continue
        if ts < since:
            continue  # before the window: neither its suggestions nor their acceptances
        if event_type == "suggestion.shown":
            suggestion = _shown(envelope, ts, skipped)
            if suggestion is None:
                continue
            if suggestion.suggestion_id in shown:
                skipped["shown_duplicate"] += 1
                continue
            shown[suggestion.suggestion_id] = suggestion
            continue
        data = envelope.get("data")
        data = data if isinstance(data, dict) else {}
        suggestion_id, sku = data.get("suggestion_id"), data.get("sku")
        if not isinstance(suggestion_id, str) or not isinstance(sku, str) or not sku:
            skipped["accepted_without_suggestion_or_sku"] += 1
            continue
        accepted.append((suggestion_id, sku))
    for suggestion_id, sku in accepted:
        suggestion = shown.get(suggestion_id)
        if suggestion is None:
            skipped["accepted_unknown"] += 1
        else:
            suggestion.accepted.add(sku)
    ordered = sorted(shown.values(), key=lambda s: (s.ts, s.suggestion_id))
    return FeedbackLog(ordered, skipped)


@dataclass(frozen=True, slots=True)
class SnipsEstimate:
    value: float | None  # None: no logged item the target policy would show
    standard_error: float | None
    matched: int  # logged items with a positive weight
    effective_sample_size: float

    def as_json(self) -> dict[str, Any]:
        def rounded(x: float | None) -> float | None:
            return None if x is None else round(x, 6)

        return {
            "snips": rounded(self.value),
            "snips_se": rounded(self.standard_error),
            "snips_matched_items": self.matched,
            "snips_effective_sample_size": round(self.effective_sample_size, 2),
        }


class Snips:
    """Accumulates (target probability, logging propensity, reward) decisions."""

    def __init__(self) -> None:
        self._decisions: list[tuple[float, float]] = []  # (weight, reward), weight > 0

    def add(self, target_probability: float, propensity: float, reward: float) -> None:
        p = valid_propensity(propensity)
        if p is None:
            raise ValueError(f"propensity must be in (0, 1], got {propensity!r}")
        if not 0.0 <= target_probability <= 1.0:
            raise ValueError(f"target probability must be in [0, 1], got {target_probability!r}")
        if target_probability > 0.0:
            self._decisions.append((target_probability / p, reward))

    def result(self) -> SnipsEstimate:
        total = sum(weight for weight, _ in self._decisions)
        if total <= 0.0:
            return SnipsEstimate(None, None, 0, 0.0)
        value = sum(weight * reward for weight, reward in self._decisions) / total
        squares = sum(weight * weight for weight, _ in self._decisions)
        spread = sum(weight * weight * (reward - value) ** 2 for weight, reward in self._decisions)
        return SnipsEstimate(
            value=value,
            standard_error=math.sqrt(spread) / total,
            matched=len(self._decisions),
            effective_sample_size=total * total / squares,
        )


def snips(decisions: Iterable[tuple[float, float, float]]) -> SnipsEstimate:
    """SNIPS over (target probability, logging propensity, reward) triples."""
    estimator = Snips()
    for target_probability, propensity, reward in decisions:
        estimator.add(target_probability, propensity, reward)
    return estimator.result()
