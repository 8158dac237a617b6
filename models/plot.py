"""Figures of an evaluation as PNG files: HitRate@k for the model and its baselines.

matplotlib is imported here only, and only when a figure is drawn, so the CLI and the agent
never pay for it otherwise. The Agg backend renders to a file without a display.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Final

from models.errors import MissingExtraError

# The report's names, as a reader of the figure knows them.
LABELS: Final = {
    "model": "model",
    "popularity": "global popularity",
    "session_popularity": "session popularity",
}


def plot_hit_rates(curves: Mapping[str, Sequence[float]], out: Path, *, title: str = "") -> None:
    """One line per method; element k-1 of each sequence is HitRate@k."""
    try:
        import matplotlib
    except ModuleNotFoundError as exc:
        raise MissingExtraError("matplotlib", "train") from exc

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4.5), dpi=100)
    try:
        for name, rates in curves.items():
            ks = range(1, len(rates) + 1)
            axes.plot(ks, rates, marker="o", markersize=3, label=LABELS.get(name, name))
        max_k = max((len(rates) for rates in curves.values()), default=1)
        axes.set_xlim(1, max_k)
        axes.set_xticks(range(1, max_k + 1))
        axes.set_ylim(bottom=0.0)
        axes.set_xlabel("k (items suggested)")
        axes.set_ylabel("HitRate@k")
        axes.set_title(title or "HitRate@k, leave-last-out")
        axes.grid(visible=True, alpha=0.3)
        axes.legend(loc="upper left")
        figure.tight_layout()
        out.parent.mkdir(parents=True, exist_ok=True)
        figure.savefig(out, format="png")
    finally:
        plt.close(figure)
