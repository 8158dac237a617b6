"""``customer-store model ...`` and ``training export``: the model loop's commands.

Split from ``cli`` (which wires every command): publishing with the evaluation gate and a
canary share, promote, rollback, the canary check, the rollout's status, the training export.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cloud_sync.model_signature import load_private_key
from cloud_sync.store import model_rollout, rollout, training_export
from cloud_sync.store.acceptance import DEFAULT_MIN_SHOWN
from cloud_sync.store.backend import Backend
from cloud_sync.store.errors import StoreError
from cloud_sync.store.model_publish import read_model_dir
from cloud_sync.store.records import RolloutState, format_ts, parse_ts


def model_parsers(
    commands: Any, with_db: Callable[[argparse.ArgumentParser], argparse.ArgumentParser]
) -> None:
    """model publish|promote|rollback|check|status|sign|keygen and training export."""
    model = commands.add_parser("model", help="suggestion models").add_subparsers(
        dest="action", required=True
    )
    publish = with_db(model.add_parser("publish", help="publish model.onnx + manifest.json"))
    publish.add_argument("--dir", required=True, type=Path)
    publish.add_argument(
        "--signing-key",
        type=Path,
        default=None,
        help="ed25519 private key (PEM, from `model keygen`): sign the manifest",
    )
    publish.add_argument(
        "--canary",
        type=int,
        default=None,
        metavar="PERCENT",
        help="serve it to this share of stores (1..99, by store id); default: promote at once",
    )
    publish.add_argument(
        "--force",
        action="store_true",
        help="publish even without an evaluation.json showing it beats the current version",
    )
    publish.add_argument("--by", default="operator", help="who decides (kept in the log)")
    for action, text in (
        ("promote", "serve VERSION to every store (ends a canary)"),
        ("rollback", "stop serving VERSION: a canary ends, a promoted one gives way"),
    ):
        step = with_db(model.add_parser(action, help=text))
        step.add_argument("version")
        step.add_argument("--by", default="operator", help="who decides (kept in the log)")
    mcheck = with_db(
        model.add_parser("check", help="judge a running canary now; roll it back when worse")
    )
    mcheck.add_argument("--min-shown", type=int, default=DEFAULT_MIN_SHOWN)
    mstatus = with_db(model.add_parser("status", help="the rollout state and its log (JSON)"))
    mstatus.add_argument("--limit", type=int, default=50)
    sign = model.add_parser(
        "sign", help="sign a model directory's manifest in place (for a drop in models/incoming)"
    )
    sign.add_argument("--dir", required=True, type=Path)
    sign.add_argument("--signing-key", required=True, type=Path)
    keygen = model.add_parser(
        "keygen", help="make a model signing key pair; prints the public key (last line)"
    )
    keygen.add_argument("--out", required=True, type=Path, help="private key file (0600)")

    training = commands.add_parser("training", help="training data").add_subparsers(
        dest="action", required=True
    )
    texport = with_db(
        training.add_parser(
            "export", help="events of customers with a personalization consent, JSON Lines"
        )
    )
    texport.add_argument("--out", required=True, type=Path)
    texport.add_argument("--since", default=None, help="only events dated since (RFC 3339)")


def model_command(args: argparse.Namespace) -> Callable[[Backend], Awaitable[str]]:
    """model publish|promote|rollback|check|status and training export."""
    by = f"admin:{getattr(args, 'by', 'operator')}"
    if (args.command, args.action) == ("training", "export"):
        since = None
        if args.since is not None:
            since = parse_ts(args.since)
            if since is None:
                raise StoreError(f"--since {args.since!r}: expected RFC 3339 with a time zone")

        async def export(b: Backend) -> str:
            summary = await training_export.export(b, args.out, since)
            return json.dumps(summary.as_json(), sort_keys=True)

        return export
    if args.action == "publish":
        key = None if args.signing_key is None else load_private_key(args.signing_key)
        record, artifact = read_model_dir(args.dir, key)

        async def publish(b: Backend) -> str:
            created, entry = await model_rollout.publish(
                b,
                args.dir,
                record,
                artifact,
                canary=args.canary,
                force=args.force,
                decided_by=by,
                now=datetime.now(UTC),
            )
            state = "published" if created else "already published"
            signed = "signed" if key is not None else "unsigned"
            served = "canary" if entry.action == rollout.CANARY else "promoted"
            share = f" percent={entry.percent}" if entry.percent is not None else ""
            return (
                f"{state} version={record.version} sha256={record.sha256} {signed}"
                f" {served}{share} gate={entry.reason}"
            )

        return publish
    if args.action in ("promote", "rollback"):

        async def step(b: Backend) -> str:
            now = datetime.now(UTC)
            if args.action == "promote":
                entry = await model_rollout.promote(b, args.version, by, now)
            else:
                entry = await model_rollout.roll_back(b, args.version, by, now)
            state = await b.rollout()
            return json.dumps(
                {"entry": entry.as_json(), "state": _state_json(state)}, sort_keys=True
            )

        return step
    if args.action == "check":

        async def check(b: Backend) -> str:
            result = await model_rollout.check(b, args.min_shown, by, datetime.now(UTC))
            return json.dumps(result.as_json(), sort_keys=True)

        return check

    async def status(b: Backend) -> str:
        state, entries = await b.rollout(), await b.rollout_log(args.limit)
        return json.dumps(
            {"state": _state_json(state), "log": [e.as_json() for e in entries]}, sort_keys=True
        )

    return status


def _state_json(state: RolloutState) -> dict[str, Any]:
    return {
        "current_version": state.current_version,
        "canary_version": state.canary_version,
        "canary_percent": state.canary_percent,
        "canary_since": None if state.canary_since is None else format_ts(state.canary_since),
    }
