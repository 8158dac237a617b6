"""A small, strict reader of ``model.onnx``: the protobuf wire format of the ONNX subset the
numpy runtime runs, without the ``onnx`` package (13 MB at import) or protobuf.

The bytes come from a model file that may be hostile, so the reader is total: any input is
either an ``OnnxModel`` or a ``ModelFormatError`` with a reason, never another exception.
Every length is checked against the bytes that hold it before anything is sliced or
allocated, so memory stays within a small multiple of the file's size. A well-formed file
that uses something this reader does not carry (external or sparse tensors, a data type
other than float32/float64/int32/int64, non-tensor values, local functions) raises
``UnsupportedModelError``: the ``auto`` runtime then falls back to onnxruntime.

Field numbers are those of ``onnx/onnx.proto`` (ONNX 1.x); the wire format itself is
``protobuf_wire``'s. Unknown fields are skipped, as protobuf does, after their bounds and
wire type were checked.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

import numpy as np
import numpy.typing as npt

from models.errors import ModelFormatError, UnsupportedModelError
from models.protobuf_wire import MAX_VARINT_VALUES, Budget, WireMessage, signed, utf8

__all__ = [
    "Attribute",
    "Graph",
    "Node",
    "OnnxModel",
    "ValueInfo",
    "read_model",
]

MAX_RANK: Final = 32  # dimensions of a tensor or a declared shape
_INT64_MIN: Final = -(1 << 63)

# TensorProto.DataType values this reader turns into numpy arrays (little-endian on disk).
FLOAT: Final = 1
INT32: Final = 6
INT64: Final = 7
DOUBLE: Final = 11
DTYPES: Final[dict[int, np.dtype[np.generic]]] = {
    FLOAT: np.dtype("<f4"),
    INT32: np.dtype("<i4"),
    INT64: np.dtype("<i8"),
    DOUBLE: np.dtype("<f8"),
}
_DTYPE_NAMES: Final = {
    0: "UNDEFINED", 1: "FLOAT", 2: "UINT8", 3: "INT8", 4: "UINT16", 5: "INT16", 6: "INT32",
    7: "INT64", 8: "STRING", 9: "BOOL", 10: "FLOAT16", 11: "DOUBLE", 12: "UINT32",
    13: "UINT64", 14: "COMPLEX64", 15: "COMPLEX128", 16: "BFLOAT16",
}  # fmt: skip

# AttributeProto.AttributeType values the reader keeps; the others are refused as unsupported.
ATTR_FLOAT: Final = 1
ATTR_INT: Final = 2
ATTR_STRING: Final = 3
ATTR_FLOATS: Final = 6
ATTR_INTS: Final = 7
ATTR_STRINGS: Final = 8
_ATTR_NAMES: Final = {
    4: "TENSOR", 5: "GRAPH", 9: "TENSORS", 10: "GRAPHS", 11: "SPARSE_TENSOR",
    12: "SPARSE_TENSORS", 13: "TYPE_PROTO", 14: "TYPE_PROTOS",
}  # fmt: skip

AttributeValue = int | float | str | tuple[int, ...] | tuple[float, ...] | tuple[str, ...]
Dim = int | str | None  # a fixed size, a symbolic name, or unknown


@dataclass(frozen=True, slots=True)
class ValueInfo:
    name: str
    elem_type: int  # a key of DTYPES
    shape: tuple[Dim, ...] | None  # None: the rank is not declared

    @property
    def dtype(self) -> np.dtype[np.generic]:
        return DTYPES[self.elem_type]


@dataclass(frozen=True, slots=True)
class Attribute:
    name: str
    kind: int  # ATTR_*
    value: AttributeValue


@dataclass(frozen=True, slots=True)
class Node:
    op_type: str
    domain: str
    name: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    attributes: dict[str, Attribute]


@dataclass(frozen=True, slots=True)
class Graph:
    name: str
    nodes: tuple[Node, ...]
    initializers: dict[str, npt.NDArray[np.generic]]
    inputs: tuple[ValueInfo, ...]
    outputs: tuple[ValueInfo, ...]


@dataclass(frozen=True, slots=True)
class OnnxModel:
    ir_version: int
    opsets: dict[str, int]  # domain ("" is the default ONNX domain) -> version
    graph: Graph


def _dtype_name(elem_type: int) -> str:
    return _DTYPE_NAMES.get(elem_type, f"data type {elem_type}")


def read_model(data: bytes) -> OnnxModel:
    """Parse a ModelProto. Raises ModelFormatError (UnsupportedModelError for a valid file
    that uses more of ONNX than this reader carries)."""
    model = WireMessage(data, 0, len(data), "ModelProto", Budget())
    if model.has(25):
        raise UnsupportedModelError("ModelProto: model-local functions are not supported")
    ir_version = model.int64(1, "ir_version")
    opsets: dict[str, int] = {}
    for entry in model.messages(8, "opset_import"):
        domain = entry.text(1, "domain")
        if domain in opsets:
            raise ModelFormatError(f"ModelProto: opset_import names domain {domain!r} twice")
        opsets[domain] = entry.int64(2, "version")
    graph = model.message(7, "graph")
    if graph is None:
        raise ModelFormatError("ModelProto: no graph")
    return OnnxModel(ir_version, opsets, _graph(graph))


def _graph(graph: WireMessage) -> Graph:
    if graph.has(15):
        raise UnsupportedModelError("GraphProto: sparse initializers are not supported")
    initializers: dict[str, npt.NDArray[np.generic]] = {}
    for tensor in graph.messages(5, "initializer"):
        name, array = _tensor(tensor)
        if not name or name in initializers:
            raise ModelFormatError(f"GraphProto: initializer name {name!r} empty or repeated")
        initializers[name] = array
    return Graph(
        name=graph.text(2, "name"),
        nodes=tuple(_node(node) for node in graph.messages(1, "node")),
        initializers=initializers,
        inputs=tuple(_value_info(value) for value in graph.messages(11, "input")),
        outputs=tuple(_value_info(value) for value in graph.messages(12, "output")),
    )


def _node(node: WireMessage) -> Node:
    op_type = node.text(4, "op_type")
    name = node.text(3, "name")
    label = f"node {name or '?'} ({op_type})"
    if node.text(8, "overload"):
        raise UnsupportedModelError(f"{label}: function overloads are not supported")
    attributes: dict[str, Attribute] = {}
    for raw in node.messages(5, "attribute"):
        attribute = _attribute(raw, label)
        if attribute.name in attributes:
            raise ModelFormatError(f"{label}: attribute {attribute.name!r} given twice")
        attributes[attribute.name] = attribute
    return Node(
        op_type=op_type,
        domain=node.text(7, "domain"),
        name=name,
        inputs=node.texts(1, "input"),
        outputs=node.texts(2, "output"),
        attributes=attributes,
    )


def _attribute(attribute: WireMessage, label: str) -> Attribute:
    name = attribute.text(1, "name")
    where = f"{label}: attribute {name!r}"
    if not name:
        raise ModelFormatError(f"{label}: an attribute has no name")
    if attribute.has(21):
        raise UnsupportedModelError(f"{where} refers to a function attribute")
    kind = attribute.int32(20, "type")
    value: AttributeValue
    if kind == ATTR_INT:
        value = attribute.int64(3, "i")
    elif kind == ATTR_FLOAT:
        value = attribute.float32(2, "f")
    elif kind == ATTR_STRING:
        span = attribute.span(4, "s")
        value = "" if span is None else utf8(attribute.data, span, where)
    elif kind == ATTR_INTS:
        value = tuple(
            signed(item) for item in attribute.packed_varints(8, "ints", MAX_VARINT_VALUES)
        )
    elif kind == ATTR_FLOATS:
        value = tuple(float(item) for item in attribute.packed_fixed(7, "floats", "<f4"))
    elif kind == ATTR_STRINGS:
        value = attribute.texts(9, "strings")
    elif kind in _ATTR_NAMES:
        raise UnsupportedModelError(f"{where}: {_ATTR_NAMES[kind]} attributes are not supported")
    else:
        raise ModelFormatError(f"{where}: attribute type {kind} is invalid")
    return Attribute(name, kind, value)


def _value_info(value: WireMessage) -> ValueInfo:
    name = value.text(1, "name")
    where = f"value {name!r}"
    type_proto = value.message(2, "type")
    if not name or type_proto is None:
        raise ModelFormatError(f"GraphProto: {where} needs a name and a type")
    tensor = type_proto.message(1, "tensor_type")
    if tensor is None:
        raise UnsupportedModelError(f"{where}: only tensor values are supported")
    elem_type = tensor.int32(1, "elem_type")
    if elem_type not in DTYPES:
        raise UnsupportedModelError(f"{where}: {_dtype_name(elem_type)} is not supported")
    shape_proto = tensor.message(2, "shape")
    shape: tuple[Dim, ...] | None = None
    if shape_proto is not None:
        dims: list[Dim] = []
        dims_proto = shape_proto.messages(1, "dim")
        if len(dims_proto) > MAX_RANK:
            raise UnsupportedModelError(f"{where}: rank {len(dims_proto)} beyond {MAX_RANK}")
        for dim in dims_proto:
            if dim.has(1):
                size = dim.int64(1, "dim_value")
                if size < 0:
                    raise ModelFormatError(f"{where}: negative dimension {size}")
                dims.append(size)
            elif dim.has(2):
                dims.append(dim.text(2, "dim_param"))
            else:
                dims.append(None)
        shape = tuple(dims)
    return ValueInfo(name, elem_type, shape)


def _tensor(tensor: WireMessage) -> tuple[str, npt.NDArray[np.generic]]:
    name = tensor.text(8, "name")
    where = f"initializer {name!r}"
    if tensor.has(3):
        raise UnsupportedModelError(f"{where}: segmented tensors are not supported")
    if tensor.has(13) or tensor.uint(14, "data_location") != 0:
        raise UnsupportedModelError(f"{where}: external data is not supported")
    elem_type = tensor.int32(2, "data_type")
    if elem_type not in DTYPES:
        raise UnsupportedModelError(f"{where}: {_dtype_name(elem_type)} is not supported")
    dtype = DTYPES[elem_type]
    dims = tuple(signed(size) for size in tensor.packed_varints(1, "dims", MAX_RANK))
    if any(size < 0 for size in dims):
        raise ModelFormatError(f"{where}: negative dimension in {dims}")
    count = 1
    for size in dims:
        count *= size  # Python integers: no overflow; checked against the bytes below
    raw = tensor.span(9, "raw_data")
    typed = {FLOAT: 4, INT32: 5, INT64: 7, DOUBLE: 10}[elem_type]
    for number in (4, 5, 6, 7, 10, 11):
        if number != typed and tensor.has(number):
            raise ModelFormatError(f"{where}: field {number} does not fit {_dtype_name(elem_type)}")
    if raw is not None:
        if tensor.has(typed):
            raise ModelFormatError(f"{where}: both raw_data and typed data")
        if raw[1] - raw[0] != count * dtype.itemsize:
            raise ModelFormatError(
                f"{where}: raw_data holds {raw[1] - raw[0]} bytes, shape {dims} needs "
                f"{count * dtype.itemsize}"
            )
        flat = np.frombuffer(tensor.data, dtype, count, raw[0]) if count else np.empty(0, dtype)
    elif elem_type in (FLOAT, DOUBLE):
        flat = tensor.packed_fixed(typed, "float_data" if elem_type == FLOAT else "double_data",
                                   dtype.str)  # fmt: skip
    else:
        flat = _typed_ints(tensor, typed, elem_type, count, where)
    if flat.size != count:
        raise ModelFormatError(f"{where}: holds {flat.size} values, shape {dims} needs {count}")
    try:  # own, aligned, native-order memory
        # the canonical native dtype: numpy's fast loops (np.add.at: 10x) key on it
        array = flat.astype(dtype.type, copy=True).reshape(dims)
    except ValueError as exc:  # an empty tensor with a dimension numpy cannot index
        raise ModelFormatError(f"{where}: shape {dims}: {exc}") from exc
    array.flags.writeable = False  # shared by every run: no op may write into it
    return name, array


def _typed_ints(
    tensor: WireMessage, number: int, elem_type: int, count: int, where: str
) -> npt.NDArray[np.generic]:
    values = [signed(item) for item in tensor.packed_varints(number, "int_data", count)]
    low, high = (-(1 << 31), 1 << 31) if elem_type == INT32 else (_INT64_MIN, 1 << 63)
    if any(not low <= item < high for item in values):
        raise ModelFormatError(f"{where}: a value does not fit {_dtype_name(elem_type)}")
    return np.array(values, dtype=DTYPES[elem_type])
