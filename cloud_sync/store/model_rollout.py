"""Rollout operations shared by the CLI and the server: publish, promote, roll back, check.

Every change goes through ``Backend.update_rollout`` (one transaction, logged with who decided
it). The automatic check compares the canary with the promoted version since the canary
started (``acceptance.judge``) and rolls a clearly worse canary back, logged as ``auto_rollback``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from cloud_sync.store import acceptance, rollout
from cloud_sync.store.backend import Backend
from cloud_sync.store.errors import RolloutError
from cloud_sync.store.model_publish import gate
from cloud_sync.store.records import ModelRecord, RolloutEntry, RolloutState

log = logging.getLogger(__name__)


async def publish(
    backend: Backend,
    directory: Path,
    record: ModelRecord,
    artifact: bytes,
    *,
    canary: int | None,
    force: bool,
    decided_by: str,
    now: datetime,
) -> tuple[bool, RolloutEntry]:
    """Gate, store and start serving a version (promoted, or as a canary)."""
    state = await backend.rollout()
    reason = gate(directory, record.version, state.current_version, force=force)
    created = await backend.publish_model(record, artifact, now)

    def decide(state: RolloutState, _: list[RolloutEntry]) -> rollout.Change:
        change = rollout.published(state, record.version, canary, now)
        return rollout.Change(change.state, change.action, change.version, change.percent, reason)

    entry = await backend.update_rollout(decide, decided_by, now)
    log.info(
        "store.model.published version=%s action=%s percent=%s reason=%s",
        record.version,
        entry.action,
        entry.percent,
        reason,
    )
    return created, entry


async def promote(backend: Backend, version: str, decided_by: str, now: datetime) -> RolloutEntry:
    if await backend.model_record(version) is None:
        raise RolloutError(f"no published model version {version!r}")
    entry = await backend.update_rollout(
        lambda state, _: rollout.promoted(state, version), decided_by, now
    )
    log.info("store.model.promoted version=%s by=%s", version, decided_by)
    return entry


async def roll_back(
    backend: Backend,
    version: str,
    decided_by: str,
    now: datetime,
    *,
    action: str = rollout.ROLLBACK,
    reason: str = "",
) -> RolloutEntry:
    def decide(state: RolloutState, history: list[RolloutEntry]) -> rollout.Change:
        previous = rollout.previous_promoted(history, state.current_version)
        return rollout.rolled_back(state, version, previous, action=action, reason=reason)

    entry = await backend.update_rollout(decide, decided_by, now)
    log.warning(
        "store.model.rolled_back version=%s action=%s by=%s reason=%s",
        version,
        action,
        decided_by,
        reason,
    )
    return entry


@dataclass(frozen=True, slots=True)
class CheckResult:
    state: RolloutState
    canary: acceptance.Performance | None
    control: acceptance.Performance | None
    verdict: acceptance.Verdict | None
    entry: RolloutEntry | None

    def as_json(self) -> dict[str, Any]:
        return {
            "current_version": self.state.current_version,
            "canary_version": self.state.canary_version,
            "canary_percent": self.state.canary_percent,
            "canary": None if self.canary is None else self.canary.as_json(),
            "control": None if self.control is None else self.control.as_json(),
            "verdict": None if self.verdict is None else self.verdict.as_json(),
            "rolled_back": self.entry is not None,
        }


async def check(backend: Backend, min_shown: int, decided_by: str, now: datetime) -> CheckResult:
    """Judge a running canary against the control; roll it back when clearly worse."""
    state = await backend.rollout()
    if state.canary_version is None or state.current_version is None:
        return CheckResult(state, None, None, None, None)
    since = state.canary_since
    canary = await backend.shown_performance(state.canary_version, since)
    control = await backend.shown_performance(state.current_version, since)
    verdict = acceptance.judge(canary, control, min_shown)
    entry = None
    if verdict.roll_back:
        canary_version = state.canary_version

        def decide(now_state: RolloutState, _: list[RolloutEntry]) -> rollout.Change:
            if now_state.canary_version != canary_version:
                raise RolloutError(f"canary {canary_version} changed while it was judged")
            return rollout.rolled_back(
                now_state, canary_version, None, action=rollout.AUTO_ROLLBACK, reason=verdict.reason
            )

        entry = await backend.update_rollout(decide, decided_by, now)
        log.warning(
            "store.model.auto_rollback version=%s control=%s reason=%s",
            canary_version,
            state.current_version,
            verdict.reason,
        )
    return CheckResult(state, canary, control, verdict, entry)
