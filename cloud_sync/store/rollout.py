"""Staged model rollout: which version each store is served, and how that changes.

One promoted (``current``) version serves every store, except that a canary version may
serve a deterministic share of stores: a store is in the canary when the first 8 hex digits
of sha256(store_id), as a number, modulo 100 are below the canary's percent. The same store
always lands on the same side, whichever instance answers, and raising the percent only
adds stores. Pure functions here; the backends keep the state and a log of every change.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Final

from cloud_sync.store.errors import RolloutError
from cloud_sync.store.records import RolloutEntry, RolloutState

PUBLISH: Final = "publish"
CANARY: Final = "canary"
PROMOTE: Final = "promote"
ROLLBACK: Final = "rollback"
AUTO_ROLLBACK: Final = "auto_rollback"
EMPTY: Final = RolloutState(None, None, 0, None)


@dataclass(frozen=True, slots=True)
class Change:
    """A rollout change to apply and to log."""

    state: RolloutState
    action: str
    version: str
    percent: int | None = None
    reason: str = ""


# Decides a change from the state and the log, inside the backend's transaction.
RolloutDecision = Callable[[RolloutState, list[RolloutEntry]], Change]


def bucket(store_id: str) -> int:
    """0..99, fixed per store id."""
    return int(hashlib.sha256(store_id.encode("utf-8")).hexdigest()[:8], 16) % 100


def version_for(state: RolloutState, store_id: str | None) -> str | None:
    """The version a store is served (admins and unknown stores get the promoted one)."""
    if (
        state.canary_version is not None
        and store_id is not None
        and bucket(store_id) < state.canary_percent
    ):
        return state.canary_version
    return state.current_version


def published(state: RolloutState, version: str, canary: int | None, now: datetime) -> Change:
    """A newly published version: promoted at once, or a canary for ``canary`` percent."""
    if canary is not None and not 0 < canary < 100:
        raise RolloutError(f"--canary must be within 1..99 percent, got {canary}")
    if canary is None or state.current_version is None or state.current_version == version:
        # Nothing to compare with (first model) or no canary asked: the version is promoted.
        return Change(RolloutState(version, None, 0, None), PUBLISH, version)
    since = now if state.canary_version != version else state.canary_since
    return Change(
        RolloutState(state.current_version, version, canary, since), CANARY, version, canary
    )


def promoted(state: RolloutState, version: str) -> Change:
    """``model promote VERSION``: every store gets it; a running canary ends."""
    return Change(RolloutState(version, None, 0, None), PROMOTE, version)


def rolled_back(
    state: RolloutState,
    version: str,
    previous: str | None,
    *,
    action: str = ROLLBACK,
    reason: str = "",
) -> Change:
    """``model rollback VERSION``: stop serving it. A canary ends (its stores return to the
    promoted version); a promoted version gives way to ``previous`` (the one promoted
    before it), with any canary ended too."""
    if state.canary_version == version:
        return Change(
            RolloutState(state.current_version, None, 0, None), action, version, reason=reason
        )
    if state.current_version == version:
        if previous is None:
            raise RolloutError(
                f"{version} is the only version ever promoted; nothing to go back to"
            )
        return Change(RolloutState(previous, None, 0, None), action, version, reason=reason)
    raise RolloutError(
        f"{version} is not being served"
        f" (current {state.current_version}, canary {state.canary_version})"
    )


def previous_promoted(log: list[RolloutEntry], current: str | None) -> str | None:
    """The version promoted before ``current`` and not rolled back since (log oldest first)."""
    stack: list[str] = []
    for entry in log:
        if entry.action in (PUBLISH, PROMOTE):
            if stack and stack[-1] == entry.version:
                continue
            if entry.version in stack:
                stack.remove(entry.version)  # promoted again: it moves to the top
            stack.append(entry.version)
        elif entry.action in (ROLLBACK, AUTO_ROLLBACK) and stack and stack[-1] == entry.version:
            stack.pop()
    if len(stack) >= 2 and stack[-1] == current:
        return stack[-2]
    return None
