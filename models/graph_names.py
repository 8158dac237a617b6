"""The model graph's names and versions: what serving needs, without the onnx package.

The agent loads models with the numpy runtime or onnxruntime; ``onnx`` (the graph builder) is in the
``[train]`` extra, so the names both sides agree on live here.
"""

from __future__ import annotations

from typing import Final

# onnx may default to an IR version newer than onnxruntime loads: both are pinned here.
IR_VERSION: Final = 9
OPSET: Final = 18  # ScatterElements with reduction="add" needs >= 16
GRAPH_NAME: Final = "edge_suggestion_model"
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
