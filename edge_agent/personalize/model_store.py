"""Model directories on disk and the pointer to the one in use (shared by agent and CLI).

Layout under ``<data_dir>/models/``::

    incoming/<any name>/     drop a complete model directory here (or the uploader calls
                             Personalizer.offer_model); it is verified, then moved away
    installed/<version>/     verified models: the current one and the previous one
    rejected/<name>-<unix>/  what failed verification, kept for a person to look at
    current                  JSON {"current": dir, "previous": dir|null, "reason", "updated_at"}

The ``current`` file is the only state: without it the agent uses ``[model] path`` (or the
bundled model). ``edge-agent model rollback`` swaps current and previous in that file; a
running agent sees the change within ``watch_interval_s`` and switches after verifying, a
stopped one uses it at its next start. Every write is atomic (temporary file, fsync, rename).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from edge_agent.errors import EdgeAgentError

log = logging.getLogger(__name__)

STATE_FILE = "current"


class ModelStoreError(EdgeAgentError):
    """A model store operation that cannot be done (nothing to roll back to, bad state)."""


@dataclass(frozen=True)
class ModelState:
    current: str
    previous: str | None
    reason: str  # "update", "rollback"
    updated_at: float


class ModelStore:
    def __init__(self, data_dir: Path, configured: Path) -> None:
        self.root = data_dir / "models"
        self.incoming = self.root / "incoming"
        self.installed = self.root / "installed"
        self.rejected = self.root / "rejected"
        self.state_path = self.root / STATE_FILE
        self.configured = configured

    def ensure_dirs(self) -> None:
        for directory in (self.incoming, self.installed, self.rejected):
            directory.mkdir(parents=True, exist_ok=True)

    # ---- the pointer ---------------------------------------------------------------

    def read_state(self) -> ModelState | None:
        try:
            document: Any = json.loads(self.state_path.read_text("utf-8"))
            return ModelState(
                current=str(document["current"]),
                previous=None if document.get("previous") is None else str(document["previous"]),
                reason=str(document.get("reason", "")),
                updated_at=float(document.get("updated_at", 0.0)),
            )
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.warning("model.state.unreadable path=%s error=%r", self.state_path, exc)
            return None

    def state_signature(self) -> tuple[int, int] | None:
        try:
            stat = self.state_path.stat()
        except FileNotFoundError:
            return None
        return (stat.st_mtime_ns, stat.st_size)

    def active_dir(self) -> tuple[Path, str]:
        """The directory to use and why: ("state" | "config" | "bundled")."""
        state = self.read_state()
        if state is not None and Path(state.current).is_dir():
            return Path(state.current), "state"
        if state is not None:
            log.warning("model.state.missing_dir current=%s using=configured", state.current)
        return self.configured, "config"

    def record_switch(self, new_dir: Path, old_dir: Path | None, reason: str) -> ModelState:
        state = ModelState(
            current=str(new_dir),
            previous=None if old_dir is None else str(old_dir),
            reason=reason,
            updated_at=round(time.time(), 3),
        )
        self._write_state(state)
        return state

    def rollback(self) -> ModelState:
        """Swap current and previous in the pointer file (what ``edge-agent model rollback``
        does); the running agent follows."""
        state = self.read_state()
        if state is None or state.previous is None:
            raise ModelStoreError(f"no previous model to roll back to ({self.state_path})")
        if not Path(state.previous).is_dir():
            raise ModelStoreError(f"the previous model directory is gone: {state.previous}")
        return self.record_switch(Path(state.previous), Path(state.current), "rollback")

    def _write_state(self, state: ModelState) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        temporary = self.state_path.with_name(f".{STATE_FILE}.{os.getpid()}.tmp")
        with temporary.open("w", encoding="utf-8") as handle:
            json.dump(asdict(state), handle)
            handle.flush()
            os.fsync(handle.fileno())
        temporary.replace(self.state_path)
        _fsync_dir(self.root)

    # ---- the directories -----------------------------------------------------------

    def incoming_ready(self, settle_s: float) -> list[Path]:
        """Incoming directories nobody has written to for ``settle_s`` (a copy in progress
        is left alone; a move into incoming/ is ready at once)."""
        if not self.incoming.is_dir():
            return []
        ready = []
        now = time.time()
        for candidate in sorted(self.incoming.iterdir()):
            if not candidate.is_dir() or candidate.name.startswith("."):
                continue
            newest = max(
                (entry.stat().st_mtime for entry in (candidate, *candidate.iterdir())),
                default=now,
            )
            if now - newest >= settle_s:
                ready.append(candidate)
        return ready

    def install(self, source: Path, version: str) -> Path:
        """Put a verified model under installed/; moved when it came through incoming/."""
        self.ensure_dirs()
        target = self.installed / _safe_name(version)
        if target.exists():
            target = self.installed / f"{_safe_name(version)}-{int(time.time())}"
        if source.resolve().parent == self.incoming.resolve():
            source.rename(target)
        else:  # someone else's directory (the uploader's download): copy, then rename
            staging = self.installed / f".{target.name}.tmp"
            shutil.rmtree(staging, ignore_errors=True)
            shutil.copytree(source, staging)
            staging.rename(target)
        _fsync_dir(self.installed)
        return target

    def reject(self, source: Path) -> Path | None:
        """Move a refused incoming directory aside; others' directories are left alone."""
        if source.resolve().parent != self.incoming.resolve():
            return None
        self.ensure_dirs()
        target = self.rejected / f"{source.name}-{int(time.time())}"
        source.rename(target)
        return target

    def prune(self, keep: set[Path]) -> list[Path]:
        """Remove installed models other than ``keep`` (current and previous)."""
        kept = {path.resolve() for path in keep}
        removed: list[Path] = []
        if not self.installed.is_dir():
            return removed
        for candidate in self.installed.iterdir():
            if candidate.is_dir() and candidate.resolve() not in kept:
                shutil.rmtree(candidate, ignore_errors=True)
                removed.append(candidate)
        return removed


def _safe_name(version: str) -> str:
    cleaned = "".join(c if c.isalnum() or c in "._-" else "_" for c in version)
    return cleaned.strip(".")[:100] or "model"


def _fsync_dir(directory: Path) -> None:
    # The rename is durable only once the directory entry is: a power cut must not undo it.
    with contextlib.suppress(OSError):
        descriptor = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)
