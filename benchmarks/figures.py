"""A benchmark's figures as a PNG bar chart, beside its text output (``--png FILE``)."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Figures:
    title: str
    unit: str
    log_scale: bool = False  # for figures that span orders of magnitude
    rows: dict[str, float] = field(default_factory=dict)

    def add(self, label: str, value: float | None) -> None:
        if value is not None:
            self.rows[label] = float(value)

    def write_png(self, path: Path) -> None:
        import matplotlib

        matplotlib.use("Agg")  # no display on a store box or in CI
        import matplotlib.pyplot as plt

        labels, values = list(self.rows), list(self.rows.values())
        figure, axes = plt.subplots(figsize=(8, 1.2 + 0.45 * len(labels)))
        bars = axes.barh(labels, values, color="#3a7bd5")
        axes.invert_yaxis()  # first figure on top, as printed
        if self.log_scale:
            axes.set_xscale("log")
        axes.bar_label(bars, labels=[f"{v:,.3g}" for v in values], padding=3, fontsize=8)
        axes.set_xlabel(self.unit)
        axes.set_title(self.title)
        figure.tight_layout()
        path.parent.mkdir(parents=True, exist_ok=True)
        figure.savefig(path, dpi=100)
        plt.close(figure)
        print(f"figures written to {path}")


def add_png_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--png", type=Path, default=None, help="also draw the figures here")
