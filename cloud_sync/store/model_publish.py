"""Reading a model directory for publication: ``model.onnx`` plus its ``manifest.json``.

The store hands out exactly the bytes whose sha256 the manifest names, so a directory whose
artifact does not match its manifest is refused here, before anything is stored. With a
signing key the manifest is signed (``cloud_sync.model_signature``) before it is stored: the
agents verify that signature with the public key in their config.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any, Final

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from cloud_sync.model_signature import sign_manifest
from cloud_sync.store.errors import EvaluationGateError, ModelPublishError
from cloud_sync.store.records import ModelRecord

ARTIFACT: Final = "model.onnx"
MANIFEST: Final = "manifest.json"
EVALUATION: Final = "evaluation.json"  # written by `edge-models evaluate` for the gate
MAX_EVALUATION_BYTES: Final = 1024 * 1024
MAX_ARTIFACT_BYTES: Final = 512 * 1024 * 1024
MAX_MANIFEST_BYTES: Final = 64 * 1024 * 1024
# The version is a URL path segment: keep it to characters that need no escaping.
VERSION_PATTERN: Final = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,127}$")
SHA256_PATTERN: Final = re.compile(r"^[0-9a-f]{64}$")


def read_model_dir(
    directory: Path, signing_key: Ed25519PrivateKey | None = None
) -> tuple[ModelRecord, bytes]:
    """The manifest as a record and the artifact's bytes, after checking they match; signed
    with ``signing_key`` when one is given."""
    artifact_path, manifest_path = directory / ARTIFACT, directory / MANIFEST
    try:
        if manifest_path.stat().st_size > MAX_MANIFEST_BYTES:
            raise ModelPublishError(f"{manifest_path}: larger than {MAX_MANIFEST_BYTES} bytes")
        manifest: Any = json.loads(manifest_path.read_text("utf-8"))
        if artifact_path.stat().st_size > MAX_ARTIFACT_BYTES:
            raise ModelPublishError(f"{artifact_path}: larger than {MAX_ARTIFACT_BYTES} bytes")
        artifact = artifact_path.read_bytes()
    except OSError as exc:
        raise ModelPublishError(f"{directory}: cannot read {exc.filename}: {exc.strerror}") from exc
    except (ValueError, RecursionError) as exc:
        raise ModelPublishError(f"{manifest_path}: not JSON: {exc}") from exc
    if not isinstance(manifest, dict):
        raise ModelPublishError(f"{manifest_path}: expected a JSON object")
    version = manifest.get("version")
    if isinstance(version, int) and not isinstance(version, bool):
        version = str(version)
    if not isinstance(version, str) or not VERSION_PATTERN.match(version):
        raise ModelPublishError(f"{manifest_path}: version must match {VERSION_PATTERN.pattern}")
    declared = manifest.get("sha256")
    if not isinstance(declared, str) or not SHA256_PATTERN.match(declared.lower()):
        raise ModelPublishError(f"{manifest_path}: sha256 must be 64 hex digits")
    actual = hashlib.sha256(artifact).hexdigest()
    if actual != declared.lower():
        raise ModelPublishError(
            f"{artifact_path}: sha256 {actual} does not match the manifest's {declared}"
        )
    if signing_key is not None:
        manifest = sign_manifest(manifest, signing_key)
    return ModelRecord(
        version=version, sha256=actual, size=len(artifact), manifest=manifest
    ), artifact


def write_manifest(directory: Path, manifest: dict[str, Any]) -> None:
    """Replace ``manifest.json`` atomically (temporary file, fsync, rename)."""
    target = directory / MANIFEST
    temporary = directory / f".{MANIFEST}.tmp-{os.getpid()}"
    try:
        with temporary.open("w", encoding="utf-8") as handle:
            json.dump(manifest, handle, indent=1, sort_keys=True)
            handle.write("\n")
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, target)
    except OSError as exc:
        temporary.unlink(missing_ok=True)
        raise ModelPublishError(f"{target}: cannot write: {exc.strerror}") from exc


def gate(directory: Path, version: str, current: str | None, *, force: bool) -> str:
    """Check the candidate's ``evaluation.json`` against the version the store serves now.

    Returns the reason to log. Refused (EvaluationGateError) unless ``force``: a missing or
    unreadable file, an evaluation of another candidate or against another current version,
    or ``beats_current`` not true. Nothing is promoted yet, or the version is the promoted one
    (published again): nothing to beat.
    """
    if current is None:
        return "first_model"
    if current == version:
        return "already_current"
    problem = _gate_problem(directory / EVALUATION, version, current)
    if problem is None:
        return "beats_current"
    if force:
        return f"forced: {problem}"
    raise EvaluationGateError(f"{problem}; publish with --force to override")


def _gate_problem(path: Path, version: str, current: str) -> str | None:
    try:
        if path.stat().st_size > MAX_EVALUATION_BYTES:
            return f"{path}: larger than {MAX_EVALUATION_BYTES} bytes"
        document: Any = json.loads(path.read_text("utf-8"))
    except FileNotFoundError:
        return f"{path} is missing: run `edge-models evaluate` on the candidate first"
    except OSError as exc:
        return f"{path}: cannot read: {exc.strerror}"
    except (ValueError, RecursionError) as exc:
        return f"{path}: not JSON: {exc}"
    if not isinstance(document, dict):
        return f"{path}: expected a JSON object"
    candidate, evaluated_against = document.get("candidate"), document.get("current")
    if not isinstance(candidate, dict) or str(candidate.get("version")) != version:
        return f"{path}: evaluates another candidate, not version {version}"
    if not isinstance(evaluated_against, dict) or str(evaluated_against.get("version")) != current:
        return f"{path}: not evaluated against the current version {current}"
    if document.get("beats_current") is not True:
        return (
            f"candidate {version} does not beat the current version {current}"
            f" (hit_rate@10 {candidate.get('hit_rate@10')} vs"
            f" {evaluated_against.get('hit_rate@10')}, snips {candidate.get('snips')} vs"
            f" {evaluated_against.get('snips')})"
        )
    return None
