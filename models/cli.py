"""edge-models: simulate | train | evaluate | export.

Results go to stdout (one JSON object where a machine reads it), logs and progress to stderr.
Exit codes: 0 success, 1 a model or data error (message on stderr), 2 bad usage (argparse).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import logging
import sys
from pathlib import Path
from typing import Any

from models.errors import ModelError
from models.evaluate import METHODS, HitRateCurve, evaluate_files
from models.events import parse_ts
from models.gate import GateRule, evaluate_gate
from models.simulator import SimulationConfig, write_events
from models.train import TrainingParams

logger = logging.getLogger(__name__)

PLOT_MAX_K = 20  # evaluate --plot draws HitRate@k for k = 1..PLOT_MAX_K


def _version() -> str:
    # The installed distribution's version (models/ must not import the agent for it).
    try:
        return importlib.metadata.version("edge-agent")
    except importlib.metadata.PackageNotFoundError:
        return "unknown (not installed)"


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _share(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, got {value}")
    return value


def _timestamp(text: str) -> float:
    ts = parse_ts(text)
    if ts is None:
        raise argparse.ArgumentTypeError(f"not an RFC 3339 time with a zone: {text!r}")
    return ts


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="edge-models", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    parser.add_argument("--version", action="version", version=_version())
    commands = parser.add_subparsers(dest="command", required=True)

    simulate = commands.add_parser("simulate", help="write a simulated events file (JSON Lines)")
    simulate.add_argument("--out", type=Path, required=True)
    defaults = SimulationConfig()
    simulate.add_argument("--seed", type=int, default=defaults.seed)
    simulate.add_argument("--customers", type=_positive, default=defaults.customers)
    simulate.add_argument("--days", type=_positive, default=defaults.days)
    simulate.add_argument("--items", type=_positive, default=defaults.items)
    simulate.add_argument("--stores", type=_positive, default=defaults.stores)
    simulate.add_argument("--topics", type=_positive, default=defaults.topics)
    simulate.add_argument("--start", default=defaults.start, help="first day, YYYY-MM-DD (UTC)")
    simulate.add_argument(
        "--telemetry-interval-min", type=int, default=defaults.telemetry_interval_min
    )
    simulate.add_argument(
        "--travellers",
        type=_share,
        default=defaults.travellers,
        metavar="SHARE",
        help="share of customers who shop at every store and online (the web-shop channel)",
    )
    simulate.add_argument(
        "--web-shop-rate",
        type=_share,
        default=defaults.web_shop_rate,
        metavar="SHARE",
        help="share of a traveller's visits made in the web shop",
    )

    train = commands.add_parser(
        "train",
        help="train on events and write a model directory",
        description="Train on the events of customers whose latest consent.update allows"
        " personalization; a customer with no consent.update at all is left out (the default"
        " policy, require_consent = true) and counted in the manifest's"
        " training.stats.excluded_customers_no_consent.",
    )
    train.add_argument("--events", type=Path, required=True)
    train.add_argument("--out", type=Path, required=True)
    train.add_argument(
        "--holdout-last",
        action="store_true",
        help="leave each customer's last trigger event out (and score it into the manifest)",
    )
    params = TrainingParams()
    train.add_argument("--top-k", type=_positive, default=10)
    train.add_argument("--neighbours", type=_positive, default=params.neighbours)
    train.add_argument("--history-length", type=_positive, default=params.history_length)
    train.add_argument("--version", default=None, help="default: derived from the sha256")
    train.add_argument("--created-at", default=None, help="default: now (RFC 3339)")
    train.add_argument(
        "--until",
        type=_timestamp,
        default=None,
        metavar="TS",
        help="train only on interactions before TS (RFC 3339): the time-based holdout's cut",
    )

    evaluate = commands.add_parser(
        "evaluate",
        help="leave-last-out metrics against baselines; with a time holdout, the publish gate",
        description="Without --holdout-from/--holdout-days: leave-last-out metrics against the"
        " popularity baselines. With one of them: the evaluation gate (models/gate.py states"
        " the rule): the model (the candidate) and --current are scored on the events at or"
        " after the cut (HitRate@k, NDCG@k) and off-policy from the logged suggestions"
        " (SNIPS), and evaluation.json is written into the candidate's directory for"
        " `customer-store model publish`.",
    )
    evaluate.add_argument("--model", type=Path, required=True)
    evaluate.add_argument("--events", type=Path, required=True)
    evaluate.add_argument("--json", action="store_true", help="print one JSON object")
    evaluate.add_argument("--cutoff", type=_positive, default=10)
    evaluate.add_argument(
        "--plot",
        type=Path,
        default=None,
        metavar="FILE.png",
        help=f"also draw HitRate@k, k = 1..{PLOT_MAX_K}, for the model and its baselines",
    )
    cut = evaluate.add_mutually_exclusive_group()
    cut.add_argument("--holdout-from", type=_timestamp, default=None, metavar="TS")
    cut.add_argument("--holdout-days", type=float, default=None, metavar="N")
    evaluate.add_argument(
        "--current", type=Path, default=None, metavar="DIR", help="the model serving now"
    )
    gate_rule = GateRule()
    evaluate.add_argument("--hr-tolerance", type=float, default=gate_rule.hr_tolerance)
    evaluate.add_argument("--min-snips-items", type=int, default=gate_rule.min_snips_items)

    export = commands.add_parser(
        "export", help="verify a model directory the way the agent does; copy it with --out"
    )
    export.add_argument("--model", type=Path, required=True)
    export.add_argument("--out", type=Path, default=None)
    return parser


def _print_table(report: dict[str, Any]) -> None:
    methods = ("model", "popularity", "session_popularity")
    columns = list(report["model"])
    print(f"{'method':<20}" + "".join(f"{column:>14}" for column in columns))
    for method in methods:
        values = "".join(f"{report[method][column]:>14.4f}" for column in columns)
        print(f"{method:<20}{values}")
    print(f"customers: {report['customers']}")


def _run(args: argparse.Namespace) -> int:
    if args.command == "simulate":
        config = SimulationConfig(
            seed=args.seed,
            customers=args.customers,
            days=args.days,
            items=args.items,
            stores=args.stores,
            topics=args.topics,
            start=args.start,
            telemetry_interval_min=args.telemetry_interval_min,
            travellers=args.travellers,
            web_shop_rate=args.web_shop_rate,
        )
        count = write_events(config, args.out)
        print(json.dumps({"events": count, "out": str(args.out)}))
        return 0
    if args.command == "train":
        from models.pipeline import train_to_dir  # onnx: the [train] extra

        params = TrainingParams(neighbours=args.neighbours, history_length=args.history_length)
        model, metrics = train_to_dir(
            args.events,
            args.out,
            holdout_last=args.holdout_last,
            params=params,
            top_k=args.top_k,
            version=args.version,
            created_at=args.created_at,
            until=args.until,
        )
        summary = {"out": str(args.out), "version": model.version, "items": len(model.items)}
        print(json.dumps({**summary, "metrics": metrics}))
        return 0
    if args.command == "evaluate" and (args.holdout_from is not None or args.holdout_days):
        rule = GateRule(
            cutoff=args.cutoff,
            hr_tolerance=args.hr_tolerance,
            min_snips_items=args.min_snips_items,
        )
        document = evaluate_gate(
            args.model,
            args.events,
            current_dir=args.current,
            holdout_from=args.holdout_from,
            holdout_days=args.holdout_days,
            rule=rule,
        )
        print(json.dumps(document) if args.json else json.dumps(document, indent=1))
        return 0
    if args.command == "evaluate":
        curves = {name: HitRateCurve(PLOT_MAX_K) for name in METHODS} if args.plot else None
        report = evaluate_files(args.model, args.events, cutoff=args.cutoff, curves=curves)
        if curves is not None:
            from models.plot import plot_hit_rates  # matplotlib only when a plot is asked for

            rates = {name: curve.hit_rates() for name, curve in curves.items()}
            title = f"HitRate@k, {report['customers']} customers, model {args.model.name}"
            plot_hit_rates(rates, args.plot, title=title)
            logger.info("evaluate.plot out=%s", args.plot)
        if args.json:
            print(json.dumps(report))
        else:
            _print_table(report)
        return 0
    from models.export import copy_model_dir, verify_model_dir  # onnx: the [train] extra

    model = copy_model_dir(args.model, args.out) if args.out else verify_model_dir(args.model)
    print(json.dumps({"ok": True, "version": model.version, "dir": str(model.model_dir)}))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    holdout = args.command == "evaluate" and (args.holdout_from is not None or args.holdout_days)
    if args.command == "evaluate" and args.current is not None and not holdout:
        parser.error(
            "evaluate --current needs a time holdout: --holdout-from TS or --holdout-days N"
        )
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s %(message)s",
        stream=sys.stderr,
    )
    try:
        return _run(args)
    except (ModelError, OSError) as exc:
        print(f"edge-models {args.command}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
