from __future__ import annotations

import struct
from pathlib import Path

from benchmarks.figures import Figures


def test_figures_are_drawn_as_a_png(tmp_path: Path) -> None:
    figures = Figures("Ingest", "messages/s")
    figures.add("bare paho", 25_000)
    figures.add("agent", 9_600)
    figures.add("not measured", None)
    path = tmp_path / "out" / "ingest.png"
    figures.write_png(path)
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", data[16:24])  # the IHDR chunk
    assert (width, height) == (800, int(100 * (1.2 + 0.45 * 2)))
    assert figures.rows == {"bare paho": 25_000.0, "agent": 9_600.0}


def test_log_scale_accepts_figures_spanning_orders_of_magnitude(tmp_path: Path) -> None:
    figures = Figures("Serial", "frames/s", log_scale=True)
    figures.add("split", 8_900_000)
    figures.add("115200 baud", 114)
    figures.write_png(tmp_path / "serial.png")
    assert (tmp_path / "serial.png").stat().st_size > 5_000
