"""Regenerate the bundled default model, deterministically.

    python -m models.build_default_model [--out models/default_model]

Same code, same seed: the same bytes and the same sha256 (nothing depends on the clock: the
manifest's created_at is the end of the simulated training window).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Final

from models.events import format_ts
from models.pipeline import train_to_dir
from models.serving import DEFAULT_MODEL_DIR, SuggestionModel
from models.simulator import SimulationConfig, write_events

logger = logging.getLogger(__name__)

DEFAULT_MODEL_CONFIG: Final = SimulationConfig(
    seed=20261122, customers=600, days=21, items=2000, stores=3
)
DEFAULT_TOP_K: Final = 10


def _window_end(config: SimulationConfig) -> str:
    start = datetime.fromisoformat(config.start).replace(tzinfo=UTC)
    return format_ts((start + timedelta(days=config.days)).timestamp())


def build_default_model(out_dir: Path = DEFAULT_MODEL_DIR) -> SuggestionModel:
    """Simulate, train on everything (no holdout: this model serves) and write ``out_dir``."""
    with tempfile.TemporaryDirectory(prefix="edge-models-default-") as scratch:
        events = Path(scratch) / "default_events.jsonl"
        write_events(DEFAULT_MODEL_CONFIG, events)
        model, _ = train_to_dir(
            events,
            out_dir,
            holdout_last=False,
            top_k=DEFAULT_TOP_K,
            created_at=_window_end(DEFAULT_MODEL_CONFIG),
            progress=False,
        )
    return model


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_MODEL_DIR)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s %(message)s")
    model = build_default_model(args.out)
    sha = model.manifest.sha256
    print(json.dumps({"out": str(args.out), "version": model.version, "sha256": sha}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
