"""The model directory's manifest: reading, validating and writing ``manifest.json``.

The format is documented in MODEL_FORMAT.md. Reading never trusts the file: every field
the runtime uses is checked, and a problem raises ModelFormatError naming the field.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from models.errors import ModelFormatError, ModelIntegrityError
from models.features import FeatureSpec, HistoryEntry

FORMAT_VERSION: Final = 1
MANIFEST_NAME: Final = "manifest.json"
MODEL_NAME: Final = "model.onnx"
# Bounds that keep a damaged or hostile manifest a refused model instead of a crash or an
# allocation of the whole memory (the feed arrays are sized from the manifest).
MAX_MANIFEST_BYTES: Final = 64 * 1024 * 1024
MAX_TOP_K: Final = 1000


@dataclass(frozen=True, slots=True)
class GoldenRequest:
    """A request and the answer the model gave when it was exported."""

    history: tuple[HistoryEntry, ...]
    context: tuple[int, str, str | None]
    penalty_skus: tuple[str, ...]
    now: float | None
    expected: tuple[tuple[str, float], ...]

    def to_json(self) -> dict[str, Any]:
        hour, store_id, device_id = self.context
        return {
            "history": [list(entry) for entry in self.history],
            "context": {"hour": hour, "store_id": store_id, "device_id": device_id},
            "penalty_skus": list(self.penalty_skus),
            "now": self.now,
            "expected": [[sku, score] for sku, score in self.expected],
        }

    @classmethod
    def from_json(cls, raw: Any) -> GoldenRequest:
        try:
            context = raw["context"]
            return cls(
                history=tuple((str(s), str(t), float(ts)) for s, t, ts in raw["history"]),
                context=(int(context["hour"]), str(context["store_id"]), _device(context)),
                penalty_skus=tuple(str(sku) for sku in raw["penalty_skus"]),
                now=None if raw["now"] is None else float(raw["now"]),
                expected=tuple((str(sku), float(score)) for sku, score in raw["expected"]),
            )
        except (KeyError, TypeError, ValueError, OverflowError) as exc:
            raise ModelFormatError(f"manifest golden_requests entry is invalid: {exc!r}") from exc


def _device(context: Any) -> str | None:
    device = context["device_id"]
    if device is not None and not isinstance(device, str):
        raise TypeError("context.device_id must be a string or null")
    return device


@dataclass(frozen=True, slots=True)
class Manifest:
    version: str
    sha256: str
    model_file: str
    top_k: int
    items: tuple[str, ...]
    feature_spec: FeatureSpec
    golden_requests: tuple[GoldenRequest, ...]
    raw: dict[str, Any]  # the whole document, for fields the runtime does not interpret


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_manifest(model_dir: Path) -> Manifest:
    path = model_dir / MANIFEST_NAME
    try:
        with path.open("rb") as handle:
            text = handle.read(MAX_MANIFEST_BYTES + 1)
        if len(text) > MAX_MANIFEST_BYTES:
            raise ModelFormatError(f"{path} is larger than {MAX_MANIFEST_BYTES} bytes")
        raw = json.loads(text.decode("utf-8"))
    except FileNotFoundError as exc:
        raise ModelFormatError(f"no {MANIFEST_NAME} in {model_dir}") from exc
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise ModelFormatError(f"{path} is not readable JSON: {exc}") from exc
    if not isinstance(raw, dict):
        raise ModelFormatError(f"{path}: the manifest must be a JSON object")
    if raw.get("format_version") != FORMAT_VERSION:
        raise ModelFormatError(f"{path}: format_version must be {FORMAT_VERSION}")
    for name, kind in (("version", str), ("sha256", str), ("model_file", str), ("top_k", int)):
        if not isinstance(raw.get(name), kind) or isinstance(raw.get(name), bool):
            raise ModelFormatError(f"{path}: field {name!r} must be a {kind.__name__}")
    if not 1 <= raw["top_k"] <= MAX_TOP_K:
        raise ModelFormatError(f"{path}: top_k must be 1..{MAX_TOP_K}")
    items = raw.get("items")
    if not isinstance(items, list) or not items or not all(isinstance(i, str) for i in items):
        raise ModelFormatError(f"{path}: field 'items' must be a non-empty list of skus")
    if len(set(items)) != len(items):
        raise ModelFormatError(f"{path}: field 'items' has duplicate skus")
    model_file = raw["model_file"]
    if Path(model_file).name != model_file:
        raise ModelFormatError(f"{path}: model_file must be a plain file name")
    golden = raw.get("golden_requests", [])
    if not isinstance(golden, list):
        raise ModelFormatError(f"{path}: field 'golden_requests' must be a list")
    return Manifest(
        version=raw["version"],
        sha256=raw["sha256"].lower(),
        model_file=model_file,
        top_k=raw["top_k"],
        items=tuple(items),
        feature_spec=FeatureSpec.from_json(raw.get("feature_spec")),
        golden_requests=tuple(GoldenRequest.from_json(entry) for entry in golden),
        raw=raw,
    )


def verify_model_file(model_dir: Path, manifest: Manifest) -> Path:
    """The model file's path once its sha256 matches the manifest's."""
    path = model_dir / manifest.model_file
    if not path.is_file():
        raise ModelFormatError(f"model file missing: {path}")
    actual = sha256_of(path)
    if actual != manifest.sha256:
        raise ModelIntegrityError(
            f"{path}: sha256 {actual} does not match the manifest's {manifest.sha256}"
        )
    return path


def write_json_atomically(path: Path, document: dict[str, Any]) -> None:
    """Write next to the target, fsync, then rename over it: a reader sees old or new."""
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with temporary.open("w", encoding="utf-8") as handle:
        json.dump(document, handle, indent=1, sort_keys=True)
        handle.write("\n")
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)


def write_bytes_atomically(path: Path, data: bytes) -> None:
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with temporary.open("wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)
