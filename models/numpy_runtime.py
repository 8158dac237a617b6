"""A numpy interpreter for the ops the model exporter writes, with ONNX semantics.

The scoring graph (``models/onnx_graph.py``) uses eight ops: Gather, Add, Sub, Mul, Reshape,
Unsqueeze, ScatterElements and TopK. This runs exactly those, in float32 like the
onnxruntime session (numpy does the same element-wise float32 operations in the same order,
ScatterElements adds one update after another like ``reduction="add"`` does, and TopK breaks
ties to the lower index as onnxruntime does), so the agent need not load onnxruntime (about
30 MB of a store box's memory). A graph is checked once, when the session is built: every op,
attribute, data type and value name; anything else raises ``UnsupportedModelError`` naming it.

Each node becomes a closure over slot numbers (``numpy_ops``); ``run`` walks them over one
list of values.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Final

import numpy as np

from models.errors import ModelFormatError, ModelRunError, UnsupportedModelError
from models.numpy_ops import OPS, SUPPORTED_OPS, Array, Compiler, Step, Values, label
from models.onnx_reader import OnnxModel, ValueInfo

__all__ = ["SUPPORTED_OPS", "NumpySession"]

# Opsets whose definitions of the eight ops are the ones implemented here: Unsqueeze takes
# its axes as an input since 13, Reshape has allowzero since 14, ScatterElements its
# reduction since 16; versions up to 21 changed only the types these ops accept.
SUPPORTED_OPSETS: Final = range(16, 22)
SUPPORTED_IR_VERSIONS: Final = range(3, 11)
_DEFAULT_DOMAINS: Final = ("", "ai.onnx")


class NumpySession:
    """The graph of a model file, checked and ready to run (one caller at a time)."""

    runtime: Final = "numpy"

    def __init__(self, model: OnnxModel) -> None:
        if model.ir_version not in SUPPORTED_IR_VERSIONS:
            raise UnsupportedModelError(f"IR version {model.ir_version} is not supported")
        opset = next((model.opsets[d] for d in _DEFAULT_DOMAINS if d in model.opsets), None)
        if opset not in SUPPORTED_OPSETS:
            raise UnsupportedModelError(
                f"opset {opset} is not supported ({SUPPORTED_OPSETS.start}.."
                f"{SUPPORTED_OPSETS.stop - 1})"
            )
        graph = model.graph
        table = Compiler()
        template: Values = []
        for name, array in graph.initializers.items():
            table.define(name, array.dtype, "initializer")
            table.constants[name] = array
            template.append(array)
        self._inputs: list[tuple[ValueInfo, int]] = []
        for info in graph.inputs:
            if info.name in table.constants:  # an overridable default: used as a constant
                if info.dtype != table.dtypes[info.name]:
                    raise ModelFormatError(f"input {info.name!r}: type differs from its value")
                continue
            self._inputs.append((info, table.define(info.name, info.dtype, "graph input")))
            template.append(None)
        steps: list[Step] = []
        self._labels: list[str] = []
        for node in graph.nodes:
            if node.domain not in _DEFAULT_DOMAINS:
                raise UnsupportedModelError(f"{label(node)}: op domain {node.domain!r}")
            compile_node = OPS.get(node.op_type)
            if compile_node is None:
                raise UnsupportedModelError(
                    f"{label(node)}: op {node.op_type!r} is not supported "
                    f"(the numpy runtime runs {', '.join(SUPPORTED_OPS)})"
                )
            before = len(table.slots)
            steps.append(compile_node(node, table))
            self._labels.append(label(node))
            template.extend([None] * (len(table.slots) - before))
        self._outputs: dict[str, int] = {}
        for info in graph.outputs:
            if info.name not in table.slots or info.name in self._outputs:
                raise ModelFormatError(f"graph output {info.name!r} undefined or repeated")
            if table.dtypes[info.name] != info.dtype:
                raise ModelFormatError(f"graph output {info.name!r} has another type")
            self._outputs[info.name] = table.slots[info.name]
        if not self._outputs:
            raise ModelFormatError("the graph has no outputs")
        self._steps = tuple(steps)
        self._template = template
        self._feeds = tuple((info, slot, _fixed_shape(info)) for info, slot in self._inputs)

    def inputs(self) -> tuple[ValueInfo, ...]:
        """The graph inputs a run must feed (initializers excluded), with types and shapes."""
        return tuple(info for info, _ in self._inputs)

    def input_shapes(self) -> dict[str, list[int | str | None] | None]:
        return {
            info.name: None if info.shape is None else list(info.shape) for info, _ in self._inputs
        }

    def output_names(self) -> list[str]:
        return list(self._outputs)

    def run(self, output_names: Sequence[str] | None, feeds: Mapping[str, Array]) -> list[Array]:
        """The named outputs (all with None) for these feeds; raises ModelRunError."""
        values = self._template.copy()
        if len(feeds) != len(self._feeds):
            raise ModelRunError(f"expected feeds {[info.name for info, *_ in self._feeds]}")
        for info, slot, shape in self._feeds:
            array = feeds.get(info.name)
            # the common case in two comparisons; anything else is checked in full
            if not (
                isinstance(array, np.ndarray) and array.dtype == info.dtype and array.shape == shape
            ):
                array = _checked_feed(info, feeds)
            values[slot] = array
        step_number = 0
        try:
            for step_number, step in enumerate(self._steps):  # noqa: B007 - named on error
                step(values)
        except (ValueError, IndexError, TypeError, OverflowError) as exc:  # numpy's errors
            raise ModelRunError(f"{self._labels[step_number]}: {exc}") from exc
        names = self._outputs if output_names is None else output_names
        try:
            return [np.asarray(values[self._outputs[name]]) for name in names]
        except KeyError as exc:
            raise ModelRunError(f"no graph output {exc}") from exc


def _fixed_shape(info: ValueInfo) -> tuple[int, ...] | None:
    """The declared shape when every dimension is a number (then a feed must have exactly
    it), else None (the full check runs)."""
    if info.shape is None or not all(isinstance(size, int) for size in info.shape):
        return None
    return tuple(size for size in info.shape if isinstance(size, int))


def _checked_feed(info: ValueInfo, feeds: Mapping[str, Array]) -> Array:
    """The feed for a graph input, of the declared type and shape (as onnxruntime checks)."""
    array = feeds.get(info.name)
    if not isinstance(array, np.ndarray):
        raise ModelRunError(f"input {info.name!r}: no array fed")
    if array.dtype != info.dtype:
        raise ModelRunError(f"input {info.name!r}: {array.dtype}, expected {info.dtype}")
    shape = info.shape
    if shape is not None and (
        len(shape) != array.ndim
        or any(
            isinstance(want, int) and want != got
            for want, got in zip(shape, array.shape, strict=True)
        )
    ):
        raise ModelRunError(f"input {info.name!r}: shape {array.shape}, expected {shape}")
    return array
