"""The errors the model pipeline raises; each message names the file or field at fault."""

from __future__ import annotations


class ModelError(Exception):
    """Base class: anything wrong with a model directory, its data or its outputs."""


class ModelFormatError(ModelError):
    """A manifest or model file that is missing, unreadable or not in the expected format."""


class UnsupportedModelError(ModelFormatError):
    """A well-formed model that uses an op, attribute, data type or feature the numpy runtime
    does not carry; the message names it. The ``auto`` runtime falls back to onnxruntime."""


class ModelRunError(ModelError):
    """The numpy runtime could not run the graph on these inputs (a wrong feed, an index out
    of range); onnxruntime fails on the same inputs."""


class ModelIntegrityError(ModelError):
    """The model file's sha256 does not match the one its manifest declares."""


class ModelVerificationError(ModelError):
    """A model loaded but gave answers other than its golden requests expect."""


class EventDataError(ModelError):
    """An events file that cannot be used for training or evaluation (e.g. no customers)."""


class MissingExtraError(ModelError):
    """A package of an optional extra is not installed; the message says how to add it."""

    def __init__(self, package: str, extra: str) -> None:
        super().__init__(f"{package} is not installed: pip install 'edge-agent[{extra}]'")
        self.package = package
        self.extra = extra
