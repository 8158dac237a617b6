"""The model in use, and how it changes: verify in the background, swap atomically.

A candidate (dropped in ``models/incoming/``, offered by the uploader, or named by the
``current`` pointer after a rollback) is loaded on a loader thread of its own, never on the
inference thread, so suggestions keep flowing meanwhile. A model that arrives (offered by
the uploader or dropped in ``incoming/``) must first carry a valid ed25519 signature by a key
of ``[model] public_key`` when one is configured (``cloud_sync.model_signature``); then
``SuggestionModel.load`` checks the manifest, the sha256 and the golden requests, on the
runtime ``[model] runtime`` asks for (numpy, onnxruntime, or auto). Installed
models were checked on arrival; the bundled one and ``[model] path`` are the operator's.
Only then does ``current`` change, by one reference assignment that the inference thread
reads once per request: a request runs entirely on the old model or entirely on the new
one. A refused candidate leaves the old model in place. The previous model stays loaded,
so a rollback to it is instant.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from cloud_sync.model_signature import ModelSignatureError, verify_manifest
from edge_agent.component import ModelAnswer
from edge_agent.personalize.exploration import Catalogue
from edge_agent.personalize.model_store import ModelStore
from models import DEFAULT_MODEL_DIR, ModelError, SuggestionModel
from models.serving import Runtime

log = logging.getLogger(__name__)

INCOMING_SETTLE_S = 1.0  # an incoming directory untouched this long is complete
MANIFEST_NAME: Final = "manifest.json"
MAX_MANIFEST_BYTES: Final = 64 * 1024 * 1024  # a manifest beyond this is hostile, not a model


@dataclass(frozen=True)
class LoadedModel:
    model: SuggestionModel
    catalogue: Catalogue
    directory: Path
    origin: str  # "bundled", "config", "state", "update", "rollback"
    loaded_at: float


class ModelSlot:
    def __init__(
        self, store: ModelStore, public_keys: Sequence[bytes] = (), *, runtime: Runtime = "auto"
    ) -> None:
        self.store = store
        self.public_keys = tuple(public_keys)
        self.runtime: Runtime = runtime  # asked for; each loaded model says what it runs on
        self.current: LoadedModel | None = None  # read by the inference thread
        self.previous: LoadedModel | None = None
        self.refused = 0
        self.swaps = 0
        self.last_error: str | None = None
        self._loader = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="model-loader")
        self._lock = asyncio.Lock()  # one change at a time
        self._state_signature: tuple[int, int] | None = None

    async def start(self) -> None:
        """Load the model in use at start; without one, suggestions come from the fallbacks."""
        await asyncio.to_thread(self.store.ensure_dirs)
        directory, origin = self.store.active_dir()
        if origin == "config" and directory.resolve() == DEFAULT_MODEL_DIR.resolve():
            origin = "bundled"
        self._state_signature = self.store.state_signature()
        loaded = await self._load(directory, origin)
        if loaded is None and origin == "state":
            loaded = await self._load(self.store.configured, "config")
        self.current = loaded
        if loaded is None:
            log.error("model.unavailable using=fallbacks path=%s", directory)

    def close(self) -> None:
        self._loader.shutdown(wait=False, cancel_futures=True)

    async def offer_model(self, path: Path) -> ModelAnswer:
        """Verify a new model directory and switch to it; refuse it and keep the old one
        when it does not verify. Safe to call from any task on the agent's loop."""
        async with self._lock:
            signed = await asyncio.to_thread(self._check_signature, path)
            loaded = await self._load(path, "update") if signed else None
            if loaded is None:
                self.refused += 1
                try:
                    moved = await asyncio.to_thread(self.store.reject, path)
                except OSError as exc:  # refused all the same; it may be offered again
                    moved = None
                    log.warning("model.reject.move_failed path=%s error=%r", path, exc)
                log.error("model.refused path=%s moved_to=%s", path, moved)
                return ModelAnswer(False, None, self.last_error or "refused")
            version = loaded.model.version
            try:
                target = await asyncio.to_thread(self.store.install, path, version)
            except OSError as exc:
                self.refused += 1
                self.last_error = f"cannot install {path}: {exc!r}"
                log.error("model.install.failed path=%s error=%r", path, exc)  # noqa: TRY400
                return ModelAnswer(False, version, self.last_error)
            installed = LoadedModel(
                loaded.model, loaded.catalogue, target, "update", loaded.loaded_at
            )
            await self._switch(installed, "update")
            return ModelAnswer(True, version, f"installed at {target}")

    async def follow_state(self) -> None:
        """Switch when the pointer file names another directory (a rollback by the CLI)."""
        signature = self.store.state_signature()
        if signature == self._state_signature:
            return
        self._state_signature = signature
        state = await asyncio.to_thread(self.store.read_state)
        if state is None:
            return
        target = Path(state.current)
        async with self._lock:
            if self.current is not None and _same(self.current.directory, target):
                return
            if self.previous is not None and _same(self.previous.directory, target):
                loaded: LoadedModel | None = self.previous  # still in memory: instant
            else:
                loaded = await self._load(target, state.reason or "state")
            if loaded is None:
                self.refused += 1
                log.error("model.state.refused current=%s keeping=%s", target, self.version)
                return
            await self._switch(loaded, state.reason or "state", write_state=False)

    async def watch_incoming(self) -> list[ModelAnswer]:
        ready = await asyncio.to_thread(self.store.incoming_ready, INCOMING_SETTLE_S)
        return [await self.offer_model(path) for path in ready]

    @property
    def version(self) -> str | None:
        current = self.current
        return current.model.version if current is not None else None

    def status(self) -> dict[str, Any]:
        current, previous = self.current, self.previous
        return {
            "version": current.model.version if current else None,
            "path": str(current.directory) if current else None,
            "origin": current.origin if current else None,
            "loaded_at": round(current.loaded_at, 3) if current else None,
            "runtime": current.model.runtime if current else None,  # "numpy" | "onnxruntime"
            "previous_version": previous.model.version if previous else None,
            "swaps": self.swaps,
            "refused": self.refused,
            "last_error": self.last_error,
        }

    async def _switch(self, loaded: LoadedModel, reason: str, write_state: bool = True) -> None:
        old = self.current
        if write_state:
            await asyncio.to_thread(
                self.store.record_switch,
                loaded.directory,
                old.directory if old else None,
                reason,
            )
            self._state_signature = self.store.state_signature()
        self.current = loaded  # the swap: one reference, read once per request
        self.previous = old
        self.swaps += 1
        keep = {loaded.directory} | ({old.directory} if old else set())
        await asyncio.to_thread(self.store.prune, keep)
        log.info(
            "model.swapped version=%s previous=%s reason=%s",
            loaded.model.version,
            old.model.version if old else None,
            reason,
        )

    def _check_signature(self, directory: Path) -> bool:
        """True when no key is configured or the manifest is signed by one (on a thread)."""
        if not self.public_keys:
            return True
        try:
            signer = verify_manifest(_read_manifest(directory), self.public_keys)
        except ModelSignatureError as exc:
            self.last_error = f"signature {exc}"
        else:
            log.info("model.signature.ok path=%s key_id=%s", directory, signer)
            return True
        log.error("model.signature.refused path=%s error=%s", directory, self.last_error)
        return False

    async def _load(self, directory: Path, origin: str) -> LoadedModel | None:
        loop = asyncio.get_running_loop()
        try:
            model = await loop.run_in_executor(
                self._loader,
                functools.partial(SuggestionModel.load, directory, runtime=self.runtime),
            )
        except ModelError as exc:
            self.last_error = f"{type(exc).__name__}: {exc}"
            log.error("model.load.failed path=%s error=%s", directory, self.last_error)  # noqa: TRY400
            return None
        except OSError as exc:
            self.last_error = f"cannot read {directory}: {exc!r}"
            log.error("model.load.failed path=%s error=%s", directory, self.last_error)  # noqa: TRY400
            return None
        return LoadedModel(model, Catalogue.of(model.items), directory, origin, time.time())


def _read_manifest(directory: Path) -> Any:
    """The manifest document, read with a size cap; a problem is a ModelSignatureError."""
    path = directory / MANIFEST_NAME
    try:
        with path.open("rb") as handle:
            text = handle.read(MAX_MANIFEST_BYTES + 1)
    except OSError as exc:
        raise ModelSignatureError("bad_manifest", f"cannot read {path}: {exc!r}") from exc
    if len(text) > MAX_MANIFEST_BYTES:
        raise ModelSignatureError("bad_manifest", f"larger than {MAX_MANIFEST_BYTES} bytes")
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise ModelSignatureError("bad_manifest", f"{path} is not JSON: {exc!r}") from exc


def _same(left: Path, right: Path) -> bool:
    try:
        return left.resolve() == right.resolve()
    except OSError:
        return False
