"""The model's input and output names: the contract between export and serving.

Kept apart from ``onnx_graph`` so that the agent's runtime reads them without importing
``onnx`` (about 13 MB resident, needed only to build a graph, never to run one).
"""

from __future__ import annotations

from typing import Final

INPUT_NAMES: Final = (
    "history_items",
    "history_weights",
    "hour",
    "store",
    "device",
    "penalty",
    "k",
)
OUTPUT_NAMES: Final = ("top_scores", "top_indices")
