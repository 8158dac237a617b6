"""``edge-models evaluate --plot FILE.png``: a real PNG, and the printed report unchanged."""

from __future__ import annotations

import itertools
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from models.cli import main
from models.evaluate import METHODS, HitRateCurve, evaluate_files

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC, data[:8]
    assert data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    return width, height


def test_evaluate_plot_writes_a_png_and_prints_the_same_json(
    holdout_model_dir: Path,
    events_file: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    args = ["evaluate", "--model", str(holdout_model_dir), "--events", str(events_file), "--json"]
    assert main(args) == 0
    plain = capsys.readouterr().out

    figure = tmp_path / "figures" / "hit_rate.png"
    assert main([*args, "--plot", str(figure)]) == 0
    assert capsys.readouterr().out == plain  # byte for byte: the contract is untouched

    assert figure.stat().st_size > 10_000  # three lines, axes and a legend, not an empty canvas
    width, height = _png_size(figure)
    assert (width, height) == (700, 450)


def test_evaluate_plot_leaves_the_table_unchanged(
    holdout_model_dir: Path,
    events_file: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    args = ["evaluate", "--model", str(holdout_model_dir), "--events", str(events_file)]
    assert main(args) == 0
    table = capsys.readouterr().out
    assert main([*args, "--plot", str(tmp_path / "table.png")]) == 0
    assert capsys.readouterr().out == table
    assert (tmp_path / "table.png").read_bytes()[:8] == PNG_MAGIC


def test_curves_agree_with_the_reported_hit_rate(
    holdout_model_dir: Path, events_file: Path
) -> None:
    """HitRate@10 read off the curve is the report's hit_rate@10, for every method, and the
    curve never falls as k grows."""
    curves = {name: HitRateCurve(20) for name in METHODS}
    report = evaluate_files(holdout_model_dir, events_file, cutoff=10, curves=curves)
    for name, curve in curves.items():
        rates = curve.hit_rates()
        assert len(rates) == 20
        assert len(curve.ranks) == report["customers"]
        assert rates[9] == pytest.approx(report[name]["hit_rate@10"], abs=1e-6)
        assert all(a <= b for a, b in itertools.pairwise(rates))
    # the model beats global popularity on this simulated store, at every depth past the first
    model, popularity = curves["model"].hit_rates(), curves["popularity"].hit_rates()
    assert all(m > p for m, p in zip(model[1:], popularity[1:], strict=True))


def test_hit_rate_curve_counts_ranks() -> None:
    curve = HitRateCurve(3)
    curve.add(["a", "b", "c", "d"], "a")  # rank 1
    curve.add(["a", "b", "c", "d"], "c")  # rank 3
    curve.add(["a", "b", "c", "d"], "d")  # beyond max_k: a miss
    curve.add([], "a")  # nothing ranked: a miss
    assert curve.ranks == [1, 3, 0, 0]
    assert curve.hit_rates() == [0.25, 0.25, 0.5]


def test_matplotlib_is_not_imported_without_plot(
    holdout_model_dir: Path, events_file: Path
) -> None:
    """A fresh interpreter (this one may have imported matplotlib in another test)."""
    code = (
        "import sys\n"
        "from models.cli import main\n"
        f"assert main(['evaluate', '--model', {str(holdout_model_dir)!r},"
        f" '--events', {str(events_file)!r}, '--json']) == 0\n"
        "print('matplotlib' in sys.modules)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.splitlines()[-1] == "False"
