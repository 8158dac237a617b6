"""A numpy interpreter for the ops the model exporter writes, with ONNX semantics.

The scoring graph (``models/onnx_graph.py``) uses eight ops: Gather, Add, Sub, Mul, Reshape,
Unsqueeze, ScatterElements and TopK. This runs exactly those, in float32 like the
onnxruntime session (numpy does the same element-wise float32 operations in the same order,
ScatterElements adds one update after another like ``reduction="add"`` does, and TopK breaks
ties to the lower index as onnxruntime does), so the agent need not load onnxruntime (about
30 MB of a store box's memory). A graph is checked once, when the session is built: every op,
attribute, data type and value name; anything else raises ``UnsupportedModelError`` naming it.

Each node becomes a closure over slot numbers; ``run`` walks them over one list of values.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Final

import numpy as np
import numpy.typing as npt

from models.errors import ModelFormatError, ModelRunError, UnsupportedModelError
from models.onnx_reader import ATTR_INT, ATTR_STRING, Node, OnnxModel, ValueInfo

__all__ = ["SUPPORTED_OPS", "NumpySession"]

# Opsets whose definitions of the eight ops are the ones implemented here: Unsqueeze takes
# its axes as an input since 13, Reshape has allowzero since 14, ScatterElements its
# reduction since 16; versions up to 21 changed only the types these ops accept.
SUPPORTED_OPSETS: Final = range(16, 22)
SUPPORTED_IR_VERSIONS: Final = range(3, 11)
_DEFAULT_DOMAINS: Final = ("", "ai.onnx")

Array = npt.NDArray[Any]
Values = list[Any]
Step = Callable[[Values], None]

_NUMERIC: Final = frozenset(np.dtype(name) for name in ("float32", "float64", "int32", "int64"))
_INDEX: Final = frozenset(np.dtype(name) for name in ("int32", "int64"))
_INT64: Final = np.dtype("int64")


class _Compiler:
    """The value table while a graph is checked: slot and dtype of each defined name."""

    def __init__(self) -> None:
        self.slots: dict[str, int] = {}
        self.dtypes: dict[str, np.dtype[Any]] = {}
        self.constants: dict[str, Array] = {}

    def define(self, name: str, dtype: np.dtype[Any], where: str) -> int:
        if not name or name in self.slots:
            raise ModelFormatError(f"{where}: value name {name!r} empty or defined twice")
        self.slots[name] = len(self.slots)
        self.dtypes[name] = dtype
        return self.slots[name]

    def use(self, name: str, where: str, allowed: frozenset[np.dtype[Any]]) -> int:
        if name not in self.slots:
            raise ModelFormatError(f"{where}: input {name!r} is not defined before use")
        dtype = self.dtypes[name]
        if dtype not in allowed:
            raise ModelFormatError(f"{where}: input {name!r} has type {dtype}, not allowed here")
        return self.slots[name]


def _label(node: Node) -> str:
    return f"node {node.name or '?'} ({node.op_type})"


def _attributes(node: Node, allowed: Mapping[str, int]) -> None:
    for name, attribute in node.attributes.items():
        if name not in allowed:
            raise UnsupportedModelError(f"{_label(node)}: attribute {name!r} is not supported")
        if attribute.kind != allowed[name]:
            raise ModelFormatError(f"{_label(node)}: attribute {name!r} has the wrong type")


def _int_attribute(node: Node, name: str, default: int) -> int:
    attribute = node.attributes.get(name)
    return default if attribute is None else int(attribute.value)  # type: ignore[arg-type]


def _arity(node: Node, inputs: int, outputs: int) -> None:
    if len(node.inputs) != inputs or len(node.outputs) != outputs:
        raise ModelFormatError(
            f"{_label(node)}: takes {inputs} inputs and gives {outputs} outputs, "
            f"has {len(node.inputs)} and {len(node.outputs)}"
        )


def _gather(node: Node, table: _Compiler) -> Step:
    _arity(node, 2, 1)
    _attributes(node, {"axis": ATTR_INT})
    where, axis = _label(node), _int_attribute(node, "axis", 0)
    data = table.use(node.inputs[0], where, _NUMERIC)
    indices = table.use(node.inputs[1], where, _INDEX)
    out = table.define(node.outputs[0], table.dtypes[node.inputs[0]], where)

    def gather(values: Values) -> None:
        # np.take: negative indices count from the end, out of range raises: as ONNX Gather
        values[out] = np.asarray(values[data]).take(values[indices], axis=axis)

    return gather


def _elementwise(ufunc: np.ufunc) -> Callable[[Node, _Compiler], Step]:
    def compile_node(node: Node, table: _Compiler) -> Step:
        _arity(node, 2, 1)
        _attributes(node, {})
        where = _label(node)
        left = table.use(node.inputs[0], where, _NUMERIC)
        right = table.use(node.inputs[1], where, _NUMERIC)
        dtype = table.dtypes[node.inputs[0]]
        if table.dtypes[node.inputs[1]] != dtype:
            raise ModelFormatError(f"{where}: inputs of two types")
        out = table.define(node.outputs[0], dtype, where)

        def elementwise(values: Values) -> None:
            # numpy broadcasting is ONNX's multidirectional broadcasting
            values[out] = ufunc(values[left], values[right])

        return elementwise

    return compile_node


def reshape_target(shape: Iterable[int], source: tuple[int, ...], allowzero: bool) -> list[int]:
    """ONNX Reshape's requested shape: 0 copies the input's dimension (unless allowzero),
    at most one -1 is inferred (numpy does that)."""
    target = [int(size) for size in shape]
    if target.count(-1) > 1 or any(size < -1 for size in target):
        raise ValueError(f"Reshape: invalid shape {target}")
    if allowzero and 0 in target and -1 in target:
        raise ValueError("Reshape: allowzero with both 0 and -1")
    for position, size in enumerate(target):
        if size == 0 and not allowzero:
            if position >= len(source):
                raise ValueError(f"Reshape: 0 at {position} beyond the input's rank")
            target[position] = source[position]
    return target


def _reshape(node: Node, table: _Compiler) -> Step:
    _arity(node, 2, 1)
    _attributes(node, {"allowzero": ATTR_INT})
    where = _label(node)
    allowzero = bool(_int_attribute(node, "allowzero", 0))
    data = table.use(node.inputs[0], where, _NUMERIC)
    shape = table.use(node.inputs[1], where, frozenset({_INT64}))
    out = table.define(node.outputs[0], table.dtypes[node.inputs[0]], where)
    constant = table.constants.get(node.inputs[1])
    if constant is not None and constant.ndim == 1 and (allowzero or 0 not in constant):
        try:
            fixed = tuple(reshape_target(constant.tolist(), (), allowzero))
        except ValueError as exc:
            raise ModelFormatError(f"{where}: {exc}") from exc

        def reshape_fixed(values: Values) -> None:
            values[out] = np.asarray(values[data]).reshape(fixed)

        return reshape_fixed

    def reshape(values: Values) -> None:
        source, requested = np.asarray(values[data]), values[shape]
        if requested.ndim != 1:
            raise ValueError("Reshape: the shape must be 1-D")
        values[out] = source.reshape(reshape_target(requested.tolist(), source.shape, allowzero))

    return reshape


def _unsqueeze(node: Node, table: _Compiler) -> Step:
    _arity(node, 2, 1)
    _attributes(node, {})
    where = _label(node)
    data = table.use(node.inputs[0], where, _NUMERIC)
    axes = table.use(node.inputs[1], where, frozenset({_INT64}))
    out = table.define(node.outputs[0], table.dtypes[node.inputs[0]], where)
    constant = table.constants.get(node.inputs[1])
    if constant is not None and constant.ndim == 1 and constant.size:
        fixed = tuple(constant.tolist())
        by_rank: dict[int, tuple[slice | None, ...]] = {}  # input rank -> an indexing tuple

        def unsqueeze_fixed(values: Values) -> None:
            source = np.asarray(values[data])
            index = by_rank.get(source.ndim)
            if index is None:
                index = by_rank[source.ndim] = _new_axes(source.ndim, fixed)
            values[out] = source[index]

        return unsqueeze_fixed

    def unsqueeze(values: Values) -> None:
        requested = values[axes]
        if requested.ndim != 1 or not requested.size:
            raise ValueError("Unsqueeze: axes must be a non-empty 1-D tensor")
        # negative axes count from the output's end; a repeated axis raises: as ONNX
        values[out] = np.expand_dims(values[data], tuple(requested.tolist()))

    return unsqueeze


def _new_axes(rank: int, axes: tuple[int, ...]) -> tuple[slice | None, ...]:
    """The indexing tuple that inserts size-1 axes at ``axes`` of the output (negative ones
    count from the output's end), as ONNX Unsqueeze; numpy checks range and repeats."""
    out_rank = rank + len(axes)
    np.expand_dims(np.empty((1,) * rank, np.int8), axes)  # raises on a bad or repeated axis
    positions = {axis + out_rank if axis < 0 else axis for axis in axes}
    return tuple(None if position in positions else slice(None) for position in range(out_rank))


def _scatter_elements(node: Node, table: _Compiler) -> Step:
    _arity(node, 3, 1)
    _attributes(node, {"axis": ATTR_INT, "reduction": ATTR_STRING})
    where = _label(node)
    axis = _int_attribute(node, "axis", 0)
    reduction = node.attributes["reduction"].value if "reduction" in node.attributes else "none"
    if reduction not in ("none", "add"):
        raise UnsupportedModelError(f"{where}: reduction {reduction!r} is not supported")
    add = reduction == "add"
    data = table.use(node.inputs[0], where, _NUMERIC)
    indices = table.use(node.inputs[1], where, _INDEX)
    updates = table.use(node.inputs[2], where, _NUMERIC)
    dtype = table.dtypes[node.inputs[0]]
    if table.dtypes[node.inputs[2]] != dtype:
        raise ModelFormatError(f"{where}: updates and data of two types")
    out = table.define(node.outputs[0], dtype, where)

    def scatter_elements(values: Values) -> None:
        target = np.asarray(values[data])
        index, update = np.asarray(values[indices]), np.asarray(values[updates])
        rank = target.ndim
        if rank < 1 or index.ndim != rank or index.shape != update.shape:
            raise ValueError("ScatterElements: data, indices and updates must share a rank")
        position = axis + rank if axis < 0 else axis
        if not 0 <= position < rank:
            raise ValueError(f"ScatterElements: axis {axis} out of range")
        result = target.copy()
        if rank == 1:
            where_to: Any = index
        elif any(index.shape[d] > target.shape[d] for d in range(rank) if d != position):
            raise ValueError("ScatterElements: indices larger than data")
        else:
            grid = np.indices(index.shape, sparse=True)  # the other axes' own positions
            where_to = tuple(index if d == position else grid[d] for d in range(rank))
        # Negative indices count from the end and out of range raises, as in ONNX; add.at
        # applies the updates one after another in order, as reduction="add" does.
        if add:
            np.add.at(result, where_to, update)
        else:
            result[where_to] = update
        values[out] = result

    return scatter_elements


def stable_order(scores: Array, largest: bool) -> npt.NDArray[np.intp]:
    """Indices ordering a 1-D array best first, ties to the lower index (ONNX TopK)."""
    if not largest:
        ascending: npt.NDArray[np.intp] = np.argsort(scores, kind="stable")
        return ascending
    last = scores.shape[0] - 1
    # a stable ascending sort of the reversed array, read backwards: descending values,
    # equal values in ascending index order, and no negation (exact for every dtype)
    reversed_order: npt.NDArray[np.intp] = np.argsort(scores[::-1], kind="stable")[::-1]
    descending: npt.NDArray[np.intp] = last - reversed_order
    return descending


def top_k_1d(scores: Array, k: int, largest: bool) -> npt.NDArray[np.int64]:
    """TopK of a 1-D array, sorted, ties to the lower index: partition, then sort only the
    values at or beyond the k-th (all of the tied ones, so the lowest indices win)."""
    size = scores.shape[0]
    if k == 0:
        return np.empty(0, np.int64)
    if 4 * k < size:
        kth = size - k if largest else k - 1
        part = np.argpartition(scores, kth)
        threshold = scores[part[kth]]
        chosen = part[kth:] if largest else part[: kth + 1]
        if not (scores.dtype.kind == "f" and np.isnan(scores[chosen]).any()):
            candidates = np.flatnonzero(scores >= threshold if largest else scores <= threshold)
            return candidates[stable_order(scores[candidates], largest)[:k]].astype(np.int64)
    return stable_order(scores, largest)[:k].astype(np.int64)


def _top_k_nd(scores: Array, k: int, axis: int, largest: bool) -> npt.NDArray[np.int64]:
    moved = np.moveaxis(scores, axis, -1)
    if largest:
        last = moved.shape[-1] - 1
        order = last - np.argsort(moved[..., ::-1], axis=-1, kind="stable")[..., ::-1]
    else:
        order = np.argsort(moved, axis=-1, kind="stable")
    result: npt.NDArray[np.int64] = np.moveaxis(order[..., :k], -1, axis).astype(np.int64)
    return result


def _top_k(node: Node, table: _Compiler) -> Step:
    _arity(node, 2, 2)
    _attributes(node, {"axis": ATTR_INT, "largest": ATTR_INT, "sorted": ATTR_INT})
    where = _label(node)
    axis = _int_attribute(node, "axis", -1)
    largest = _int_attribute(node, "largest", 1)
    if _int_attribute(node, "sorted", 1) != 1:
        # onnxruntime's order of unsorted results is its own: not reproduced here
        raise UnsupportedModelError(f"{where}: sorted=0 is not supported")
    if largest not in (0, 1):
        raise ModelFormatError(f"{where}: largest must be 0 or 1")
    scores = table.use(node.inputs[0], where, _NUMERIC)
    k_slot = table.use(node.inputs[1], where, frozenset({_INT64}))
    top_values = table.define(node.outputs[0], table.dtypes[node.inputs[0]], where)
    top_indices = table.define(node.outputs[1], _INT64, where)

    def top_k(values: Values) -> None:
        array, k_array = np.asarray(values[scores]), values[k_slot]
        if np.shape(k_array) != (1,):
            raise ValueError("TopK: K must be a 1-D tensor of one value")
        k, rank = int(k_array[0]), array.ndim
        position = axis + rank if axis < 0 else axis
        if not 0 <= position < rank:
            raise ValueError(f"TopK: axis {axis} out of range for rank {rank}")
        if not 0 <= k <= array.shape[position]:
            raise ValueError(f"TopK: k {k} outside 0..{array.shape[position]}")
        if rank == 1:
            order = top_k_1d(array, k, bool(largest))
            values[top_values], values[top_indices] = array[order], order
        else:
            order = _top_k_nd(array, k, position, bool(largest))
            values[top_values] = np.take_along_axis(array, order, axis=position)
            values[top_indices] = order

    return top_k


_OPS: Final[dict[str, Callable[[Node, _Compiler], Step]]] = {
    "Gather": _gather,
    "Add": _elementwise(np.add),
    "Sub": _elementwise(np.subtract),
    "Mul": _elementwise(np.multiply),
    "Reshape": _reshape,
    "Unsqueeze": _unsqueeze,
    "ScatterElements": _scatter_elements,
    "TopK": _top_k,
}
SUPPORTED_OPS: Final = tuple(sorted(_OPS))


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
        table = _Compiler()
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
                raise UnsupportedModelError(f"{_label(node)}: op domain {node.domain!r}")
            compile_node = _OPS.get(node.op_type)
            if compile_node is None:
                raise UnsupportedModelError(
                    f"{_label(node)}: op {node.op_type!r} is not supported "
                    f"(the numpy runtime runs {', '.join(SUPPORTED_OPS)})"
                )
            before = len(table.slots)
            steps.append(compile_node(node, table))
            self._labels.append(_label(node))
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
