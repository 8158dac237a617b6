"""Writing a model directory (model.onnx + manifest.json) and verifying or copying one.

The directory is assembled in a hidden sibling folder, checked by loading it exactly the
way the agent will (sha256, onnxruntime and the numpy runtime, golden requests), and only
then moved into place.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from models.errors import MissingExtraError, ModelFormatError
from models.events import format_ts
from models.features import FeatureSpec, HistoryEntry
from models.graph_names import INPUT_NAMES, IR_VERSION, OPSET, OUTPUT_NAMES
from models.manifest import (
    FORMAT_VERSION,
    MANIFEST_NAME,
    MODEL_NAME,
    GoldenRequest,
    read_manifest,
    sha256_of,
    write_bytes_atomically,
    write_json_atomically,
)
from models.onnx_graph import (
    build_model,
    serialize,
    tensors_from_model,
)
from models.scoring import ModelTensors
from models.serving import SuggestionModel

try:
    import onnx
except ModuleNotFoundError as exc:  # export reads and writes graphs: the [train] extra
    raise MissingExtraError("onnx", "train") from exc

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class GoldenInput:
    """A request to store in the manifest; its expected answer is computed at export."""

    history: tuple[HistoryEntry, ...]
    context: tuple[int, str, str | None]
    penalty_skus: tuple[str, ...] = ()
    now: float | None = None


def write_model_dir(
    out_dir: Path,
    *,
    tensors: ModelTensors,
    items: Sequence[str],
    spec: FeatureSpec,
    top_k: int,
    golden_inputs: Sequence[GoldenInput],
    extra: dict[str, Any],
    version: str | None = None,
    created_at: str | None = None,
) -> SuggestionModel:
    """Export and verify; returns the model loaded from ``out_dir``. ``extra`` adds manifest
    fields (training window, training stats, metrics). Without ``version`` the version is
    derived from the model's sha256, so the same parameters give the same version."""
    data = serialize(build_model(tensors, spec.history_length))
    staging = out_dir.parent / f".{out_dir.name}.staging-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        write_bytes_atomically(staging / MODEL_NAME, data)
        sha = sha256_of(staging / MODEL_NAME)
        document: dict[str, Any] = {
            **extra,
            "format_version": FORMAT_VERSION,
            "version": version or f"sim-{sha[:12]}",
            "created_at": created_at or format_ts(datetime.now(UTC).timestamp()),
            "model_file": MODEL_NAME,
            "sha256": sha,
            "size_bytes": len(data),
            "top_k": top_k,
            "items": list(items),
            "feature_spec": spec.to_json(),
            "onnx": {
                "ir_version": IR_VERSION,
                "opset": OPSET,
                "inputs": list(INPUT_NAMES),
                "outputs": list(OUTPUT_NAMES),
                "mask_penalty_min": 1.0e9,
            },
            "golden_requests": [],
        }
        write_json_atomically(staging / MANIFEST_NAME, document)
        # the golden answers come from onnxruntime, the reference; every load re-checks them
        draft = SuggestionModel.load(staging, check_golden=False, runtime="onnxruntime")
        golden = [
            GoldenRequest(
                entry.history,
                entry.context,
                entry.penalty_skus,
                entry.now,
                tuple(
                    draft.suggest(entry.history, entry.context, entry.penalty_skus, now=entry.now)
                ),
            )
            for entry in golden_inputs
        ]
        document["golden_requests"] = [request.to_json() for request in golden]
        write_json_atomically(staging / MANIFEST_NAME, document)
        for runtime in ("onnxruntime", "auto"):  # the check the agent's hot swap will make
            SuggestionModel.load(staging, runtime=runtime)
        _move_into_place(staging, out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    logger.info(
        "export.complete dir=%s version=%s bytes=%d", out_dir, document["version"], len(data)
    )
    return SuggestionModel.load(out_dir)


def _move_into_place(staging: Path, out_dir: Path) -> None:
    """A new directory is renamed in one step; into an existing one the model file goes
    first and the manifest last, so a reader in between sees a sha256 mismatch, not a mix."""
    if not out_dir.exists():
        staging.rename(out_dir)
        return
    if not out_dir.is_dir():
        raise ModelFormatError(f"{out_dir} exists and is not a directory")
    os.replace(staging / MODEL_NAME, out_dir / MODEL_NAME)
    os.replace(staging / MANIFEST_NAME, out_dir / MANIFEST_NAME)


def verify_model_dir(model_dir: Path) -> SuggestionModel:
    """Everything the agent checks before it uses a model directory."""
    model = SuggestionModel.load(model_dir)
    manifest = read_manifest(model_dir)
    tensors = tensors_from_model(onnx.load(str(model_dir / manifest.model_file)))
    if tensors.n_items != len(manifest.items):
        raise ModelFormatError(f"{model_dir}: the model scores {tensors.n_items} items")
    return model


def copy_model_dir(model_dir: Path, out_dir: Path) -> SuggestionModel:
    """Verify, then copy into ``out_dir`` (e.g. an agent's drop folder) without a half state."""
    verify_model_dir(model_dir)
    manifest = read_manifest(model_dir)
    staging = out_dir.parent / f".{out_dir.name}.staging-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        shutil.copyfile(model_dir / manifest.model_file, staging / MODEL_NAME)
        document = dict(manifest.raw, model_file=MODEL_NAME)
        write_json_atomically(staging / MANIFEST_NAME, document)
        SuggestionModel.load(staging)
        _move_into_place(staging, out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return SuggestionModel.load(out_dir)
