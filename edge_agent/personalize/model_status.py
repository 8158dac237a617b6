"""``edge-agent model status``: what the model store holds, read from disk only.

It does not ask the running agent (``edge-agent status`` does, under ``model``): this works
on a stopped agent too, e.g. before a rollback. The model files are not hashed here (that is
the agent's job when it loads them); versions come from the manifests.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from edge_agent.personalize.model_store import ModelStore


def describe(store: ModelStore) -> dict[str, Any]:
    state = store.read_state()
    active, origin = store.active_dir()
    return {
        "current": _describe_dir(active) | {"chosen_by": origin},
        "previous": _describe_dir(Path(state.previous)) if state and state.previous else None,
        "pointer": None
        if state is None
        else {
            "path": str(store.state_path),
            "reason": state.reason,
            "updated_at": state.updated_at,
        },
        "configured": str(store.configured),
        "installed": _names(store.installed),
        "incoming": _names(store.incoming),
        "rejected": _names(store.rejected),
        "rollback_possible": bool(state and state.previous and Path(state.previous).is_dir()),
    }


def _describe_dir(directory: Path) -> dict[str, Any]:
    try:
        manifest = json.loads((directory / "manifest.json").read_text("utf-8"))
    except (OSError, ValueError, RecursionError) as exc:
        return {"path": str(directory), "version": None, "problem": repr(exc)[:300]}
    if not isinstance(manifest, dict):
        return {"path": str(directory), "version": None, "problem": "manifest is not an object"}
    items = manifest.get("items")

    def text(name: str) -> str | None:  # whatever the file holds, the report shows text
        value = manifest.get(name)
        return value[:200] if isinstance(value, str) else None

    return {
        "path": str(directory),
        "version": text("version"),
        "created_at": text("created_at"),
        "sha256": text("sha256"),
        "items": len(items) if isinstance(items, list) else None,
    }


def _names(directory: Path) -> list[str]:
    if not directory.is_dir():
        return []
    return sorted(entry.name for entry in directory.iterdir() if not entry.name.startswith("."))
