"""Whether tests may skip for a missing service: never under EDGE_REQUIRE_SERVICES=1."""

from __future__ import annotations

import os
from typing import NoReturn

import pytest


def services_required() -> bool:
    return os.environ.get("EDGE_REQUIRE_SERVICES") == "1"


def missing_service(reason: str) -> NoReturn:
    """Skip the test with ``reason``, or fail it when services are required (CI)."""
    if services_required():
        pytest.fail(f"required service missing (EDGE_REQUIRE_SERVICES=1): {reason}")
    pytest.skip(reason)
