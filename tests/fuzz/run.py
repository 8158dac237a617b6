"""Run one fuzz target under atheris (libFuzzer, coverage-guided).

    python tests/fuzz/run.py TARGET [libFuzzer options] [NEW_CORPUS_DIR] tests/fuzz/corpus/TARGET

TARGET is mqtt, serial, config or onnx (tests/fuzz/targets.py). Only the project's packages are
instrumented, so "cov" in libFuzzer's lines counts edges of our code. A crash writes
``crash-<sha1>`` (see -artifact_prefix) and exits non-zero; add that file to the corpus.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import atheris

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root

with atheris.instrument_imports(include=["edge_agent", "firmware_bridge", "cloud_sync", "models"]):
    from tests.fuzz.targets import TARGETS


def main() -> None:
    logging.disable(logging.CRITICAL)  # the readers log each rejection: noise at 10k/s
    if len(sys.argv) < 2 or sys.argv[1] not in TARGETS:
        sys.exit(f"usage: run.py {{{','.join(TARGETS)}}} [libFuzzer options] [corpus dirs]")
    target = TARGETS[sys.argv[1]]
    atheris.Setup([sys.argv[0], *sys.argv[2:]], target)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
