"""The bundled default model: small, loadable, and exactly what its build script makes."""

from __future__ import annotations

from pathlib import Path

from models.build_default_model import build_default_model
from models.serving import DEFAULT_MODEL_DIR, SuggestionModel


def test_default_model_ships_small_and_loads() -> None:
    sizes = {
        path.name: path.stat().st_size for path in DEFAULT_MODEL_DIR.iterdir() if path.is_file()
    }
    assert set(sizes) == {"model.onnx", "manifest.json", "__init__.py"}
    assert sum(sizes.values()) < 2 * 1024 * 1024
    model = SuggestionModel.load(DEFAULT_MODEL_DIR)
    answer = model.suggest([(model.items[0], "product.pickup", 0.0)], (10, "store-001", None))
    assert len(answer) == model.top_k


def test_default_model_rebuilds_byte_for_byte(tmp_path: Path) -> None:
    rebuilt = build_default_model(tmp_path / "default_model")
    for name in ("model.onnx", "manifest.json"):
        assert (tmp_path / "default_model" / name).read_bytes() == (
            DEFAULT_MODEL_DIR / name
        ).read_bytes(), name
    assert rebuilt.version == SuggestionModel.load(DEFAULT_MODEL_DIR).version
