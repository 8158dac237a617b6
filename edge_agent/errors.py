"""The agent's exceptions: a small hierarchy, each message carrying its context."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


class EdgeAgentError(Exception):
    """Base of every error the agent raises on purpose."""


class ConfigError(EdgeAgentError):
    """The configuration is invalid; the message names the key."""

    def __init__(self, key: str, problem: str) -> None:
        super().__init__(f"config: {key}: {problem}")
        self.key = key
        self.problem = problem


@dataclass(frozen=True)
class ConfigProblem:
    """One thing wrong with the configuration, and where it was set."""

    key: str  # dotted: mqtt.port, serial.ports[0].url
    problem: str
    origin: str = ""  # "/etc/edge-agent/agent.toml:4", "environment EDGE_AGENT__MQTT__PORT", ...

    def __str__(self) -> str:
        where = f"{self.origin}: " if self.origin else ""
        return f"{where}{self.key}: {self.problem}"


class ConfigProblemsError(ConfigError):
    """Every problem the loader found at once; ``key`` and ``problem`` are the first's."""

    def __init__(self, problems: Sequence[ConfigProblem]) -> None:
        first = problems[0]
        super().__init__(first.key, first.problem)
        self.problems = tuple(problems)
        self.origin = first.origin

    def __str__(self) -> str:
        if len(self.problems) == 1:
            return f"config: {self.problems[0]}"
        listed = "\n".join(f"  {problem}" for problem in self.problems)
        return f"config: {len(self.problems)} problems:\n{listed}"


class HttpPortInUseError(ConfigError):
    """``edge-agent run``: the status port (``http.port``) is taken by another process."""

    def __init__(self, host: str, port: int) -> None:
        super().__init__(
            "http.port",
            f"{host}:{port} is already in use by another process (another agent or demo?);"
            " stop it or set another [http] port",
        )
        self.port = port


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


class MissingExtraError(EdgeAgentError):
    """A package of an optional extra is not installed; the message says how to add it."""

    def __init__(self, package: str, extra: str) -> None:
        super().__init__(f"{package} is not installed: pip install 'edge-agent[{extra}]'")
        self.package = package
        self.extra = extra


class DemoError(EdgeAgentError):
    """``edge-agent demo`` cannot start or run (a part of it failed); the message says which."""


class PortInUseError(DemoError):
    """A port the demo must listen on is taken by another process."""

    def __init__(self, what: str, host: str, port: int) -> None:
        super().__init__(
            f"{what} port {host}:{port} is already in use (another demo or agent running?);"
            " choose another with --http-port PORT, or --http-port 0 for any free port"
        )
        self.port = port


class DemoInterruptedError(DemoError):
    """A signal (Ctrl-C, SIGTERM) ended the demo before it was running, or forced its stop."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"interrupted by signal {signum} before the demo was running")
        self.signum = signum
