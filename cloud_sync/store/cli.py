"""``customer-store``: run the central store and administer it.

stdout carries only what a script reads (a token or key as the last line, one JSON object for
``stats``, the ``listening`` line of ``serve``); logs go to stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.metadata
import json
import logging
import os
import sys
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Final

from cloud_sync.model_signature import ModelSignatureError, load_private_key, write_new_key
from cloud_sync.store import auth, fleet
from cloud_sync.store.acceptance import DEFAULT_MIN_SHOWN
from cloud_sync.store.backend import Backend, open_backend
from cloud_sync.store.cli_announce import announce_parser, run_announce_command
from cloud_sync.store.cli_models import model_command, model_parsers
from cloud_sync.store.cli_partitions import partition_command, partition_parsers
from cloud_sync.store.errors import StoreError
from cloud_sync.store.feed import FeedSettings
from cloud_sync.store.ingest import Limits
from cloud_sync.store.model_publish import read_model_dir, write_manifest
from cloud_sync.store.records import PARTNER_SCOPES, Kind, format_ts
from cloud_sync.store.server import serve

log = logging.getLogger(__name__)
DEFAULT_DB: Final = "sqlite:customer-store.db"
DEFAULT_HOST: Final = "127.0.0.1"
DEFAULT_PORT: Final = 8700
_KINDS: Final[dict[str, Kind]] = {
    "token": "agent",
    "partner": "partner",
    "admin": "admin",
    "channel": "channel",
}
_MAX_GRACE_S: Final = 30 * 24 * 3600.0  # a month: long enough to reach every store box


def _version() -> str:
    # The installed distribution's version: the store never imports the agent.
    try:
        return importlib.metadata.version("edge-agent")
    except importlib.metadata.PackageNotFoundError:
        return "unknown (not installed)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="customer-store", description=__doc__)
    parser.add_argument("--version", action="version", version=_version())
    parser.add_argument("--log-level", default="INFO", help="logging level (default INFO)")
    commands = parser.add_subparsers(dest="command", required=True)

    def with_db(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
        p.add_argument(
            "--db",
            default=os.environ.get("CUSTOMER_STORE_DB", DEFAULT_DB),
            help="sqlite:///abs/path, sqlite:rel/path or postgresql://... "
            "(default $CUSTOMER_STORE_DB or %(default)s)",
        )
        return p

    run = with_db(commands.add_parser("serve", help="run the HTTP service"))
    run.add_argument("--host", default=DEFAULT_HOST)
    run.add_argument("--port", type=int, default=DEFAULT_PORT, help="0 picks a free port")
    run.add_argument("--pool-size", type=int, default=10, help="PostgreSQL connections")
    run.add_argument("--max-body-bytes", type=int, default=Limits().max_body_bytes)
    run.add_argument("--max-events", type=int, default=Limits().max_events, help="per batch")
    run.add_argument(
        "--max-decoded-bytes",
        type=int,
        default=Limits().max_decoded_bytes,
        help="a body once gunzipped",
    )
    run.add_argument(
        "--max-envelope-bytes",
        type=int,
        default=Limits().max_envelope_bytes,
        help="one envelope as sent; larger ones are rejected unparsed",
    )
    run.add_argument(
        "--max-depth", type=int, default=Limits().max_depth, help="nesting in one envelope"
    )
    run.add_argument(
        "--max-future-skew-s",
        type=float,
        default=Limits().max_future_skew_s,
        help="events dated later than receipt + this are rejected",
    )
    run.add_argument(
        "--max-concurrent-ingests",
        type=int,
        default=Limits().max_concurrent_ingests,
        help="per credential; more at once get a 429",
    )
    run.add_argument(
        "--stale-after-s",
        type=float,
        default=fleet.DEFAULT_STALE_AFTER_S,
        help="an agent without a heartbeat this long counts as stale on /metrics",
    )
    run.add_argument(
        "--feed-heartbeat-s",
        type=float,
        default=FeedSettings().heartbeat_s,
        help="a comment line on an idle partner feed this often",
    )
    run.add_argument(
        "--feed-poll-s",
        type=float,
        default=FeedSettings().poll_s,
        help="how often an idle feed looks for new events",
    )
    run.add_argument(
        "--rollout-check-s",
        type=float,
        default=300.0,
        help="judge a running canary this often (0: never; see `model check`)",
    )
    run.add_argument(
        "--min-shown",
        type=int,
        default=DEFAULT_MIN_SHOWN,
        help="suggestions each side must have shown before a canary can be judged",
    )
    run.add_argument("--access-log", action="store_true", help="log every request")
    run.add_argument(
        "--reuse-port",
        action="store_true",
        help="let several instances share --port (SO_REUSEPORT)",
    )

    token = commands.add_parser("token", help="agent tokens").add_subparsers(
        dest="action", required=True
    )
    create = with_db(token.add_parser("create", help="create an agent token for one store"))
    create.add_argument("--store", required=True, help="the store_id the agent uploads for")
    create.add_argument("--name", default="", help="a label (default: agent-STORE)")

    partner = commands.add_parser("partner", help="partner API keys").add_subparsers(
        dest="action", required=True
    )
    pcreate = with_db(partner.add_parser("create", help="create a scoped partner key"))
    pcreate.add_argument("--name", required=True)
    pcreate.add_argument("--scope", action="append", required=True, choices=sorted(PARTNER_SCOPES))

    admin = commands.add_parser("admin", help="admin keys").add_subparsers(
        dest="action", required=True
    )
    acreate = with_db(admin.add_parser("create", help="create an admin key (read all, erase)"))
    acreate.add_argument("--name", default="admin")

    channel = commands.add_parser(
        "channel", help="channel tokens: a web shop, an app, a call centre, a partner brand"
    ).add_subparsers(dest="action", required=True)
    ccreate = with_db(
        channel.add_parser("create", help="a channel token; its events carry store_id = NAME")
    )
    ccreate.add_argument("--name", required=True, help="the channel's name, e.g. web-shop")

    for group, kind in (
        (token, "agent"),
        (partner, "partner"),
        (admin, "admin"),
        (channel, "channel"),
    ):
        _credential_commands(group, kind, with_db)

    _extra_parsers(commands, with_db)
    audit = commands.add_parser(
        "audit", help="consent and link changes with their origin"
    ).add_subparsers(dest="action", required=True)
    alist = with_db(audit.add_parser("list", help="one JSON object per change, oldest first"))
    alist.add_argument("--customer", help="only changes naming this id (either side)")
    alist.add_argument("--limit", type=int, default=1000)
    for action, text in (
        ("undo", "undo an applied change (a link is removed) or dismiss a held one"),
        ("apply", "apply a held, refused or undone change"),
    ):
        decide = with_db(audit.add_parser(action, help=text))
        decide.add_argument("id", type=int, help="the change's id from audit list")
        decide.add_argument("--by", default="operator", help="who decides (kept in the trail)")

    with_db(commands.add_parser("stats", help="print one JSON object of counts"))
    with_db(commands.add_parser("migrate", help="bring the schema up to date and exit"))
    for add_command in (_fleet_command, _ingest_command):
        add_command(commands, with_db)
    return parser


def _extra_parsers(
    commands: Any, with_db: Callable[[argparse.ArgumentParser], argparse.ArgumentParser]
) -> None:
    """The command groups kept in their own modules."""
    model_parsers(commands, with_db)
    partition_parsers(commands, with_db)
    announce_parser(commands, with_db)


def _ingest_command(
    commands: Any, with_db: Callable[[argparse.ArgumentParser], argparse.ArgumentParser]
) -> None:
    ingest = with_db(
        commands.add_parser(
            "ingest", help="NATS JetStream to the database: durable pull consumer workers"
        )
    )
    ingest.add_argument(
        "--from", dest="nats_url", required=True, help="nats://HOST:PORT[,nats://...]"
    )
    ingest.add_argument(
        "--creds", default="", help="a NATS .creds file (default: the nats-creds credential)"
    )
    ingest.add_argument("--user", default="", help="NATS user ($CUSTOMER_STORE_NATS_PASSWORD)")
    ingest.add_argument(
        "--shards",
        type=int,
        default=4,  # nats_shards.DEFAULT_SHARDS (not imported: nats-py is the [store] extra's)
        help="shard streams EDGE_EVENTS_<k>; the hub's mapping must say the same "
        "(0: one stream EDGE_EVENTS, no mapping; default %(default)s)",
    )
    ingest.add_argument(
        "--shard",
        type=int,
        action="append",
        default=[],
        help="drain only this shard (repeatable; default: every shard)",
    )
    ingest.add_argument("--tls-ca", default="", help="CA bundle for tls:// servers")
    ingest.add_argument("--workers", type=int, default=1, help="pull loops in this process")
    ingest.add_argument("--batch", type=int, default=500, help="messages per fetch")
    ingest.add_argument(
        "--replicas",
        type=int,
        default=0,
        help="a new stream's replicas (0: R3 on a cluster, R1 alone)",
    )
    ingest.add_argument("--ack-wait-s", type=float, default=30.0)
    ingest.add_argument("--pool-size", type=int, default=4, help="PostgreSQL connections")


def _credential(name: str) -> str:
    """A systemd credential (``LoadCredential=NAME:PATH``); absent or empty: ""."""
    directory = os.environ.get("CREDENTIALS_DIRECTORY")
    if not directory:
        return ""
    try:
        return (Path(directory) / name).read_text("utf-8").strip()
    except FileNotFoundError:
        return ""


def _ingest(args: argparse.Namespace) -> int:
    """``customer-store ingest``; exit 2 when the hub's shard layout disagrees (a restart
    would not help: systemd's unit stops on 2)."""
    from cloud_sync.store.nats_ingest import IngestSettings, ShardLayoutError, run_ingest

    # Secrets from the unit's LoadCredential= first, so they stay off the command line.
    db = _credential("db-url") if args.db == _default_db() else args.db
    creds_path = Path(os.environ.get("CREDENTIALS_DIRECTORY", "/nonexistent")) / "nats-creds"
    creds = args.creds or (str(creds_path) if _credential("nats-creds") else "")
    try:
        settings = IngestSettings(
            url=args.nats_url,
            creds=creds,
            user=args.user,
            password=_credential("nats-password")
            or os.environ.get("CUSTOMER_STORE_NATS_PASSWORD", ""),
            token=_credential("nats-token") or os.environ.get("CUSTOMER_STORE_NATS_TOKEN", ""),
            tls_ca=args.tls_ca,
            shards=args.shards,
            pinned=tuple(args.shard),
            replicas=args.replicas,
            batch=args.batch,
            ack_wait_s=args.ack_wait_s,
        )
        asyncio.run(
            run_ingest(db or args.db, settings, pool_size=args.pool_size, workers=args.workers)
        )
    except ShardLayoutError as exc:
        print(f"customer-store: error: {exc}", file=sys.stderr)
        return 2
    return 0


def _default_db() -> str:
    return os.environ.get("CUSTOMER_STORE_DB", DEFAULT_DB)


def _fleet_command(
    commands: Any, with_db: Callable[[argparse.ArgumentParser], argparse.ArgumentParser]
) -> None:
    fleet_command = with_db(
        commands.add_parser("fleet", help="the latest heartbeat of every agent, stale ones first")
    )
    fleet_command.add_argument("--json", action="store_true", help="one JSON object per agent")
    fleet_command.add_argument(
        "--stale-after-s",
        type=float,
        default=fleet.DEFAULT_STALE_AFTER_S,
        help="an agent silent this long is stale (default %(default)s)",
    )


def _credential_commands(
    group: Any,
    kind: str,
    with_db: Callable[[argparse.ArgumentParser], argparse.ArgumentParser],
) -> None:
    listing = with_db(group.add_parser("list", help=f"{kind} credentials, without secrets"))
    listing.add_argument("--all", action="store_true", help="include revoked ones")
    revoke = with_db(group.add_parser("revoke", help=f"revoke a {kind} credential now"))
    revoke.add_argument("--id", required=True, type=int, help="the id `list` shows")
    rotate = with_db(
        group.add_parser(
            "rotate", help=f"replace a {kind} credential; the new secret is the last line"
        )
    )
    rotate.add_argument("--id", required=True, type=int, help="the id `list` shows")
    rotate.add_argument(
        "--grace-s",
        type=float,
        default=0.0,
        help="keep the old secret valid this many seconds (default 0: revoked at once)",
    )


def _credential_command(args: argparse.Namespace) -> Callable[[Backend], Awaitable[str]] | None:
    """list / revoke / rotate for the kind named by the command (token = agent)."""
    kind = _KINDS[args.command]
    if args.action == "list":

        async def listing(b: Backend) -> str:
            now = datetime.now(UTC)
            rows = [
                c.as_json()
                for c in await auth.list_credentials(b, kind)
                if args.all or c.revoked_at is None or c.revoked_at > now
            ]
            return "\n".join(json.dumps(row, sort_keys=True) for row in rows)

        return listing
    if args.action == "revoke":

        async def revoke(b: Backend) -> str:
            at = await auth.revoke_credential(b, kind, args.id)
            return f"revoked {kind} credential id={args.id} at={format_ts(at)}"

        return revoke
    if args.action == "rotate":
        if not 0 <= args.grace_s <= _MAX_GRACE_S:
            raise auth.CredentialError(f"--grace-s must be within 0..{_MAX_GRACE_S:.0f}")
        grace = timedelta(seconds=args.grace_s)
        return lambda b: auth.rotate_credential(b, kind, args.id, grace=grace)
    return None


async def _with_backend(url: str, work: Callable[[Backend], Awaitable[str]]) -> str:
    backend = await open_backend(url, pool_size=1)
    try:
        return await work(backend)
    finally:
        await backend.close()


def _command(args: argparse.Namespace) -> Callable[[Backend], Awaitable[str]]:
    """The work of a one-shot command; it returns the text to print on stdout."""
    command = (args.command, getattr(args, "action", None))
    if command[0] in ("token", "partner", "admin", "channel") and command[1] != "create":
        work = _credential_command(args)
        if work is not None:
            return work
    if command == ("token", "create"):
        name = args.name or f"agent-{args.store}"
        return lambda b: auth.create_credential(b, "agent", name=name, store_id=args.store)
    if command == ("partner", "create"):
        scopes = sorted(set(args.scope))
        return lambda b: auth.create_credential(b, "partner", name=args.name, scopes=scopes)
    if command == ("admin", "create"):
        return lambda b: auth.create_credential(b, "admin", name=args.name)
    if command == ("channel", "create"):
        return lambda b: auth.create_credential(b, "channel", name=args.name)
    if command[0] in ("model", "training"):
        return model_command(args)
    if command[0] == "partitions":
        return partition_command(args)
    if command == ("audit", "list"):

        async def audit_list(b: Backend) -> str:
            changes = await b.audit(args.customer, args.limit)
            return "\n".join(json.dumps(c.as_json(), sort_keys=True) for c in changes)

        return audit_list
    if command in (("audit", "undo"), ("audit", "apply")):

        async def audit_decide(b: Backend) -> str:
            now = datetime.now(UTC)
            change = await b.decide_change(args.id, args.action, f"admin:{args.by}", now)
            return json.dumps(change.as_json(), sort_keys=True)

        return audit_decide
    if command[0] == "fleet":

        async def fleet_list(b: Backend) -> str:
            entries = fleet.fleet_view(await b.heartbeats(), datetime.now(UTC), args.stale_after_s)
            if args.json:
                return "\n".join(json.dumps(e, sort_keys=True) for e in entries)
            return fleet.table(entries)

        return fleet_list
    if command[0] == "stats":

        async def stats(b: Backend) -> str:
            return json.dumps((await b.stats()).as_json(), sort_keys=True)

        return stats

    async def migrate(b: Backend) -> str:
        del b  # opening the backend applied the migrations
        return "schema up to date"

    return migrate


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        stream=sys.stderr,
        format="%(levelname)s %(name)s %(message)s",
    )
    try:
        if (args.command, getattr(args, "action", None)) == ("model", "sign"):
            record, _ = read_model_dir(args.dir, load_private_key(args.signing_key))
            write_manifest(args.dir, record.manifest)
            print(f"signed version={record.version} sha256={record.sha256}")
            return 0
        if (args.command, getattr(args, "action", None)) == ("model", "keygen"):
            public = write_new_key(args.out)
            print(f"private key written to {args.out}; agents' [model] public_key:")
            print(public)
            return 0
        if args.command == "serve":
            limits = Limits(
                max_body_bytes=args.max_body_bytes,
                max_events=args.max_events,
                max_decoded_bytes=args.max_decoded_bytes,
                max_envelope_bytes=args.max_envelope_bytes,
                max_depth=args.max_depth,
                max_future_skew_s=args.max_future_skew_s,
                max_concurrent_ingests=args.max_concurrent_ingests,
            )
            asyncio.run(
                serve(
                    args.db,
                    args.host,
                    args.port,
                    limits=limits,
                    pool_size=args.pool_size,
                    access_log=args.access_log,
                    reuse_port=args.reuse_port,
                    stale_after_s=args.stale_after_s,
                    feed_settings=FeedSettings(
                        poll_s=args.feed_poll_s, heartbeat_s=args.feed_heartbeat_s
                    ),
                    rollout_check_s=args.rollout_check_s,
                    min_shown=args.min_shown,
                )
            )
            return 0
        if args.command == "ingest":
            return _ingest(args)
        if args.command == "announce":
            run_announce_command(args)
            return 0
        output = asyncio.run(_with_backend(args.db, _command(args)))
    except (StoreError, auth.CredentialError, ModelSignatureError) as exc:
        print(f"customer-store: error: {exc}", file=sys.stderr)
        return 1
    print(output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
