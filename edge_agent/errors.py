"""The agent's exceptions: a small hierarchy, each message carrying its context."""

from __future__ import annotations


class EdgeAgentError(Exception):
    """Base of every error the agent raises on purpose."""


class ConfigError(EdgeAgentError):
    """The configuration is invalid; the message names the key."""

    def __init__(self, key: str, problem: str) -> None:
        super().__init__(f"config: {key}: {problem}")
        self.key = key
        self.problem = problem


class DecodeError(EdgeAgentError):
    """Input could not be decoded; carries the quarantine reason."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


class StorageError(EdgeAgentError):
    """The local buffer failed in a way the agent cannot handle by itself."""


class StorageUnavailableError(StorageError):
    """The buffer cannot be opened or written for now (disk full, locked); retried."""


class SyncError(EdgeAgentError):
    """The central store could not be reached or refused a batch."""
