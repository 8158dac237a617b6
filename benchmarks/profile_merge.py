"""Benchmark: what the central profile adds to one suggestion's own work (issue 12).

The profile is fetched in the background; on the suggestion's path it costs one merge of the
cached interactions with the session's history (``profile_merge.merge_history``, on the
event loop) and a model call on a longer history. Per request, interleaved in one run:

- ``local``: the session's history alone (up to 32 entries), then ``suggest()``;
- ``with profile``: the same plus the merge of a 200-interaction profile, then ``suggest()``.

Reports p50/p99 of each (microseconds) and the ratios with/without. Not a test: figures
depend on the machine and its load. Loops are bounded by count and time.

    .venv/bin/python -m benchmarks.profile_merge [--requests 3000] [--max-seconds 20]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from typing import Any

from edge_agent.personalize.profile_merge import CentralInteraction, merge_history
from models import DEFAULT_MODEL_DIR, SuggestionContext
from models.serving import SuggestionModel

NOW = 1_795_000_000.0
STORE = "store-001"


def _p(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--max-seconds", type=float, default=20.0)
    args = parser.parse_args(argv)
    model = SuggestionModel.load(DEFAULT_MODEL_DIR)
    rng = random.Random(7)
    skus = [f"SKU-{n:06d}" for n in range(1, 2001)]
    context = SuggestionContext(12, STORE, "shelf-01")
    local_us: list[float] = []
    merged_us: list[float] = []
    deadline = time.monotonic() + args.max_seconds
    for n in range(args.requests):
        if time.monotonic() > deadline:
            break
        local = [(rng.choice(skus), "product.pickup", NOW - 60.0 * (32 - i)) for i in range(32)]
        central = [
            CentralInteraction(
                f"e{n}-{i}", rng.choice(("store-002", "web-shop", STORE)), "product.pickup",
                rng.choice(skus), NOW - 3600.0 * (200 - i),
            )
            for i in range(200)
        ]  # fmt: skip
        order = (0, 1) if n % 2 == 0 else (1, 0)  # alternate: drift hits both alike
        for which in order:
            started = time.perf_counter_ns()
            if which == 0:
                history = list(local)
            else:
                history = merge_history(
                    local, central, own_store_id=STORE, limit=32, since=NOW - 180 * 86_400.0
                ).entries
            model.suggest(history, context, set(), k=5, now=NOW)
            elapsed = (time.perf_counter_ns() - started) / 1000.0
            (local_us if which == 0 else merged_us).append(elapsed)
    result = {
        "requests": len(local_us),
        "local_us": {"p50": round(_p(local_us, 0.5), 1), "p99": round(_p(local_us, 0.99), 1)},
        "with_profile_us": {
            "p50": round(_p(merged_us, 0.5), 1),
            "p99": round(_p(merged_us, 0.99), 1),
        },
        "ratio_p50": round(statistics.median(merged_us) / statistics.median(local_us), 2),
        "ratio_p99": round(_p(merged_us, 0.99) / _p(local_us, 0.99), 2),
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
