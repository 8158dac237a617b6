"""The ONNX graph: scoring and top-k in one model, built with ``onnx.helper``.

Inputs (see MODEL_FORMAT.md): history_items int64[H], history_weights float32[H],
hour int64[1], store int64[1], device int64[1], penalty float32[N], k int64[1].
Outputs: top_scores float32[k], top_indices int64[k].
"""

from __future__ import annotations

from typing import Final

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from models.errors import ModelFormatError
from models.io_names import OUTPUT_NAMES
from models.scoring import ModelTensors

# onnx may default to an IR version newer than onnxruntime loads: both are pinned here.
IR_VERSION: Final = 9
OPSET: Final = 18  # ScatterElements with reduction="add" needs >= 16
GRAPH_NAME: Final = "edge_suggestion_model"
_TABLES: Final = (
    "neighbour_items",
    "neighbour_weights",
    "hour_table",
    "store_table",
    "device_table",
)


def build_model(tensors: ModelTensors, history_length: int) -> onnx.ModelProto:
    """The scoring graph for these parameters, checked by the onnx checker."""
    tensors.validate()
    n_items = tensors.n_items
    initializers = [numpy_helper.from_array(getattr(tensors, name), name) for name in _TABLES]
    initializers += [
        numpy_helper.from_array(np.array([-1], np.int64), "flat_shape"),
        numpy_helper.from_array(np.array([1], np.int64), "last_axis"),
    ]
    node = helper.make_node
    nodes = [
        node("Gather", ["hour_table", "hour"], ["hour_row"], axis=0),
        node("Gather", ["store_table", "store"], ["store_row"], axis=0),
        node("Gather", ["device_table", "device"], ["device_row"], axis=0),
        node("Add", ["hour_row", "store_row"], ["hour_store_row"]),
        node("Add", ["hour_store_row", "device_row"], ["context_row"]),
        node("Reshape", ["context_row", "flat_shape"], ["context_scores"]),
        node("Gather", ["neighbour_items", "history_items"], ["slot_items"], axis=0),
        node("Gather", ["neighbour_weights", "history_items"], ["slot_neighbour_weights"], axis=0),
        node("Unsqueeze", ["history_weights", "last_axis"], ["slot_weights"]),
        node("Mul", ["slot_neighbour_weights", "slot_weights"], ["slot_contributions"]),
        node("Reshape", ["slot_items", "flat_shape"], ["contribution_items"]),
        node("Reshape", ["slot_contributions", "flat_shape"], ["contributions"]),
        node(
            "ScatterElements",
            ["context_scores", "contribution_items", "contributions"],
            ["raw_scores"],
            axis=0,
            reduction="add",
        ),
        node("Sub", ["raw_scores", "penalty"], ["scores"]),
        node("TopK", ["scores", "k"], list(OUTPUT_NAMES), axis=0, largest=1, sorted=1),
    ]
    value = helper.make_tensor_value_info
    inputs = [
        value("history_items", TensorProto.INT64, [history_length]),
        value("history_weights", TensorProto.FLOAT, [history_length]),
        value("hour", TensorProto.INT64, [1]),
        value("store", TensorProto.INT64, [1]),
        value("device", TensorProto.INT64, [1]),
        value("penalty", TensorProto.FLOAT, [n_items]),
        value("k", TensorProto.INT64, [1]),
    ]
    outputs = [
        value("top_scores", TensorProto.FLOAT, ["k"]),
        value("top_indices", TensorProto.INT64, ["k"]),
    ]
    graph = helper.make_graph(nodes, GRAPH_NAME, inputs, outputs, initializers)
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET)],
        ir_version=IR_VERSION,
        producer_name="edge-models",
    )
    onnx.checker.check_model(model)
    return model


def serialize(model: onnx.ModelProto) -> bytes:
    """Deterministic bytes: the same parameters always give the same file and sha256."""
    data: bytes = model.SerializeToString(deterministic=True)
    return data


def tensors_from_model(model: onnx.ModelProto) -> ModelTensors:
    """Read the parameters back out of a model file (for the numpy reference and re-export)."""
    found = {init.name: numpy_helper.to_array(init) for init in model.graph.initializer}
    missing = [name for name in _TABLES if name not in found]
    if missing:
        raise ModelFormatError(f"model.onnx lacks initializers {missing}")
    tensors = ModelTensors(
        neighbour_items=found["neighbour_items"].astype(np.int32, copy=False),
        neighbour_weights=found["neighbour_weights"].astype(np.float32, copy=False),
        hour_table=found["hour_table"].astype(np.float32, copy=False),
        store_table=found["store_table"].astype(np.float32, copy=False),
        device_table=found["device_table"].astype(np.float32, copy=False),
    )
    tensors.validate()
    return tensors


def history_length_of(model: onnx.ModelProto) -> int:
    """The fixed history length the graph was built for."""
    for graph_input in model.graph.input:
        if graph_input.name == "history_items":
            return int(graph_input.type.tensor_type.shape.dim[0].dim_value)
    raise ModelFormatError("model.onnx has no history_items input")
