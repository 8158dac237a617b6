"""The hub's event streams: N shards by a hash of the store id (issue 14), or one stream.

Agents publish to ``edge.events.<store_id>``, unchanged. Every hub server maps that subject
in its account to ``edge.shard.<k>.<store_id>`` with NATS's own deterministic partition:

    mappings { "edge.events.*": "edge.shard.{{partition(N,1)}}.{{wildcard(1)}}" }

``k`` = FNV-1a (32 bit) of the store id's bytes, modulo N (nats-server's ``partition``;
``shard_of`` computes the same, checked against a real server). Stream ``EDGE_EVENTS_<k>``
holds ``edge.shard.<k>.*``: one store always lands in one stream, so JetStream's duplicate
window (``Nats-Msg-Id``) keeps working per shard, and the store id is still the subject's
last token. The mapping lives only on the hub (a leaf node's messages are mapped when they
enter the hub's account), so agents and leaf nodes need no change.

N is a setting of the hub (the mapping) and of the workers (``--shards``); they must agree.
A worker checks at start: it publishes probe messages to ``edge.events._shardprobe-<i>``
(store ids never start with ``_``) and compares the stream each PubAck names with
``shard_of``. A hub that maps to another N, or not at all, is refused with
``ShardLayoutError``. Workers acknowledge probes without storing them.

``shards = 0`` is the unsharded layout: one stream ``EDGE_EVENTS`` on ``edge.events.>`` and no
mapping (a single small server). Streams left over from an earlier layout (``EDGE_EVENTS``,
or ``EDGE_EVENTS_<k>`` with k >= N after N shrank) are drained by unpinned workers until a
person removes them (docs/scaling.md, "Resharding").
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Final, TypeVar

import nats.errors
import nats.js.api
import nats.js.errors
from nats.js import JetStreamContext
from nats.js.api import RetentionPolicy, StorageType, StreamConfig

from cloud_sync.store.errors import StoreError

log = logging.getLogger(__name__)

STREAM: Final = "EDGE_EVENTS"
SUBJECT_PREFIX: Final = "edge.events"
SHARD_SUBJECT_PREFIX: Final = "edge.shard"
# Four streams: leaders spread over a three-node cluster (each node leads one or two), four
# times the ~20k msg/s reported for one stream (nats-server #8612) while a 5,000-store fleet
# offers ~10k msg/s at peak (docs/scaling.md), and one pull loop per shard per worker stays cheap.
DEFAULT_SHARDS: Final = 4
MAX_SHARDS: Final = 256
PROBE_PREFIX: Final = "_shardprobe-"
PROBES: Final = 32  # a mapping to M != N passes all 32 by chance with odds of 2^-32 at most
# Resends inside this window are dropped by JetStream itself (Nats-Msg-Id); later ones by
# the store's (store_id, event_id) key. Ten minutes covers an agent's retries of a batch
# whose PubAcks were lost, and keeps the server's id index small.
DUPLICATE_WINDOW_S: Final = 600.0
_NOT_CLUSTERED: Final = 10074  # JetStream: "replicas > 1 not supported in non-clustered mode"
_NAME_IN_USE: Final = 10058  # "stream name already in use with a different configuration"
_PROBE_TIMEOUT_S: Final = 5.0
_SETTLE_S: Final = 15.0
# A cluster that just started (or lost a node) answers the JetStream API slowly while it
# elects leaders: retry that long before giving up (then systemd restarts the worker).
_START_WITHIN_S: Final = 90.0

T = TypeVar("T")


class ShardLayoutError(StoreError):
    """The workers' shard count and the hub's streams or subject mapping disagree."""


class HubUnavailableError(StoreError):
    """The hub's JetStream API did not answer in time (a transient fault: start again)."""


async def patiently(what: str, call: Callable[[], Awaitable[T]]) -> T:
    """``call()``, retried with backoff while JetStream times out or is unavailable."""
    deadline = time.monotonic() + _START_WITHIN_S
    delay = 0.5
    while True:
        try:
            return await call()
        except (nats.errors.TimeoutError, nats.js.errors.ServiceUnavailableError) as exc:
            if time.monotonic() + delay > deadline:
                raise HubUnavailableError(
                    f"{what}: no answer within {_START_WITHIN_S:.0f}s: {exc}"
                ) from exc
            log.warning("ingest.start.retry what=%s detail=%s", what, type(exc).__name__)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)


@dataclass(frozen=True)
class StreamRef:
    """One stream a worker drains, with the subject filter of its consumer."""

    name: str
    subject: str


def fnv1a_32(data: bytes) -> int:
    value = 0x811C9DC5
    for byte in data:
        value = ((value ^ byte) * 0x01000193) & 0xFFFFFFFF
    return value


def shard_of(store_id: str, shards: int) -> int:
    """The shard nats-server's ``{{partition(shards,1)}}`` gives ``edge.events.<store_id>``."""
    return fnv1a_32(store_id.encode("utf-8")) % shards


def shard_stream(base: str, shard: int) -> str:
    return f"{base}_{shard}"


def shard_subjects(shard_prefix: str, shard: int) -> str:
    return f"{shard_prefix}.{shard}.*"


def server_mapping(shards: int, prefix: str = SUBJECT_PREFIX, shard_prefix: str = "") -> str:
    """The ``mappings`` block every hub server's account needs for ``shards`` streams."""
    target = f"{shard_prefix or SHARD_SUBJECT_PREFIX}.{{{{partition({shards},1)}}}}"
    return f'mappings {{\n  "{prefix}.*": "{target}.{{{{wildcard(1)}}}}"\n}}\n'


def is_probe(store_id: str) -> bool:
    return store_id.startswith(PROBE_PREFIX)


async def ensure_streams(
    js: JetStreamContext,
    *,
    base: str,
    prefix: str,
    shard_prefix: str,
    shards: int,
    replicas: int,
) -> int:
    """Create the layout's streams unless they exist (several workers may race: the
    server takes one identical create, and a lost race is read back); return the replicas
    of the first stream."""
    if shards == 0:
        return await _ensure_one(js, base, f"{prefix}.>", "edge events, unsharded", replicas)
    found = [
        await _ensure_one(
            js,
            shard_stream(base, shard),
            shard_subjects(shard_prefix, shard),
            f"edge events shard {shard}: stores whose id hashes to {shard} (FNV-1a mod N)",
            replicas,
        )
        for shard in range(shards)
    ]
    return found[0]


async def _ensure_one(
    js: JetStreamContext, name: str, subject: str, description: str, replicas: int
) -> int:
    try:
        info = await patiently(f"stream info {name}", lambda: js.stream_info(name))
    except nats.js.errors.NotFoundError:
        pass
    else:
        return int(info.config.num_replicas or 1)
    for count in [replicas] if replicas else [3, 1]:
        config = StreamConfig(
            name=name,
            description=description,
            subjects=[subject],
            retention=RetentionPolicy.WORK_QUEUE,  # a message leaves once a worker acked it
            storage=StorageType.FILE,
            num_replicas=count,
            duplicate_window=DUPLICATE_WINDOW_S,
        )
        try:
            await patiently(f"create stream {name}", lambda: js.add_stream(config))  # noqa: B023
        except nats.js.errors.APIError as exc:
            if exc.err_code == _NOT_CLUSTERED and count > 1 and not replicas:
                continue  # a single server: R1
            if exc.err_code == _NAME_IN_USE:  # another worker created it first
                info = await patiently(f"stream info {name}", lambda: js.stream_info(name))
                return int(info.config.num_replicas or 1)
            raise
        log.info("ingest.stream.created stream=%s subject=%s replicas=%d", name, subject, count)
        return count
    raise AssertionError("unreachable: R1 is always tried last")


async def check_layout(js: JetStreamContext, *, base: str, prefix: str, shards: int) -> None:
    """Publish ``PROBES`` probe messages; refuse a hub that routes them elsewhere than
    ``shard_of`` says: another N in its mapping, no mapping, or a mapping where --shards 0
    expects none."""
    expected = {
        f"{PROBE_PREFIX}{index}": (
            shard_stream(base, shard_of(f"{PROBE_PREFIX}{index}", shards)) if shards else base
        )
        for index in range(PROBES)
    }

    mode = f"--shards {shards}" if shards else "--shards 0 (one stream, no mapping)"
    # A stream created a moment ago on a cluster may not take messages on every node yet:
    # "no stream" is trusted only after _SETTLE_S; a wrong stream is final at once.
    deadline = time.monotonic() + _SETTLE_S
    pending = dict(expected)
    while True:
        results = await patiently("layout probe", lambda: _publish_probes(js, prefix, pending))
        for (probe, stream), result in zip(list(pending.items()), results, strict=True):
            if isinstance(result, nats.js.api.PubAck):
                if result.stream != stream:
                    raise ShardLayoutError(
                        f"this worker runs {mode}, but the hub put {prefix}.{probe} into "
                        f"stream {result.stream}, not {stream}: the hub's subject mapping and "
                        '--shards disagree (docs/scaling.md, "Resharding")'
                    )
                del pending[probe]
        if not pending:
            return
        if time.monotonic() > deadline:
            raise ShardLayoutError(
                f"this worker runs {mode}, but no stream took {prefix}.{next(iter(pending))}: "
                f"the hub maps {prefix}.* to more shards than that, or to none; every hub "
                'server needs the same mapping as the workers (docs/scaling.md, "Sharded '
                'streams and workers")'
            )
        await asyncio.sleep(0.5)


async def _publish_probes(
    js: JetStreamContext, prefix: str, probes: dict[str, str]
) -> list[nats.js.api.PubAck | None]:
    """One PubAck per probe, or None where no stream took it; a timeout is raised (retried)."""
    sends = [js.publish(f"{prefix}.{probe}", b"", timeout=_PROBE_TIMEOUT_S) for probe in probes]
    results = await asyncio.gather(*sends, return_exceptions=True)
    found: list[nats.js.api.PubAck | None] = []
    for result in results:
        if isinstance(result, nats.js.errors.NoStreamResponseError):
            found.append(None)
        elif isinstance(result, BaseException):
            raise result  # a timeout says nothing yet (retried); anything else is a bug
        else:
            found.append(result)
    return found


async def leftover_streams(
    js: JetStreamContext, *, base: str, prefix: str, shard_prefix: str, shards: int
) -> list[StreamRef]:
    """Streams of an earlier layout that may still hold events: drained, never deleted."""
    pattern = re.compile(rf"^{re.escape(base)}_(\d+)$")
    found = []
    for info in await patiently("stream list", js.streams_info):
        name = info.config.name or ""
        match = pattern.match(name)
        if name == base and shards:
            found.append(StreamRef(name, f"{prefix}.>"))
        elif match and (shards == 0 or int(match.group(1)) >= shards):
            found.append(StreamRef(name, shard_subjects(shard_prefix, int(match.group(1)))))
    for ref in found:
        log.warning(
            "ingest.stream.leftover stream=%s detail=drained until empty; remove it once "
            "every hub server maps to %d shards",
            ref.name,
            shards,
        )
    return found
