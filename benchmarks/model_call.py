"""Benchmark: the suggestion model call alone, and the offline quality target.

For a 1k and a 5k item catalogue: simulate shoppers, train with --holdout-last, then
- time one model call (``SuggestionModel.run_feeds``) on the holdout's requests, p50/p99,
  on each runtime (``--runtime both``: the numpy runtime and onnxruntime, interleaved call
  by call so that both see the same load), and the whole ``suggest()`` (features + call +
  decoding) for comparison;
- report HitRate@10 of the model against global and session popularity on that holdout.
Targets (issue 4): model call p99 < 0.2 ms for 5k items; HitRate@10 >= 3x global popularity.

    .venv/bin/python benchmarks/model_call.py [--json out.json] [--max-seconds 10]

Not a test: figures depend on the machine and its load. Loops are bounded by count and time.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort  # its version goes into the report; the baseline runtime

from benchmarks.figures import Figures, add_png_argument
from models.errors import ModelError
from models.evaluate import EvaluationCase, evaluate, evaluation_cases
from models.events import load_event_log
from models.pipeline import train_to_dir
from models.serving import Runtime, SuggestionModel
from models.simulator import SimulationConfig, write_events

P99_TARGET_MS = 0.2
QUALITY_TARGET = 3.0


@dataclass(frozen=True)
class Scenario:
    items: int
    customers: int
    days: int


SCENARIOS = (Scenario(1000, 600, 21), Scenario(5000, 2500, 21))


def _percentiles(samples_ns: list[int]) -> dict[str, float]:
    values = np.array(samples_ns, np.float64) / 1e6
    return {
        "p50_ms": round(float(np.percentile(values, 50)), 4),
        "p99_ms": round(float(np.percentile(values, 99)), 4),
        "max_ms": round(float(values.max()), 4),
        "calls": len(samples_ns),
    }


def _time_calls(
    models: dict[str, SuggestionModel], cases: list[EvaluationCase], args: Any
) -> dict[str, dict[str, Any]]:
    """Feeds are built beforehand (copies), so only the model call is timed; the runtimes
    take turns on each request, the first of them alternating, so they share the load."""
    first = next(iter(models.values()))
    prepared = []
    for case in cases[: args.requests]:
        feeds = first.build_feeds(case.history, case.suggestion_context, case.taken, k=10)
        prepared.append({name: array.copy() for name, array in feeds.items()})
    for model in models.values():
        for feeds in prepared[: args.warmup]:
            model.run_feeds(feeds)
    call_ns: dict[str, list[int]] = {name: [] for name in models}
    call_cpu_ns: dict[str, list[int]] = {name: [] for name in models}  # without preemption
    suggest_ns: dict[str, list[int]] = {name: [] for name in models}
    order = list(models)
    deadline = time.monotonic() + args.max_seconds * len(models)
    gc.collect()
    done = 0
    while done < args.iterations and time.monotonic() < deadline:
        for feeds, case in zip(prepared, cases, strict=False):
            order.reverse()
            for name in order:
                model = models[name]
                cpu_start, start = time.thread_time_ns(), time.perf_counter_ns()
                model.run_feeds(feeds)
                call_ns[name].append(time.perf_counter_ns() - start)
                call_cpu_ns[name].append(time.thread_time_ns() - cpu_start)
                history = case.history[-30:]  # the agent keeps a bounded session history
                start = time.perf_counter_ns()
                model.suggest(history, case.suggestion_context, ())
                suggest_ns[name].append(time.perf_counter_ns() - start)
            done += 1
            if done >= args.iterations:
                break
    return {
        name: {
            "model_call": _percentiles(call_ns[name]),
            "model_call_cpu": _percentiles(call_cpu_ns[name]),
            "suggest": _percentiles(suggest_ns[name]),
        }
        for name in models
    }


def run_scenario(scenario: Scenario, workdir: Path, args: Any) -> dict[str, Any]:
    events = workdir / f"events_{scenario.items}.jsonl"
    config = SimulationConfig(
        seed=args.seed, customers=scenario.customers, days=scenario.days, items=scenario.items
    )
    started = time.monotonic()
    model_dir = workdir / f"model_{scenario.items}"
    if not events.is_file():  # with --workdir, data and models are reused across runs
        write_events(config, events)
    try:
        model = SuggestionModel.load(model_dir)
    except ModelError:  # none yet, or made by other code: train afresh
        model, _ = train_to_dir(events, model_dir, holdout_last=True, progress=False)
    runtimes: tuple[Runtime, ...] = (
        ("numpy", "onnxruntime") if args.runtime == "both" else (args.runtime,)
    )
    models: dict[str, SuggestionModel] = {
        name: SuggestionModel.load(model_dir, runtime=name) for name in runtimes
    }
    with events.open(encoding="utf-8") as handle:
        count = sum(1 for _ in handle)
    prepared_s = time.monotonic() - started
    log = load_event_log(events)
    quality = evaluate(model, log, progress=False)
    cases = list(evaluation_cases(log))
    timing = _time_calls(models, cases, args)
    model_hr = quality["model"]["hit_rate@10"]
    popularity_hr = quality["popularity"]["hit_rate@10"]
    return {
        "catalogue_items": scenario.items,
        "model_items": len(model.items),
        "events": count,
        "model_bytes": (model_dir / "model.onnx").stat().st_size,
        "setup_s": round(prepared_s, 1),
        "runtimes": timing,
        "quality": quality,
        "hit_rate_ratio_vs_popularity": round(model_hr / popularity_hr, 2)
        if popularity_hr
        else None,
    }


def _print_table(results: list[dict[str, Any]]) -> None:
    columns: tuple[str, ...] = ("items", "runtime", "call p50", "call p99", "cpu p50", "cpu p99")
    columns += ("suggest p50", "suggest p99", "HR@10 model", "HR@10 pop", "HR@10 sess")
    columns += ("ratio", "MB")
    print(" ".join(f"{column:>11}" for column in columns))
    for row in results:
        quality = row["quality"]
        for runtime, timing in row["runtimes"].items():
            cells = (
                row["model_items"],
                runtime,
                timing["model_call"]["p50_ms"],
                timing["model_call"]["p99_ms"],
                timing["model_call_cpu"]["p50_ms"],
                timing["model_call_cpu"]["p99_ms"],
                timing["suggest"]["p50_ms"],
                timing["suggest"]["p99_ms"],
                quality["model"]["hit_rate@10"],
                quality["popularity"]["hit_rate@10"],
                quality["session_popularity"]["hit_rate@10"],
                row["hit_rate_ratio_vs_popularity"],
                round(row["model_bytes"] / 1e6, 2),
            )
            print(" ".join(f"{cell:>11}" for cell in cells))
    print("times in ms (call: wall clock; cpu: the thread's CPU time, i.e. without preemption)")
    print("targets: model call p99 < 0.2 ms at 5k items; HR@10 >= 3x global popularity")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    add_png_argument(parser)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument(
        "--workdir", type=Path, default=None, help="keep (and reuse) data and models here"
    )
    parser.add_argument("--iterations", type=int, default=20000, help="timed calls at most")
    parser.add_argument("--max-seconds", type=float, default=10.0, help="per catalogue size")
    parser.add_argument("--requests", type=int, default=2000, help="distinct holdout requests")
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument(
        "--runtime",
        choices=("both", "numpy", "onnxruntime"),
        default="both",
        help="which runtime(s) to time; both: interleaved, the same requests",
    )
    args = parser.parse_args(argv)
    results = []
    with tempfile.TemporaryDirectory(prefix="bench-model-call-") as scratch:
        workdir = args.workdir or Path(scratch)
        workdir.mkdir(parents=True, exist_ok=True)
        for scenario in SCENARIOS:
            results.append(run_scenario(scenario, workdir, args))
    _print_table(results)
    five_k = results[-1]
    summary = {
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "onnxruntime": ort.__version__,
        },
        "results": results,
        "targets": {
            **{
                f"model_call_p99_ms_5k_{name}": timing["model_call"]["p99_ms"]
                for name, timing in five_k["runtimes"].items()
            },
            **{
                f"model_call_p99_met_{name}": timing["model_call"]["p99_ms"] < P99_TARGET_MS
                for name, timing in five_k["runtimes"].items()
            },
            **{
                f"model_call_cpu_p99_ms_5k_{name}": timing["model_call_cpu"]["p99_ms"]
                for name, timing in five_k["runtimes"].items()
            },
            "load_average_1m": round(os.getloadavg()[0], 2),
            "quality_ratio_5k": five_k["hit_rate_ratio_vs_popularity"],
            "quality_met": all(
                (row["hit_rate_ratio_vs_popularity"] or 0) >= QUALITY_TARGET for row in results
            ),
        },
    }
    print(json.dumps(summary["targets"]))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(summary, indent=1) + "\n", encoding="utf-8")
    if args.png:
        figures = Figures("Model call alone (target p99 < 0.2 ms at 5k items)", "milliseconds")
        for row in results:
            for runtime, timing in row["runtimes"].items():
                for stat in ("p50_ms", "p99_ms"):
                    label = f"{row['model_items']} items, {runtime}, {stat.removesuffix('_ms')}"
                    figures.add(label, timing["model_call"][stat])
        figures.write_png(args.png)
    return 0


if __name__ == "__main__":
    sys.exit(main())
