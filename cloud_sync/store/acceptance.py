"""Fleet acceptance of a model version, and the rule that rolls a failing canary back.

From the uploaded ``suggestion.shown`` events of a version (``model_version``, ``items``,
``propensities``, ``explored_slot`` as the agent's recorder writes them) and the
``suggestion.accepted`` events naming their ``suggestion_id`` (same store):

- ``shown``: suggestions shown; ``accepted``: those with at least one acceptance;
- ``explored_shown``: suggestions with an exploratory slot; ``explored_accepted``: those whose
  accepted sku is the explored item;
- ``snips``: the self-normalised inverse propensity estimate of an item's acceptance,
  sum(r_i / p_i) / sum(1 / p_i) over every item shown with a logged propensity p_i > 0, where
  r_i is 1 when that item was the one accepted. Weighting by 1/p undoes the logging policy's
  preference for its own top items; null when no propensity was logged.

The rollback rule: a canary is rolled back when its acceptance rate is below the control's
(the promoted version, over the same period: since the canary started) with a one-sided
two-proportion z-test at p < 0.01 (z < -2.326), and each side has shown at least
``min_shown`` suggestions (default 500) so that a handful of early suggestions decides nothing.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Final

from cloud_sync.store.records import ShownRow

Z_ONE_SIDED_P01: Final = -2.326  # the 1st percentile of the standard normal
DEFAULT_MIN_SHOWN: Final = 500


@dataclass(frozen=True, slots=True)
class Performance:
    version: str
    stores: int
    shown: int
    accepted: int
    explored_shown: int
    explored_accepted: int
    snips: float | None

    @property
    def acceptance_rate(self) -> float | None:
        return self.accepted / self.shown if self.shown else None

    def as_json(self) -> dict[str, Any]:
        rate = self.acceptance_rate
        return {
            "version": self.version,
            "stores": self.stores,
            "shown": self.shown,
            "accepted": self.accepted,
            "acceptance_rate": None if rate is None else round(rate, 6),
            "explored_shown": self.explored_shown,
            "explored_accepted": self.explored_accepted,
            "snips": None if self.snips is None else round(self.snips, 6),
        }


def _skus(items: Any) -> list[str | None]:
    """The recorder writes items as {"sku", "score"} objects; plain strings are accepted too."""
    if not isinstance(items, list):
        return []
    skus: list[str | None] = []
    for item in items:
        if isinstance(item, str):
            skus.append(item)
        elif isinstance(item, dict) and isinstance(item.get("sku"), str):
            skus.append(item["sku"])
        else:
            skus.append(None)
    return skus


def _propensity(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if 0.0 < value <= 1.0 else None


class Tally:
    """Fleet acceptance, one suggestion at a time: memory stays constant however many."""

    def __init__(self, version: str) -> None:
        self.version = version
        self._stores: set[str] = set()
        self._shown = self._accepted = self._explored_shown = self._explored_accepted = 0
        self._weighted = self._weights = 0.0

    def add(self, row: ShownRow) -> None:
        self._stores.add(row.store_id)
        self._shown += 1
        taken = {sku for sku in row.accepted_skus if sku is not None}
        self._accepted += bool(row.accepted_skus)
        skus = _skus(row.data.get("items"))
        slot = row.data.get("explored_slot")
        if isinstance(slot, int) and not isinstance(slot, bool) and 0 <= slot < len(skus):
            self._explored_shown += 1
            self._explored_accepted += skus[slot] in taken
        propensities = row.data.get("propensities")
        if isinstance(propensities, list) and len(propensities) == len(skus):
            for sku, value in zip(skus, propensities, strict=True):
                p = _propensity(value)
                if p is None or sku is None:
                    continue
                self._weights += 1.0 / p
                self._weighted += (sku in taken) / p

    def result(self) -> Performance:
        return Performance(
            version=self.version,
            stores=len(self._stores),
            shown=self._shown,
            accepted=self._accepted,
            explored_shown=self._explored_shown,
            explored_accepted=self._explored_accepted,
            snips=self._weighted / self._weights if self._weights else None,
        )


def performance(version: str, rows: Iterable[ShownRow]) -> Performance:
    tally = Tally(version)
    for row in rows:
        tally.add(row)
    return tally.result()


@dataclass(frozen=True, slots=True)
class Verdict:
    roll_back: bool
    z: float | None
    reason: str

    def as_json(self) -> dict[str, Any]:
        return {
            "roll_back": self.roll_back,
            "z": None if self.z is None else round(self.z, 4),
            "reason": self.reason,
        }


def judge(canary: Performance, control: Performance, min_shown: int) -> Verdict:
    """One-sided two-proportion z-test of canary < control at p < 0.01 (pooled variance)."""
    if canary.shown < min_shown or control.shown < min_shown:
        return Verdict(
            False,
            None,
            f"too_few_shown canary={canary.shown} control={control.shown} min={min_shown}",
        )
    p1, p2 = canary.accepted / canary.shown, control.accepted / control.shown
    pooled = (canary.accepted + control.accepted) / (canary.shown + control.shown)
    variance = pooled * (1 - pooled) * (1 / canary.shown + 1 / control.shown)
    if variance <= 0:
        return Verdict(False, None, "no_variance")
    z = (p1 - p2) / math.sqrt(variance)
    if z < Z_ONE_SIDED_P01:
        return Verdict(
            True,
            z,
            f"acceptance {p1:.4f} below control {p2:.4f} (z={z:.2f} < {Z_ONE_SIDED_P01},"
            f" shown {canary.shown} vs {control.shown})",
        )
    return Verdict(False, z, "not_clearly_worse")
