"""Training: sequential item neighbourhoods blended with context popularity, in numpy.

What a customer takes next is scored as a mixture:
- sequence (weight ``sequence_weight``): for each recent take i, a sparse row of the items
  that followed i in other customers' timelines (within ``window`` takes, nearer counts more,
  with a weaker backward link), damped by the target's popularity, normalised to sum to one
  and shrunk when row i has little evidence; only the top ``neighbours`` entries are kept;
- context (the rest): global popularity blended with popularity conditional on the hour of
  day, the store and the device of the latest event (smoothed towards global popularity).
Model size is O(items x (neighbours + 24 + stores + devices)): at most about 3.1 MB for 5,000 items.
"""

from __future__ import annotations

import logging
import sys
from collections import Counter
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Any

import numpy as np
import numpy.typing as npt
from tqdm import tqdm

from models.errors import EventDataError
from models.events import EventLog, Interaction, collapse_takes, split_last_take
from models.features import DEFAULT_TYPE_WEIGHTS, HOURS_PER_DAY, FeatureSpec
from models.scoring import ModelTensors

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class TrainingParams:
    neighbours: int = 32
    window: int = 6  # how many later takes count as "taken next"
    window_decay: float = 0.6  # each step further away counts this much less
    backward_weight: float = 0.2  # "taken before" as a weaker, symmetric co-occurrence
    popularity_damping: float = 0.3  # divide by count ** damping: less popularity bias
    row_shrinkage: float = 10.0  # rows with little evidence trust context more
    sequence_weight: float = 0.7
    hour_weight: float = 0.25  # shares of the context part; the rest is global popularity
    store_weight: float = 0.15
    device_weight: float = 0.2
    context_smoothing: float = 30.0
    max_stores: int = 32  # more stores share the "unknown store" row
    max_devices: int = 32
    history_length: int = 16
    position_decay: float = 0.8
    half_life_s: float = 6 * 3600.0  # the current visit dominates; older visits fade


@dataclass(frozen=True, slots=True)
class TrainedModel:
    items: tuple[str, ...]
    spec: FeatureSpec
    tensors: ModelTensors
    stats: dict[str, Any]
    params: TrainingParams

    def params_json(self) -> dict[str, Any]:
        return asdict(self.params)


@dataclass(frozen=True, slots=True)
class _Take:
    sku: str
    weight: float  # the strongest event-type weight among the take's events
    hour: int
    store_id: str
    device_id: str


def _takes_of(interactions: list[Interaction]) -> list[_Take]:
    takes = []
    for group in collapse_takes(interactions):
        last = group[-1]
        weight = max(DEFAULT_TYPE_WEIGHTS.get(event.event_type, 0.5) for event in group)
        hour = datetime.fromtimestamp(last.ts, UTC).hour
        takes.append(_Take(last.sku, weight, hour, last.store_id, last.device_id))
    return takes


def _vocabulary(counter: Counter[str], cap: int) -> tuple[str, ...]:
    """The most frequent names (ties by name) up to ``cap``; the rest share "unknown"."""
    ranked = sorted(counter.items(), key=lambda pair: (-pair[1], pair[0]))
    return tuple(name for name, _ in ranked[:cap])


def _conditional_table(
    condition: npt.NDArray[np.int64],
    targets: npt.NDArray[np.int64],
    rows: int,
    global_p: npt.NDArray[np.float64],
    smoothing: float,
) -> npt.NDArray[np.float64]:
    """P(item | condition) for each condition row, smoothed towards global popularity."""
    n_items = global_p.shape[0]
    counts = np.zeros((rows, n_items), np.float64)
    np.add.at(counts, (condition, targets), 1.0)
    totals = counts.sum(axis=1, keepdims=True)
    table: npt.NDArray[np.float64] = (counts + smoothing * global_p) / (totals + smoothing)
    return table


def _neighbour_rows(
    sequences: list[npt.NDArray[np.int64]],
    source_weights: list[npt.NDArray[np.float64]],
    item_counts: npt.NDArray[np.float64],
    params: TrainingParams,
    progress: bool,
) -> tuple[npt.NDArray[np.int32], npt.NDArray[np.float32]]:
    n_items = item_counts.shape[0]
    items = np.concatenate(sequences)
    weights = np.concatenate(source_weights)
    owner = np.repeat(np.arange(len(sequences)), [len(s) for s in sequences])
    sources, targets, values = [], [], []
    for distance in tqdm(range(1, params.window + 1), desc="pairs", disable=not progress):
        same = owner[:-distance] == owner[distance:]
        earlier, later = items[:-distance][same], items[distance:][same]
        strength = params.window_decay ** (distance - 1)
        sources += [earlier, later]
        targets += [later, earlier]
        values += [
            weights[:-distance][same] * strength,
            weights[distance:][same] * strength * params.backward_weight,
        ]
    source = np.concatenate(sources)
    target = np.concatenate(targets)
    value = np.concatenate(values)
    keep = source != target
    keys = source[keep] * n_items + target[keep]
    unique_keys, inverse = np.unique(keys, return_inverse=True)
    summed = np.bincount(inverse, weights=value[keep])
    row, column = unique_keys // n_items, unique_keys % n_items
    evidence = np.bincount(row, weights=summed, minlength=n_items)
    damped = summed / np.maximum(item_counts[column], 1.0) ** params.popularity_damping
    row_total = np.bincount(row, weights=damped, minlength=n_items)
    shrink = evidence / (evidence + params.row_shrinkage)
    normalised = damped / row_total[row] * shrink[row] * params.sequence_weight
    # best neighbours first within each row; ties by column for determinism
    order = np.lexsort((column, -normalised, row))
    row, column, normalised = row[order], column[order], normalised[order]
    row_start = np.searchsorted(row, np.arange(n_items))
    rank = np.arange(row.shape[0]) - row_start[row]
    kept = rank < params.neighbours
    neighbour_items = np.zeros((n_items + 1, params.neighbours), np.int32)
    neighbour_weights = np.zeros((n_items + 1, params.neighbours), np.float32)
    neighbour_items[row[kept], rank[kept]] = column[kept]
    neighbour_weights[row[kept], rank[kept]] = normalised[kept]
    return neighbour_items, neighbour_weights


def train_model(
    log: EventLog,
    params: TrainingParams | None = None,
    *,
    holdout_last: bool = False,
    progress: bool | None = None,
) -> TrainedModel:
    """Fit the model on consenting customers; with ``holdout_last`` each customer's last take
    (the last trigger event with an sku, and the same-sku events just before it) is left out."""
    params = params or TrainingParams()
    progress = sys.stderr.isatty() if progress is None else progress
    customers = log.consenting()
    timelines: list[list[_Take]] = []
    held_out = 0
    for timeline in tqdm(customers, desc="customers", disable=not progress):
        interactions = timeline.interactions
        if holdout_last:
            interactions, target = split_last_take(interactions)
            held_out += target is not None
        takes = _takes_of(interactions)
        if takes:
            timelines.append(takes)
    if not timelines:
        raise EventDataError("no consenting customer has a trigger event with an sku")
    item_counter = Counter(take.sku for takes in timelines for take in takes)
    items = tuple(sorted(item_counter))
    item_index = {sku: index for index, sku in enumerate(items)}
    stores = _vocabulary(Counter(t.store_id for ts in timelines for t in ts), params.max_stores)
    devices = _vocabulary(Counter(t.device_id for ts in timelines for t in ts), params.max_devices)
    store_index = {store: index for index, store in enumerate(stores)}
    device_index = {device: index for index, device in enumerate(devices)}

    item_counts = np.array([item_counter[sku] for sku in items], np.float64)
    global_p = (item_counts + 0.5) / (item_counts.sum() + 0.5 * len(items))
    sequences = [np.array([item_index[t.sku] for t in takes], np.int64) for takes in timelines]
    source_weights = [np.array([t.weight for t in takes], np.float64) for takes in timelines]
    # context of the take before -> the take after: what the model sees when it suggests
    previous = [take for takes in timelines for take in takes[:-1]]
    following = np.concatenate([sequence[1:] for sequence in sequences])
    hours = np.array([take.hour for take in previous], np.int64)
    store_rows = np.array([store_index.get(t.store_id, len(stores)) for t in previous], np.int64)
    device_rows = np.array(
        [device_index.get(t.device_id, len(devices)) for t in previous], np.int64
    )

    context_share = 1.0 - params.sequence_weight
    global_share = 1.0 - params.hour_weight - params.store_weight - params.device_weight
    smoothing = params.context_smoothing
    hour_table = context_share * (
        global_share * global_p
        + params.hour_weight
        * _conditional_table(hours, following, HOURS_PER_DAY, global_p, smoothing)
    )
    store_table = (
        context_share
        * params.store_weight
        * _conditional_table(store_rows, following, len(stores) + 1, global_p, smoothing)
    )
    device_table = (
        context_share
        * params.device_weight
        * _conditional_table(device_rows, following, len(devices) + 1, global_p, smoothing)
    )
    neighbour_items, neighbour_weights = _neighbour_rows(
        sequences, source_weights, item_counts, params, progress
    )
    tensors = ModelTensors(
        neighbour_items=neighbour_items,
        neighbour_weights=neighbour_weights,
        hour_table=hour_table.astype(np.float32),
        store_table=store_table.astype(np.float32),
        device_table=device_table.astype(np.float32),
    )
    tensors.validate()
    spec = FeatureSpec(
        history_length=params.history_length,
        position_decay=params.position_decay,
        half_life_s=params.half_life_s,
        type_weights=dict(DEFAULT_TYPE_WEIGHTS),
        stores=stores,
        devices=devices,
    )
    stats = {
        "customers": len(timelines),
        "excluded_customers_no_consent": log.excluded_customers(),
        "held_out_takes": held_out,
        "takes": int(sum(len(takes) for takes in timelines)),
        "items": len(items),
        "neighbour_nonzero": int(np.count_nonzero(neighbour_weights)),
        "parameter_bytes": tensors.nbytes(),
    }
    logger.info("train.complete customers=%d items=%d", len(timelines), len(items))
    return TrainedModel(items, spec, tensors, stats, params)
