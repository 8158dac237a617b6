"""The model's inputs: how a customer's recent history and context become feed arrays.

One ``FeatureSpec`` is stored in each manifest, so the trainer, the evaluator and the agent's
runtime build the very same features. ``FeatureEncoder`` writes into arrays it allocated once:
it is on the suggestion path and must not allocate per call.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, NamedTuple

import numpy as np
import numpy.typing as npt

from models.errors import ModelFormatError

# The penalty the encoder gives a masked item: far beyond any score the model produces.
MASK_PENALTY: Final = 1.0e9
HOURS_PER_DAY: Final = 24

DEFAULT_TYPE_WEIGHTS: Final[Mapping[str, float]] = {
    "basket.add": 1.0,
    "product.scan": 1.0,
    "product.pickup": 0.9,
    "kiosk.view": 0.5,
    "checkout.purchase": 0.6,
}

# The feed arrays are sized from it: a hostile manifest must not allocate the machine away.
MAX_HISTORY_LENGTH: Final = 4096

HistoryEntry = tuple[str, str, float]  # (sku, event type, ts in epoch seconds)


class SuggestionContext(NamedTuple):
    """Where and when the suggestion is made (the trigger event's hour, store and device)."""

    hour: int
    store_id: str
    device_id: str | None


@dataclass(frozen=True, slots=True)
class FeatureSpec:
    """Everything needed to turn a history and a context into the model's inputs."""

    history_length: int = 16
    position_decay: float = 0.8  # each older take counts this much less than the next one
    half_life_s: float = 6 * 3600.0  # and it fades with age
    type_weights: Mapping[str, float] = field(default_factory=lambda: dict(DEFAULT_TYPE_WEIGHTS))
    stores: tuple[str, ...] = ()  # index len(stores) is "unknown store"
    devices: tuple[str, ...] = ()  # index len(devices) is "unknown device"

    def to_json(self) -> dict[str, Any]:
        return {
            "history_length": self.history_length,
            "position_decay": self.position_decay,
            "half_life_s": self.half_life_s,
            "type_weights": dict(self.type_weights),
            "hours": HOURS_PER_DAY,
            "stores": list(self.stores),
            "devices": list(self.devices),
        }

    @classmethod
    def from_json(cls, raw: Any) -> FeatureSpec:
        try:
            spec = cls(
                history_length=int(raw["history_length"]),
                position_decay=float(raw["position_decay"]),
                half_life_s=float(raw["half_life_s"]),
                type_weights={str(k): float(v) for k, v in raw["type_weights"].items()},
                stores=tuple(str(s) for s in raw["stores"]),
                devices=tuple(str(d) for d in raw["devices"]),
            )
        except (KeyError, TypeError, ValueError, AttributeError, OverflowError) as exc:
            raise ModelFormatError(f"manifest feature_spec is invalid: {exc!r}") from exc
        if not 1 <= spec.history_length <= MAX_HISTORY_LENGTH:
            raise ModelFormatError(
                f"manifest feature_spec: history_length must be 1..{MAX_HISTORY_LENGTH}"
            )
        valid = (
            spec.history_length >= 1
            and spec.half_life_s > 0.0
            and 0.0 < spec.position_decay <= 1.0
            and raw.get("hours", HOURS_PER_DAY) == HOURS_PER_DAY
        )
        if not valid:
            raise ModelFormatError(
                "manifest feature_spec: needs history_length >= 1, half_life_s > 0, "
                "0 < position_decay <= 1 and hours == 24"
            )
        return spec


class FeatureEncoder:
    """Fills pre-allocated feed arrays; the arrays are reused, so a caller that keeps a
    feed beyond the next call must copy it. Not thread-safe (one encoder per caller)."""

    def __init__(self, spec: FeatureSpec, items: Sequence[str]) -> None:
        self.spec = spec
        self.n_items = len(items)
        self.item_index = {sku: index for index, sku in enumerate(items)}
        self._store_index = {store: index for index, store in enumerate(spec.stores)}
        self._device_index = {device: index for index, device in enumerate(spec.devices)}
        length = spec.history_length
        self.history_items: npt.NDArray[np.int64] = np.full(length, self.n_items, np.int64)
        self.history_weights: npt.NDArray[np.float32] = np.zeros(length, np.float32)
        self.hour: npt.NDArray[np.int64] = np.zeros(1, np.int64)
        self.store: npt.NDArray[np.int64] = np.zeros(1, np.int64)
        self.device: npt.NDArray[np.int64] = np.zeros(1, np.int64)
        self.penalty: npt.NDArray[np.float32] = np.zeros(self.n_items, np.float32)
        self.k: npt.NDArray[np.int64] = np.zeros(1, np.int64)
        self._masked: list[int] = []  # penalty entries set last time, cleared next time
        self._slot_items = [self.n_items] * length
        self._raw_weights = [0.0] * length
        self.feeds: dict[str, npt.NDArray[Any]] = {
            "history_items": self.history_items,
            "history_weights": self.history_weights,
            "hour": self.hour,
            "store": self.store,
            "device": self.device,
            "penalty": self.penalty,
            "k": self.k,
        }

    def encode(
        self,
        history: Sequence[HistoryEntry],
        context: tuple[int, str, str | None],
        penalty_skus: Iterable[str] = (),
        *,
        k: int,
        now: float | None = None,
        exclude_history: bool = True,
    ) -> dict[str, npt.NDArray[Any]]:
        """Write the feeds for one request. ``history`` is oldest first; ``now`` defaults to
        the newest usable entry's ts. Entries with an unknown sku, a type without weight or
        a ts that is not a finite number add nothing (their known skus are still masked)."""
        spec, item_index, type_weights = self.spec, self.item_index, self.spec.type_weights
        length, half_life, decay = spec.history_length, spec.half_life_s, spec.position_decay
        slot_items, raw = self._slot_items, self._raw_weights
        masked: set[int] = set()
        reference = now if isinstance(now, int | float) and math.isfinite(now) else None
        slot, total, last_index = 0, 0.0, -1
        for sku, event_type, ts in reversed(history):
            index = item_index.get(sku)
            if index is None:
                continue
            if exclude_history:
                masked.add(index)
            elif slot == length:
                break
            type_weight = type_weights.get(event_type, 0.0)
            if type_weight <= 0.0 or not isinstance(ts, int | float) or not math.isfinite(ts):
                continue
            if reference is None:
                reference = ts
            weight = type_weight * 0.5 ** (max(reference - ts, 0.0) / half_life)
            if index == last_index:
                # the same take seen through several events: keep its strongest signal
                weight *= decay ** (slot - 1)
                if weight > raw[slot - 1]:
                    total += weight - raw[slot - 1]
                    raw[slot - 1] = weight
                continue
            if slot == length:
                continue  # still collecting skus to mask
            weight *= decay**slot
            slot_items[slot], raw[slot] = index, weight
            total += weight
            slot, last_index = slot + 1, index
        for position in range(slot, length):
            slot_items[position], raw[position] = self.n_items, 0.0
        self.history_items[:] = slot_items
        self.history_weights[:] = raw
        if total > 0.0:
            self.history_weights /= np.float32(total)
        hour, store_id, device_id = context
        self.hour[0] = int(hour) % HOURS_PER_DAY
        self.store[0] = self._store_index.get(store_id, len(spec.stores))
        self.device[0] = self._device_index.get(device_id or "", len(spec.devices))
        self.k[0] = max(1, min(int(k), self.n_items))
        for sku in penalty_skus:
            index = item_index.get(sku)
            if index is not None:
                masked.add(index)
        if self._masked:
            self.penalty[self._masked] = 0.0
        self._masked = list(masked)
        if self._masked:
            self.penalty[self._masked] = MASK_PENALTY
        return self.feeds
