"""Which runtime runs a model file: the numpy interpreter or onnxruntime, behind one shape.

``auto`` runs the numpy interpreter when the graph uses only what it carries (the models the
exporter writes), else onnxruntime. A file that is malformed is refused whatever the choice.
onnxruntime is imported only when a session of it is opened, so an agent on the numpy
runtime never loads it (about 30 MB of resident memory).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Final, Literal, Protocol

import numpy.typing as npt

from models.errors import ModelFormatError, UnsupportedModelError
from models.numpy_runtime import NumpySession
from models.onnx_reader import read_model

if TYPE_CHECKING:
    import onnxruntime as ort

logger = logging.getLogger(__name__)

__all__ = ["RUNTIMES", "InferenceSession", "Runtime", "open_session"]

Runtime = Literal["auto", "numpy", "onnxruntime"]
RUNTIMES: Final[tuple[Runtime, ...]] = ("auto", "numpy", "onnxruntime")


class InferenceSession(Protocol):
    @property
    def runtime(self) -> str: ...  # "numpy" or "onnxruntime"

    def run(
        self, output_names: Sequence[str] | None, feeds: Mapping[str, npt.NDArray[Any]]
    ) -> list[npt.NDArray[Any]]: ...

    def input_shapes(self) -> dict[str, list[int | str | None] | None]: ...

    def output_names(self) -> list[str]: ...


class OnnxRuntimeSession:
    """A single-threaded onnxruntime session with the same small surface."""

    runtime: Final = "onnxruntime"

    def __init__(self, data: bytes, label: str) -> None:
        import onnxruntime as ort  # only when this runtime is chosen: 30 MB

        try:
            self._session = ort.InferenceSession(
                data, _session_options(ort), providers=["CPUExecutionProvider"]
            )
        except Exception as exc:  # onnxruntime raises its own untyped errors: translate once
            raise ModelFormatError(f"onnxruntime cannot load {label}: {exc}") from exc

    def run(
        self, output_names: Sequence[str] | None, feeds: Mapping[str, npt.NDArray[Any]]
    ) -> list[npt.NDArray[Any]]:
        names = None if output_names is None else list(output_names)
        result: list[npt.NDArray[Any]] = self._session.run(names, dict(feeds))
        return result

    def input_shapes(self) -> dict[str, list[int | str | None] | None]:
        return {node.name: node.shape for node in self._session.get_inputs()}

    def output_names(self) -> list[str]:
        return [node.name for node in self._session.get_outputs()]


def _session_options(ort: Any) -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1  # one core for one tiny model: no thread hand-offs
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.log_severity_level = 3
    return options


def open_session(data: bytes, runtime: Runtime, label: str) -> InferenceSession:
    """A session for these model bytes (already checked against the manifest's sha256).
    Raises ModelFormatError (UnsupportedModelError when ``numpy`` cannot run the graph)."""
    if runtime == "onnxruntime":
        return OnnxRuntimeSession(data, label)
    if runtime not in ("auto", "numpy"):
        raise ValueError(f"unknown runtime {runtime!r}: one of {RUNTIMES}")
    try:
        return NumpySession(read_model(data))
    except UnsupportedModelError as exc:
        if runtime == "numpy":
            raise UnsupportedModelError(f"{label}: {exc}") from exc
        logger.warning("model.runtime.fallback runtime=onnxruntime path=%s reason=%s", label, exc)
        return OnnxRuntimeSession(data, label)
    except ModelFormatError as exc:
        raise ModelFormatError(f"{label}: {exc}") from exc
