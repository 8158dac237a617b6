"""The agent's runtime loads a model without importing ``onnx`` (issue 11: memory), and on the
numpy runtime without importing ``onnxruntime`` either."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

# Import what a running agent imports, load and call the bundled model, then report which
# of the heavy packages came along.
_PROBE = """
import json, sys
import edge_agent.app, edge_agent.cli, edge_agent.personalize.personalizer
from models import DEFAULT_MODEL_DIR, SuggestionContext, SuggestionModel
model = SuggestionModel.load(DEFAULT_MODEL_DIR, runtime=sys.argv[1])
answer = model.suggest([(model.items[0], "product.pickup", 1.0)], SuggestionContext(9, "s", None))
loaded = sorted(name for name in ("onnx", "matplotlib", "onnxruntime") if name in sys.modules)
print(json.dumps({"runtime": model.runtime, "loaded": loaded, "answers": len(answer)}))
"""


@pytest.mark.parametrize(
    ("runtime", "expected_runtime", "expected_loaded"),
    [
        ("auto", "numpy", []),
        ("numpy", "numpy", []),
        ("onnxruntime", "onnxruntime", ["onnxruntime"]),  # the probe can see the module
    ],
)
def test_the_runtime_loads_the_model_without_importing_what_it_does_not_use(
    runtime: str, expected_runtime: str, expected_loaded: list[str]
) -> None:
    answer = subprocess.run(
        [sys.executable, "-c", _PROBE, runtime],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    report = json.loads(answer.stdout.strip().splitlines()[-1])
    assert report == {"runtime": expected_runtime, "loaded": expected_loaded, "answers": 10}
