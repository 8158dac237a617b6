"""The agent's runtime loads a model without importing ``onnx`` (issue 11: memory)."""

from __future__ import annotations

import subprocess
import sys

# Import what a running agent imports, load and call the bundled model, then report which
# of the build-time packages came along.
_PROBE = """
import sys
import edge_agent.app, edge_agent.cli, edge_agent.personalize.personalizer
from models import DEFAULT_MODEL_DIR, SuggestionContext, SuggestionModel
model = SuggestionModel.load(DEFAULT_MODEL_DIR)
print(sorted(name for name in ("onnx", "matplotlib") if name in sys.modules))
"""


def test_the_runtime_loads_the_model_without_importing_onnx() -> None:
    answer = subprocess.run(
        [sys.executable, "-c", _PROBE], capture_output=True, text=True, timeout=120, check=True
    )
    assert answer.stdout.strip().splitlines()[-1] == "[]"
