"""The interface of the parts that run beside the pipeline, and the ports they are given.

A component (the personalizer, the uploader) never receives the whole agent: the wiring
(``app``) builds one ``Ports`` and hands it to each component's ``run``. What a component
needs from another part is a port here (publish a suggestion, show one on a serial display,
hear of a new model or an erased customer), never a lookup by type or by name, so a
component can be built, run and tested against any implementation of its ports.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    from edge_agent.buffer import Buffer
    from edge_agent.governance import ConsentLedger
    from edge_agent.personalize.profile_merge import CentralProfile
    from edge_agent.pipeline import Pipeline
    from firmware_bridge.messages import ShowSuggestion


@dataclass(frozen=True)
class ModelAnswer:
    """A model listener's answer to an offered model directory."""

    accepted: bool
    version: str | None
    detail: str


# A verified model directory offered to whoever serves models; called on the event loop.
ModelListener = Callable[[Path], Awaitable[ModelAnswer]]
# Told of each erased clear customer id, to drop what it holds about them in memory.
ErasureListener = Callable[[str], None]


class SuggestionPublisher(Protocol):
    """Sends a suggestion message (MQTT). Safe to call from the inference thread."""

    def publish(
        self, topic: str, payload: bytes | str, qos: int = 0, retain: bool = False
    ) -> None: ...


class DisplaySink(Protocol):
    """Serial displays: show a suggestion on the device whose trigger asked for it."""

    def serves(self, device_id: str) -> bool:
        """Whether a display with this device id is attached (on the loop, no I/O)."""
        ...

    async def show(self, device_id: str, message: ShowSuggestion, ttl_s: float) -> object:
        """Send the command; raises ``UnknownDeviceError`` for a device never seen."""
        ...


class ProfileLookup(Protocol):
    """The customer's central profile, as far as it has arrived (``personalize.profiles``)."""

    def lookup(self, customer_id: str) -> CentralProfile | None:
        """The cached profile or None, on the loop, without waiting; may queue a fetch."""
        ...


class StatusReader(Protocol):
    """The agent's own figures as ``/status`` shows them (the heartbeat reports them)."""

    async def snapshot(self) -> dict[str, Any]: ...

    def not_ready(self) -> list[str]:
        """Why ``/readyz`` would answer 503 now (empty when ready)."""
        ...


@dataclass
class Ports:
    """What the wiring hands every component."""

    buffer: Buffer  # typed operations only (``edge_agent.buffer.operations``)
    pipeline: Pipeline  # taps, observers, ``emit`` and ``record``
    consent: ConsentLedger  # the consent in force (governance), kept by the pipeline
    suggestions: SuggestionPublisher | None = None  # None: no MQTT (serial only, tests)
    displays: DisplaySink | None = None
    status: StatusReader | None = None  # the status board (None in tests without one)
    # Filled by the components themselves at the start of ``run`` (before any await).
    profiles: ProfileLookup | None = None  # the central profiles (sync on, [profiles] enabled)
    model_listeners: list[ModelListener] = field(default_factory=list)
    erasure_listeners: list[ErasureListener] = field(default_factory=list)


class Component(Protocol):
    """A part that runs beside the pipeline: started after the buffer opens and before the
    sources, stopped (cancelled) after the sources."""

    name: str

    def status(self) -> dict[str, dict[str, Any]]:
        """Sections for /status, e.g. {"sync": {...}}; called on the event loop."""
        ...

    async def run(self, ports: Ports) -> None:
        """Attach to the ports (taps, observers, listeners) and run until cancelled."""
        ...


@runtime_checkable
class Serving(Protocol):
    """A component with work of its own in flight (the personalizer's suggestions): at
    stop, the suggestions' MQTT connection stays open until it is done (bounded)."""

    def busy(self) -> bool:
        """True while something it accepted has not gone out yet."""
        ...
