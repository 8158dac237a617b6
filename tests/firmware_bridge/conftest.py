"""Fixtures for the serial tests; the helpers live in bridge_helpers.py."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from tests.firmware_bridge.bridge_helpers import SimLauncher


@pytest.fixture
async def sims() -> AsyncIterator[SimLauncher]:
    launcher = SimLauncher()
    yield launcher
    await launcher.kill_all()
