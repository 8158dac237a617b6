"""The display sink: suggestions shown on serial devices (``component.DisplaySink``).

A serial port's device is known once it said HELLO; a suggestion for a trigger from that
device goes back to it as a COMMAND, through the serial source that owns the port.
"""

from __future__ import annotations

from collections.abc import Sequence

from firmware_bridge.messages import ShowSuggestion
from firmware_bridge.serial_source import SerialSource, UnknownDeviceError


class SerialDisplays:
    def __init__(self, sources: Sequence[SerialSource]) -> None:
        self._sources = tuple(sources)

    def serves(self, device_id: str) -> bool:
        return any(source.device_id == device_id for source in self._sources)

    async def show(self, device_id: str, message: ShowSuggestion, ttl_s: float) -> object:
        for source in self._sources:
            if source.device_id == device_id:
                return await source.send_command(device_id, message, ttl_s=ttl_s)
        raise UnknownDeviceError(f"no serial display with device id {device_id!r}")
