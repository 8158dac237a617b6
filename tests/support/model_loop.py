"""Data for the model loop's tests: a simulated events file and the three models the gate
compares, trained on real files before one cut time.

- ``current``: trained on a third of the customers (a decent model, the one serving now);
- ``better``: trained on every customer (more data: it should beat ``current``);
- ``worse``: trained on the same events with the skus relabelled by a random permutation,
  so what it learnt about items belongs to other items (it should lose).
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from models.events import parse_ts
from models.pipeline import train_to_dir
from models.simulator import SimulationConfig, write_events

WORLD = SimulationConfig(seed=5, customers=300, days=21, items=400, stores=2)
CUT = "2026-11-15T00:00:00Z"  # days 0-13 train, days 14-20 the holdout


@dataclass(frozen=True)
class LoopModels:
    events: Path
    current: Path
    better: Path
    worse: Path


def _rewrite(source: Path, target: Path, *, shuffle_skus: bool, every_nth: int) -> None:
    lines = source.read_text("utf-8").splitlines()
    skus = sorted(
        {
            envelope["data"]["sku"]
            for envelope in map(json.loads, lines)
            if isinstance(envelope.get("data"), dict) and "sku" in envelope["data"]
        }
    )
    permuted = skus[:]
    random.Random(1).shuffle(permuted)
    relabel = dict(zip(skus, permuted, strict=True))
    with target.open("w", encoding="utf-8") as out:
        for line in lines:
            envelope = json.loads(line)
            customer = envelope.get("customer_id")
            if customer is not None and int(customer[2:]) % every_nth:
                continue
            data = envelope.get("data")
            if shuffle_skus and isinstance(data, dict) and "sku" in data:
                data["sku"] = relabel[data["sku"]]
            out.write(json.dumps(envelope) + "\n")


def build_loop_models(root: Path) -> LoopModels:
    events = root / "events.jsonl"
    write_events(WORLD, events)
    third, shuffled = root / "third.jsonl", root / "shuffled.jsonl"
    _rewrite(events, third, shuffle_skus=False, every_nth=3)
    _rewrite(events, shuffled, shuffle_skus=True, every_nth=1)
    until = parse_ts(CUT)
    dirs = {}
    for name, source in (("current", third), ("better", events), ("worse", shuffled)):
        dirs[name] = root / name
        train_to_dir(source, dirs[name], version=f"{name}-1", until=until, progress=False)
    return LoopModels(events, dirs["current"], dirs["better"], dirs["worse"])
