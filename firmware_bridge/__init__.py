"""The serial firmware protocol: codec, serial source, device simulator.

Modules, each one concern: ``codec`` (frames: COBS, header, CRC-32; pure), ``messages``
(payload layouts; pure), ``link`` (the agent's session logic, sans-IO), ``serial_source``
(the asyncio source over pyserial-asyncio-fast), ``sim_device`` and ``sim`` (``firmware-sim``),
``vectors`` (test vectors shared with the C codec in ``c/``). The spec is PROTOCOL.md.
"""
