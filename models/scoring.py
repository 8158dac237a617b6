"""The model's parameters and a pure numpy scorer that is the reference for the ONNX graph.

score(j) = hour_table[h, j] + store_table[s, j] + device_table[d, j]
         + sum over history slots i, neighbours m with neighbour_items[i, m] == j of
           history_weights[i] * neighbour_weights[i, m]
         - penalty[j]

The graph and this scorer do the same float32 operations in the same order (element-wise
products, then additions in history-slot-major order), so their scores are bit-identical;
ties are broken the way ONNX TopK does it: the lower item index first.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from models.errors import ModelFormatError


@dataclass(frozen=True, slots=True)
class ModelTensors:
    """The trained parameters. Row ``n_items`` of the neighbour tables is the padding row."""

    neighbour_items: npt.NDArray[np.int32]  # (n_items + 1, neighbours)
    neighbour_weights: npt.NDArray[np.float32]  # (n_items + 1, neighbours)
    hour_table: npt.NDArray[np.float32]  # (24, n_items): popularity blended with hour of day
    store_table: npt.NDArray[np.float32]  # (stores + 1, n_items); last row: unknown store
    device_table: npt.NDArray[np.float32]  # (devices + 1, n_items); last row: unknown device

    @property
    def n_items(self) -> int:
        return int(self.hour_table.shape[1])

    def validate(self) -> None:
        """Raise ModelFormatError unless the shapes and dtypes agree with one another."""
        n = self.n_items
        checks = [
            (self.neighbour_items.dtype == np.int32, "neighbour_items must be int32"),
            (self.neighbour_weights.dtype == np.float32, "neighbour_weights must be float32"),
            (self.neighbour_items.shape == self.neighbour_weights.shape, "neighbour shapes"),
            (self.neighbour_items.shape[0] == n + 1, "neighbour rows must be n_items + 1"),
            (self.store_table.shape[1] == n, "store_table columns"),
            (self.device_table.shape[1] == n, "device_table columns"),
            (self.hour_table.shape[0] == 24, "hour_table rows"),
        ]
        for passed, what in checks:
            if not passed:
                raise ModelFormatError(f"model tensors are inconsistent: {what}")
        if self.neighbour_items.size and (
            self.neighbour_items.min() < 0 or self.neighbour_items.max() >= n
        ):
            raise ModelFormatError("model tensors: neighbour_items out of range")

    def nbytes(self) -> int:
        return sum(
            table.nbytes
            for table in (
                self.neighbour_items,
                self.neighbour_weights,
                self.hour_table,
                self.store_table,
                self.device_table,
            )
        )


def reference_scores(
    tensors: ModelTensors, feeds: Mapping[str, npt.NDArray[Any]]
) -> npt.NDArray[np.float32]:
    """The full score vector over the catalogue, penalty applied."""
    history_items = feeds["history_items"]
    base = (
        tensors.hour_table[int(feeds["hour"][0])] + tensors.store_table[int(feeds["store"][0])]
    ) + tensors.device_table[int(feeds["device"][0])]
    contributions = tensors.neighbour_weights[history_items] * feeds["history_weights"][:, None]
    # np.add.at adds one element after another, like ScatterElements(reduction="add").
    np.add.at(base, tensors.neighbour_items[history_items].ravel(), contributions.ravel())
    penalised: npt.NDArray[np.float32] = base - feeds["penalty"]
    return penalised


def reference_top_k(
    tensors: ModelTensors, feeds: Mapping[str, npt.NDArray[Any]]
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]:
    """(top scores, top item indices), best first, ties to the lower index."""
    scores = reference_scores(tensors, feeds)
    k = int(feeds["k"][0])
    order = np.argsort(-scores, kind="stable")[:k].astype(np.int64)
    return scores[order], order
