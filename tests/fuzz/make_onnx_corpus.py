"""Write the seed corpus of the ``onnx`` fuzz target: ``tests/fuzz/corpus/onnx/``.

    python -m tests.fuzz.make_onnx_corpus

Deterministic (the same files every run), each under the fuzzer's 4096-byte -max_len: the
exporter's scoring graph at a tiny size (raw and typed tensor fields), each op with the
attributes the exporter does not use, graphs the numpy runtime refuses as unsupported, and
malformed wire formats. Needs ``onnx`` (the dev and train extras).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from models.onnx_graph import build_model, serialize
from models.scoring import ModelTensors

CORPUS = Path(__file__).resolve().parent / "corpus" / "onnx"
F, I64 = TensorProto.FLOAT, TensorProto.INT64


def _tiny_tensors() -> ModelTensors:
    rng = np.random.default_rng(1)
    n_items, neighbours = 4, 2
    items = rng.integers(0, n_items, (n_items + 1, neighbours)).astype(np.int32)
    weights = rng.random((n_items + 1, neighbours), np.float32)
    weights[n_items] = 0.0
    return ModelTensors(
        neighbour_items=items,
        neighbour_weights=weights,
        hour_table=rng.random((24, n_items), np.float32),
        store_table=rng.random((2, n_items), np.float32),
        device_table=rng.random((2, n_items), np.float32),
    )


def _model(
    nodes: list[onnx.NodeProto],
    inputs: list[onnx.ValueInfoProto],
    outputs: list[onnx.ValueInfoProto],
    initializers: list[onnx.TensorProto] | None = None,
    opset: int = 18,
) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "seed", inputs, outputs, initializers or [])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=9)


def _info(name: str, dtype: int, shape: list[int | str] | None) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, dtype, shape)


def _typed(model: onnx.ModelProto) -> onnx.ModelProto:
    """The same model with every initializer in the typed fields instead of raw_data."""
    typed = onnx.ModelProto()
    typed.CopyFrom(model)
    for tensor in typed.graph.initializer:
        array = numpy_helper.to_array(tensor)
        replacement = helper.make_tensor(
            tensor.name, tensor.data_type, array.shape, array.flatten().tolist(), raw=False
        )
        tensor.CopyFrom(replacement)
    return typed


def _key(number: int, wire: int) -> bytes:
    return _varint(number << 3 | wire)


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _field(number: int, payload: bytes) -> bytes:
    return _key(number, 2) + _varint(len(payload)) + payload


def seeds() -> dict[str, bytes]:
    scoring = build_model(_tiny_tensors(), history_length=2)
    scoring_bytes = serialize(scoring)
    ops = {
        "gather_axis1": _model(
            [helper.make_node("Gather", ["d", "i"], ["o"], axis=1)],
            [_info("i", I64, [2])],
            [_info("o", F, [2, 2])],
            [numpy_helper.from_array(np.arange(6, dtype=np.float32).reshape(2, 3), "d")],
        ),
        "reshape_zero_minus_one": _model(
            [helper.make_node("Reshape", ["x", "s"], ["o"])],
            [_info("x", F, [2, 3])],
            [_info("o", F, [2, 3])],
            [numpy_helper.from_array(np.array([0, -1], np.int64), "s")],
        ),
        "unsqueeze_negative": _model(
            [helper.make_node("Unsqueeze", ["x", "a"], ["o"])],
            [_info("x", F, [3])],
            [_info("o", F, [3, 1])],
            [numpy_helper.from_array(np.array([-1], np.int64), "a")],
        ),
        "scatter_none_2d": _model(
            [helper.make_node("ScatterElements", ["d", "i", "u"], ["o"], axis=1)],
            [_info("d", F, [2, 3]), _info("i", I64, [2, 1]), _info("u", F, [2, 1])],
            [_info("o", F, [2, 3])],
        ),
        "topk_smallest_2d": _model(
            [helper.make_node("TopK", ["x", "k"], ["v", "i"], axis=0, largest=0)],
            [_info("x", F, [3, 2])],
            [_info("v", F, [2, 2]), _info("i", I64, [2, 2])],
            [numpy_helper.from_array(np.array([2], np.int64), "k")],
        ),
        "add_broadcast_int64": _model(
            [
                helper.make_node("Add", ["a", "b"], ["o"]),
                helper.make_node("Mul", ["o", "b"], ["p"]),
            ],
            [_info("a", I64, [3, 1]), _info("b", I64, [1, 3])],
            [_info("p", I64, [3, 3])],
        ),
        "unsupported_relu": _model(
            [helper.make_node("Relu", ["x"], ["y"])], [_info("x", F, [3])], [_info("y", F, [3])]
        ),
        "unsupported_fp16": _model(
            [helper.make_node("Add", ["x", "x"], ["y"])],
            [_info("x", TensorProto.FLOAT16, [3])],
            [_info("y", TensorProto.FLOAT16, [3])],
        ),
        "unsupported_opset11": _model(
            [helper.make_node("Unsqueeze", ["x"], ["y"], axes=[0])],
            [_info("x", F, [3])],
            [_info("y", F, [1, 3])],
            opset=11,
        ),
        "unsupported_topk_unsorted": _model(
            [helper.make_node("TopK", ["x", "k"], ["v", "i"], sorted=0)],
            [_info("x", F, [4]), _info("k", I64, [1])],
            [_info("v", F, ["k"]), _info("i", I64, ["k"])],
        ),
    }
    external = onnx.ModelProto()
    external.CopyFrom(scoring)
    tensor = external.graph.initializer[0]
    tensor.ClearField("raw_data")
    tensor.data_location = TensorProto.EXTERNAL
    tensor.external_data.add(key="location", value="/etc/passwd")
    found = {name: model.SerializeToString() for name, model in ops.items()}
    found |= {
        "scoring_graph": scoring_bytes,
        "scoring_graph_typed": _typed(scoring).SerializeToString(),
        "unsupported_external_data": external.SerializeToString(),
        "truncated_half": scoring_bytes[: len(scoring_bytes) // 2],
        "empty": b"",
        "length_beyond_file": _key(7, 2) + _varint(1 << 40) + b"\x00",
        "varint_eleven_bytes": _key(1, 0) + b"\xff" * 10 + b"\x01",
        "varint_beyond_64_bits": _key(1, 0) + b"\xff" * 9 + b"\x7f",
        "wire_type_group": _key(7, 3) + _key(7, 4),
        "wire_type_seven": _key(1, 7),
        "field_zero": _key(0, 0) + b"\x00",
        "graph_as_varint": _key(7, 0) + b"\x05",
        "huge_dims_small_raw": _field(
            7,
            _field(
                5,
                _key(1, 0)
                + _varint(1 << 40)
                + _key(2, 0)
                + b"\x01"
                + _field(8, b"t")
                + _field(9, b"\x00" * 8),
            ),
        ),
        "negative_dim": _field(
            7,
            _field(5, _key(1, 0) + _varint((1 << 64) - 1) + _key(2, 0) + b"\x01" + _field(8, b"t")),
        ),
        "rank_40": _field(
            7,
            _field(
                5,
                _field(1, b"\x01" * 40)
                + _key(2, 0)
                + b"\x01"
                + _field(8, b"t")
                + _field(9, b"\x00" * 4),
            ),
        ),
        "bad_utf8_name": _field(7, _field(2, b"\xff\xfe")),
        "many_empty_fields": _key(6, 2) + b"\x00" + (_key(15, 0) + b"\x00") * 1000,
    }
    return found


def main() -> None:
    CORPUS.mkdir(parents=True, exist_ok=True)
    for name, data in sorted(seeds().items()):
        assert len(data) <= 4096, (name, len(data))  # a seed beyond -max_len is cut
        (CORPUS / name).write_bytes(data)
        print(f"{name}: {len(data)} bytes")


if __name__ == "__main__":
    main()
