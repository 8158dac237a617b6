"""The model file reader: what onnx writes reads back exactly, and anything else is a
ModelFormatError with a reason, in bounded memory, never another exception."""

from __future__ import annotations

import tracemalloc
from pathlib import Path
from typing import Any, cast

import numpy as np
import onnx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from onnx import TensorProto, helper, numpy_helper

from models.errors import ModelFormatError, ModelRunError, UnsupportedModelError
from models.numpy_runtime import NumpySession
from models.onnx_reader import read_model
from models.protobuf_wire import MAX_FIELDS
from models.serving import DEFAULT_MODEL_DIR
from tests.fuzz.make_onnx_corpus import _field, _key, _varint, seeds
from tests.fuzz.targets import check_onnx

BUNDLED = (DEFAULT_MODEL_DIR / "model.onnx").read_bytes()
SMALL = seeds()["scoring_graph"]
DTYPES: dict[np.dtype[Any], int] = {
    np.dtype("float32"): TensorProto.FLOAT,
    np.dtype("float64"): TensorProto.DOUBLE,
    np.dtype("int32"): TensorProto.INT32,
    np.dtype("int64"): TensorProto.INT64,
}


def _holder(tensor: onnx.TensorProto) -> bytes:
    """A model whose graph only holds this tensor as an initializer."""
    out = helper.make_tensor_value_info("o", TensorProto.FLOAT, [1])
    graph = helper.make_graph([], "g", [], [out], [tensor])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=9)
    data: bytes = model.SerializeToString()
    return data


def test_the_bundled_model_reads_as_onnx_reads_it() -> None:
    ours = read_model(BUNDLED)
    theirs = onnx.load_from_string(BUNDLED)
    assert ours.ir_version == theirs.ir_version
    assert ours.opsets == {entry.domain: entry.version for entry in theirs.opset_import}
    assert ours.graph.name == theirs.graph.name
    for node, proto in zip(ours.graph.nodes, theirs.graph.node, strict=True):
        assert (node.op_type, node.inputs, node.outputs) == (
            proto.op_type,
            tuple(proto.input),
            tuple(proto.output),
        )
        expected = {a.name: helper.get_attribute_value(a) for a in proto.attribute}
        got = {name: attribute.value for name, attribute in node.attributes.items()}
        assert got == {k: v.decode() if isinstance(v, bytes) else v for k, v in expected.items()}
    for tensor in theirs.graph.initializer:
        array = ours.graph.initializers[tensor.name]
        reference = numpy_helper.to_array(tensor)
        assert array.dtype == reference.dtype
        assert array.shape == reference.shape
        assert array.tobytes() == reference.tobytes()
        assert not array.flags.writeable  # shared by every run
    assert [(i.name, i.elem_type, i.shape) for i in ours.graph.inputs] == [
        (
            i.name,
            i.type.tensor_type.elem_type,
            tuple(d.dim_value for d in i.type.tensor_type.shape.dim),
        )
        for i in theirs.graph.input
    ]


_arrays = st.sampled_from(sorted(DTYPES, key=str)).flatmap(
    lambda dtype: hnp.arrays(
        dtype, hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=5)
    )
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(array=_arrays, raw=st.booleans())
def test_any_tensor_onnx_writes_reads_back_bit_for_bit(
    array: np.ndarray[Any, Any], raw: bool
) -> None:
    if raw:
        tensor = numpy_helper.from_array(array, "t")
    else:  # the typed fields: float_data, double_data, int32_data, int64_data
        tensor = helper.make_tensor("t", DTYPES[array.dtype], array.shape, array.flatten().tolist())
    got = read_model(_holder(tensor)).graph.initializers["t"]
    assert got.dtype == array.dtype
    assert got.shape == array.shape
    assert got.tobytes() == array.tobytes()  # NaN payloads and -0.0 too


@settings(max_examples=200, deadline=None)
@given(
    integer=st.integers(-(2**63), 2**63 - 1),
    number=st.floats(width=32, allow_nan=False),
    text=st.text(max_size=20),
    integers=st.lists(st.integers(-(2**63), 2**63 - 1), min_size=1, max_size=10),
    numbers=st.lists(st.floats(width=32, allow_nan=False), min_size=1, max_size=10),
    texts=st.lists(st.text(max_size=5), min_size=1, max_size=5),
    dims=st.lists(st.one_of(st.integers(0, 2**40), st.text(min_size=1, max_size=4)), max_size=5),
)
def test_attributes_and_shapes_read_back(
    integer: int,
    number: float,
    text: str,
    integers: list[int],
    numbers: list[float],
    texts: list[str],
    dims: list[int | str],
) -> None:
    node = helper.make_node(
        "Custom", ["x"], ["y"], i=integer, f=number, s=text, ints=integers, floats=numbers,
        strings=texts, name="n", domain="",
    )  # fmt: skip
    x = helper.make_tensor_value_info("x", TensorProto.INT64, dims)
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    graph = helper.make_graph([node], "g", [x], [y])
    model_proto = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=9
    )
    data = model_proto.SerializeToString()
    model = read_model(data)
    values = {name: a.value for name, a in model.graph.nodes[0].attributes.items()}
    assert values["i"] == integer
    assert np.float32(cast(float, values["f"])) == np.float32(number)
    assert values["s"] == text
    assert values["strings"] == tuple(texts)
    assert values["ints"] == tuple(integers)
    assert values["floats"] == tuple(float(np.float32(n)) for n in numbers)
    assert model.graph.inputs[0].shape == tuple(dims)
    assert model.graph.outputs[0].shape is None
    with pytest.raises(UnsupportedModelError, match="'Custom'"):
        NumpySession(model)


def test_every_truncation_of_a_model_is_refused_or_read() -> None:
    refused = 0
    for end in range(len(SMALL)):
        try:
            model = read_model(SMALL[:end])
        except ModelFormatError as exc:
            reason = str(exc)
            assert reason
            refused += 1
            continue
        with pytest.raises(ModelFormatError):  # a prefix cut at a field boundary lacks parts
            NumpySession(model)
    assert refused > len(SMALL) * 0.9


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    edits=st.lists(
        st.tuples(st.integers(0, len(SMALL) - 1), st.integers(0, 255), st.sampled_from("xid")),
        min_size=1,
        max_size=6,
    )
)
def test_a_damaged_model_is_refused_with_a_reason_or_still_runs(
    edits: list[tuple[int, int, str]],
) -> None:
    """Flipped, inserted and deleted bytes anywhere: the fuzz target's promise."""
    data = bytearray(SMALL)
    for where, value, kind in edits:
        position = where % max(len(data), 1)
        if kind == "x":
            data[position] ^= value or 1
        elif kind == "i":
            data.insert(position, value)
        elif data:
            del data[position]
    check_onnx(bytes(data))


def _tensor_model(*fields: bytes) -> bytes:
    return _field(7, _field(5, b"".join(fields)))


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "no graph"),
        (_key(7, 2) + _varint(10**12), "claims"),
        (_key(1, 0) + b"\x80" * 10 + b"\x00", "longer than 10 bytes"),
        (_key(1, 0) + b"\x80" * 3, "truncated varint"),
        (_key(8, 5) + b"\x00\x00", "truncated"),
        (_key(7, 3), "wire type 3"),
        (_key(0, 0) + b"\x00", "field number 0"),
        (_key(1, 0) + b"\x01" + _key(1, 0) + b"\x02", "ir_version is given 2 times"),
        (_field(7, _field(2, b"\xc3\x28")), "not UTF-8"),
        (
            _tensor_model(
                _key(1, 0) + _varint(2**40),
                _key(2, 0) + b"\x01",
                _field(8, b"t"),
                _field(9, b"\x00" * 8),
            ),
            "needs 4398046511104",
        ),
        (
            _tensor_model(
                _key(1, 0) + b"\x02", _key(2, 0) + b"\x01", _field(8, b"t"), _field(4, b"\x00" * 4)
            ),
            "holds 1 values",
        ),
        (
            _tensor_model(
                _key(1, 0) + b"\x01",
                _key(2, 0) + b"\x01",
                _field(8, b"t"),
                _field(9, b"\x00" * 4),
                _field(4, b"\x00" * 4),
            ),
            "both raw_data",
        ),
        (
            _tensor_model(
                _key(1, 0) + b"\x01", _key(2, 0) + b"\x01", _field(8, b"t"), _field(7, b"\x01")
            ),
            "does not fit FLOAT",
        ),
        (
            _tensor_model(
                _key(1, 0) + b"\x01",
                _key(2, 0) + b"\x06",
                _field(8, b"t"),
                _field(5, _varint(2**40)),
            ),
            "does not fit INT32",
        ),
        (
            _tensor_model(_field(1, b"\x01" * 33), _key(2, 0) + b"\x01", _field(8, b"t")),
            "more than 32 values",
        ),
        (_tensor_model(_key(2, 0) + b"\x08", _field(8, b"t")), "STRING is not supported"),
        (
            _tensor_model(_key(2, 0) + b"\x01", _field(8, b"t"), _key(14, 0) + b"\x01"),
            "external data",
        ),
        (_field(7, _field(15, b"")), "sparse initializers"),
        (_field(25, b"") + _field(7, b""), "model-local functions"),
        (
            _field(7, _field(1, _field(5, _field(1, b"a") + _key(20, 0) + b"\x05"))),
            "GRAPH attributes are not supported",
        ),
        (
            _field(7, _field(1, _field(5, _field(1, b"a") + _key(20, 0) + b"\x63"))),
            "attribute type 99 is invalid",
        ),
        (
            _field(7, _field(11, _field(1, b"x") + _field(2, _field(4, b"")))),
            "only tensor values",
        ),
    ],
)
def test_a_hostile_file_is_a_format_error_with_its_reason(data: bytes, reason: str) -> None:
    with pytest.raises(ModelFormatError, match=reason):
        read_model(data)


def test_many_tiny_fields_are_refused_within_a_memory_bound() -> None:
    """A file of nothing but two-byte fields: the reader stops at its field budget instead of
    holding a Python object per field of an arbitrarily large file."""
    data = (_key(15, 0) + b"\x00") * (MAX_FIELDS * 4)  # 800 kB of unknown fields
    tracemalloc.start()
    try:
        with pytest.raises(ModelFormatError, match="fields in the file"):
            read_model(data)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 64 * 1024 * 1024, peak


def test_a_huge_packed_int64_field_is_refused_before_it_is_decoded() -> None:
    count = 2_000_000
    payload = b"\x01" * count  # two million one-byte varints
    data = _tensor_model(
        _key(1, 0) + _varint(count), _key(2, 0) + b"\x07", _field(8, b"t"), _field(7, payload)
    )
    with pytest.raises(ModelFormatError, match="varints in the file"):
        read_model(data)


def test_the_fuzz_corpus_stays_within_the_promise() -> None:
    corpus = Path(__file__).resolve().parents[1] / "fuzz" / "corpus" / "onnx"
    files = sorted(corpus.iterdir())
    assert len(files) >= 20
    for path in files:
        check_onnx(path.read_bytes())


def test_a_zero_feed_run_of_an_unbounded_index_is_a_run_error() -> None:
    session = NumpySession(read_model(seeds()["gather_axis1"]))
    with pytest.raises(ModelRunError, match="Gather"):
        session.run(None, {"i": np.array([5, 0], np.int64)})
