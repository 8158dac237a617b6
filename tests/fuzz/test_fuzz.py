"""The fuzz targets in the test suite: the corpus replayed, then each target fuzzed briefly.

Every committed corpus file (tests/fuzz/corpus/<target>/) is a regression test: the crashes
found so far and the failure classes of issue 9, written by hand. Then atheris runs each
target for FUZZ_SECONDS in a subprocess, starting from that corpus; any crash fails the test
and leaves its input in tmp_path (copy it into the corpus). README "Fuzzing" says how to
run them longer.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.fuzz.targets import TARGETS

HERE = Path(__file__).parent
CORPUS = HERE / "corpus"
FUZZ_SECONDS = int(os.environ.get("EDGE_FUZZ_SECONDS", "20"))


def _corpus() -> list[tuple[str, Path]]:
    return [(name, path) for name in TARGETS for path in sorted((CORPUS / name).iterdir())]


@pytest.mark.parametrize(("target", "path"), _corpus(), ids=lambda v: getattr(v, "name", v))
def test_corpus_file_is_handled(target: str, path: Path) -> None:
    TARGETS[target](path.read_bytes())


@pytest.mark.parametrize("target", sorted(TARGETS))
def test_fuzz_target_finds_no_crash(target: str, tmp_path: Path) -> None:
    pytest.importorskip("atheris", reason="atheris is in the dev extra (pip install -e .[dev])")
    found = tmp_path / "new"
    found.mkdir()
    process = subprocess.run(
        [
            sys.executable,
            str(HERE / "run.py"),
            target,
            f"-max_total_time={FUZZ_SECONDS}",
            "-max_len=4096",
            f"-dict={HERE / f'{target}.dict'}",
            "-rss_limit_mb=1024",
            f"-artifact_prefix={tmp_path}/",
            str(found),  # new inputs go here, never into the committed corpus
            str(CORPUS / target),
        ],
        capture_output=True,
        text=True,
        timeout=FUZZ_SECONDS + 120,
        check=False,
    )
    crashes = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(("crash-", "oom-")))
    assert process.returncode == 0, f"{crashes}\n{process.stderr[-4000:]}"
    assert "Done" in process.stderr  # libFuzzer's closing line: it really ran
