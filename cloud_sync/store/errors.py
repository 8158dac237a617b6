"""The central store's exceptions: a small hierarchy, each message carrying its context."""

from __future__ import annotations


class StoreError(Exception):
    """Base of every error the central store raises on purpose."""


class MissingExtraError(StoreError):
    """A package of an optional extra is not installed; the message says how to add it."""

    def __init__(self, package: str, extra: str) -> None:
        super().__init__(f"{package} is not installed: pip install 'edge-agent[{extra}]'")
        self.package = package
        self.extra = extra


class DatabaseUrlError(StoreError):
    """A ``--db`` URL names no backend the store knows."""

    def __init__(self, url: str, problem: str) -> None:
        super().__init__(f"database url {url!r}: {problem}")
        self.url = url


class BackendError(StoreError):
    """The database failed (unreachable, broken, locked too long); the request may be retried."""

    def __init__(self, operation: str, detail: str) -> None:
        super().__init__(f"backend {operation}: {detail}")
        self.operation = operation


class ModelPublishError(StoreError):
    """A model directory cannot be published (missing file, bad manifest, sha256 mismatch)."""


class BadRequestError(StoreError):
    """A request body the store refuses as a whole; carries the HTTP status and a reason."""

    def __init__(self, status: int, reason: str, detail: str = "") -> None:
        super().__init__(f"{status} {reason}: {detail}" if detail else f"{status} {reason}")
        self.status = status
        self.reason = reason
        self.detail = detail


class AuditError(StoreError):
    """An audit action does not apply (unknown change, or not in a state it can leave)."""


class RolloutError(StoreError):
    """A rollout change does not apply (unknown version, nothing to roll back to, bad share)."""


class EvaluationGateError(StoreError):
    """A candidate model does not show that it beats the current one (``evaluation.json``)."""
