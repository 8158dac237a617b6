"""The eight ops of the scoring graph in numpy, with ONNX semantics: each node checked once
(inputs defined before use, types, attributes) and compiled into a closure over value slots.

Gather (any axis, negative indices), Add/Sub/Mul (multidirectional broadcasting), Reshape
(0 and -1, allowzero), Unsqueeze (axes as an input, negative ones), ScatterElements
(``reduction`` none or add, the additions one after another in index order as onnxruntime
makes them) and TopK (largest or smallest, sorted, ties to the lower index). An attribute
value or data type beyond these is an ``UnsupportedModelError`` naming it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any, Final

import numpy as np
import numpy.typing as npt

from models.errors import ModelFormatError, UnsupportedModelError
from models.onnx_reader import ATTR_INT, ATTR_STRING, Node

__all__ = ["OPS", "SUPPORTED_OPS", "Array", "Compiler", "Step", "Values", "label"]

Array = npt.NDArray[Any]
Values = list[Any]
Step = Callable[[Values], None]

_NUMERIC: Final = frozenset(np.dtype(name) for name in ("float32", "float64", "int32", "int64"))
_INDEX: Final = frozenset(np.dtype(name) for name in ("int32", "int64"))
_INT64: Final = np.dtype("int64")


class Compiler:
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


def label(node: Node) -> str:
    return f"node {node.name or '?'} ({node.op_type})"


def _attributes(node: Node, allowed: Mapping[str, int]) -> None:
    for name, attribute in node.attributes.items():
        if name not in allowed:
            raise UnsupportedModelError(f"{label(node)}: attribute {name!r} is not supported")
        if attribute.kind != allowed[name]:
            raise ModelFormatError(f"{label(node)}: attribute {name!r} has the wrong type")


def _int_attribute(node: Node, name: str, default: int) -> int:
    attribute = node.attributes.get(name)
    return default if attribute is None else int(attribute.value)  # type: ignore[arg-type]


def _arity(node: Node, inputs: int, outputs: int) -> None:
    if len(node.inputs) != inputs or len(node.outputs) != outputs:
        raise ModelFormatError(
            f"{label(node)}: takes {inputs} inputs and gives {outputs} outputs, "
            f"has {len(node.inputs)} and {len(node.outputs)}"
        )


def _gather(node: Node, table: Compiler) -> Step:
    _arity(node, 2, 1)
    _attributes(node, {"axis": ATTR_INT})
    where, axis = label(node), _int_attribute(node, "axis", 0)
    data = table.use(node.inputs[0], where, _NUMERIC)
    indices = table.use(node.inputs[1], where, _INDEX)
    out = table.define(node.outputs[0], table.dtypes[node.inputs[0]], where)

    def gather(values: Values) -> None:
        # np.take: negative indices count from the end, out of range raises: as ONNX Gather
        values[out] = np.asarray(values[data]).take(values[indices], axis=axis)

    return gather


def _elementwise(ufunc: np.ufunc) -> Callable[[Node, Compiler], Step]:
    def compile_node(node: Node, table: Compiler) -> Step:
        _arity(node, 2, 1)
        _attributes(node, {})
        where = label(node)
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


def _reshape(node: Node, table: Compiler) -> Step:
    _arity(node, 2, 1)
    _attributes(node, {"allowzero": ATTR_INT})
    where = label(node)
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


def _unsqueeze(node: Node, table: Compiler) -> Step:
    _arity(node, 2, 1)
    _attributes(node, {})
    where = label(node)
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


def _scatter_elements(node: Node, table: Compiler) -> Step:
    _arity(node, 3, 1)
    _attributes(node, {"axis": ATTR_INT, "reduction": ATTR_STRING})
    where = label(node)
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
        part = np.partition(scores, kth)  # values only: faster than argpartition
        threshold = part[kth]
        chosen = part[kth:] if largest else part[: kth + 1]
        if not (scores.dtype.kind == "f" and np.isnan(chosen).any()):
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


def _top_k(node: Node, table: Compiler) -> Step:
    _arity(node, 2, 2)
    _attributes(node, {"axis": ATTR_INT, "largest": ATTR_INT, "sorted": ATTR_INT})
    where = label(node)
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


OPS: Final[dict[str, Callable[[Node, Compiler], Step]]] = {
    "Gather": _gather,
    "Add": _elementwise(np.add),
    "Sub": _elementwise(np.subtract),
    "Mul": _elementwise(np.multiply),
    "Reshape": _reshape,
    "Unsqueeze": _unsqueeze,
    "ScatterElements": _scatter_elements,
    "TopK": _top_k,
}
SUPPORTED_OPS: Final = tuple(sorted(OPS))
