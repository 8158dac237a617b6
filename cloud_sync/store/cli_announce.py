"""``customer-store announce --db URL --to nats://...``: the NATS downlink's publisher.

Split from ``cli`` (which wires every command); the loop is ``nats_announce``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
from collections.abc import Callable
from typing import Any


def announce_parser(
    commands: Any, with_db: Callable[[argparse.ArgumentParser], argparse.ArgumentParser]
) -> None:
    announce = with_db(
        commands.add_parser(
            "announce",
            help="publish erasures and model rollouts to each store's NATS downlink subjects",
        )
    )
    announce.add_argument("--to", dest="nats_url", required=True, help="nats://HOST:PORT[,...]")
    announce.add_argument("--creds", default="", help="a NATS .creds file")
    announce.add_argument("--user", default="", help="NATS user ($CUSTOMER_STORE_NATS_PASSWORD)")
    announce.add_argument("--tls-ca", default="", help="CA bundle for tls:// servers")
    announce.add_argument("--interval-s", type=float, default=1.0, help="between two reads")
    announce.add_argument(
        "--replicas", type=int, default=0, help="a new stream's replicas (0: R3 on a cluster)"
    )
    announce.add_argument(
        "--max-per-subject",
        type=int,
        default=10_000,
        help="notices kept per store and kind (older ones: agents catch up over HTTP)",
    )
    announce.add_argument("--pool-size", type=int, default=2, help="PostgreSQL connections")


def run_announce_command(args: argparse.Namespace) -> None:
    from cloud_sync.store.nats_announce import AnnounceSettings, run_announce  # [store] extra

    settings = AnnounceSettings(
        url=args.nats_url,
        creds=args.creds,
        user=args.user,
        password=os.environ.get("CUSTOMER_STORE_NATS_PASSWORD", ""),
        token=os.environ.get("CUSTOMER_STORE_NATS_TOKEN", ""),
        tls_ca=args.tls_ca,
        replicas=args.replicas,
        interval_s=args.interval_s,
        max_msgs_per_subject=args.max_per_subject,
    )
    asyncio.run(run_announce(args.db, settings, pool_size=args.pool_size))
