"""The partners' live feed: a real store process, a real SSE client (httpx-sse), both backends."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
from cstore_helpers import envelope
from httpx_sse import aconnect_sse
from sync_helpers import StoreProcess, store_cli

from cloud_sync.store.db_postgres import FEED_LOCK

PSEUDONYM = "ps-" + "cd" * 16
Received = list[tuple[str, dict[str, Any]]]


@pytest.fixture
def store(db_url: str, tmp_path: Path) -> Iterator[StoreProcess]:
    process = StoreProcess(
        db_url,
        tmp_path / "store.log",
        extra=("--feed-poll-s", "0.05", "--feed-heartbeat-s", "0.2", "--rollout-check-s", "0"),
    )
    process.start()
    try:
        yield process
    finally:
        process.stop()


def consent(customer_id: str, offset_s: float, *, partner: bool) -> dict[str, Any]:
    flags = {"personalization": True, "profile_sharing": True, "partner_sharing": partner}
    return envelope("consent.update", customer_id=customer_id, offset_s=offset_s, data=flags)


def pickups(customer_id: str, start: int, count: int) -> list[dict[str, Any]]:
    return [
        envelope("product.pickup", customer_id=customer_id, offset_s=start + i, data={"sku": "S"})
        for i in range(count)
    ]


async def post(store: StoreProcess, token: str, events: list[dict[str, Any]]) -> None:
    async with httpx.AsyncClient(timeout=10) as http:
        response = await http.post(
            f"{store.url}/v1/events",
            content=json.dumps(events),
            headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
        )
    assert response.status_code == 200
    assert response.json()["rejected"] == []


async def read_feed(
    store: StoreProcess,
    key: str,
    done: Callable[[Received], bool],
    *,
    after: str | None = None,
    last_event_id: str | None = None,
    within_s: float = 20.0,
) -> Received:
    """Read the feed until ``done`` holds, then disconnect; bounded in time."""
    headers = {"Authorization": f"Bearer {key}"}
    if last_event_id is not None:
        headers["Last-Event-ID"] = last_event_id
    url = f"{store.url}/v1/feed" + (f"?after={after}" if after is not None else "")
    received: Received = []
    async with (
        asyncio.timeout(within_s),
        httpx.AsyncClient(timeout=httpx.Timeout(10, read=within_s)) as http,
        aconnect_sse(http, "GET", url, headers=headers) as source,
    ):
        assert source.response.status_code == 200
        assert source.response.headers["content-type"].startswith("text/event-stream")
        if done(received):
            return received
        async for message in source.aiter_sse():
            assert message.event == "envelope"
            received.append((message.id, json.loads(message.data)))
            if done(received):
                break
    return received


def at_least(count: int) -> Callable[[Received], bool]:
    return lambda received: len(received) >= count


async def test_feed_sends_consented_events_resumes_without_gap_and_stops_on_withdrawal(
    store: StoreProcess,
) -> None:
    agent = store_cli(store.db_url, "token", "create", "--store", "store-001")
    key = store_cli(store.db_url, "partner", "create", "--name", "acme", "--scope", "events:read")
    first = [
        consent("c-yes", 0, partner=True),
        *pickups("c-yes", 1, 5),
        consent("c-no", 0, partner=False),
        *pickups("c-no", 1, 3),
        *pickups("c-none", 1, 2),  # no consent record
        consent(PSEUDONYM, 0, partner=True),  # pseudonymised: never, whatever it says
        *pickups(PSEUDONYM, 1, 2),
        envelope("telemetry", customer_id=None, offset_s=2),
    ]
    await post(store, agent, first)
    expected_first = [e["event_id"] for e in first if e["customer_id"] == "c-yes"]
    got = await read_feed(store, key, lambda r: len(r) == len(expected_first))
    # Store order (PostgreSQL stores a batch in event_id order): compare as sorted lists.
    assert sorted(e["event_id"] for _, e in got) == sorted(expected_first)
    assert [int(i) for i, _ in got] == sorted(int(i) for i, _ in got)

    # Disconnected; more arrives; the client resumes from its last id: nothing lost or repeated.
    second = pickups("c-yes", 10, 4)
    await post(store, agent, second)
    resumed = await read_feed(store, key, lambda r: len(r) >= 4, last_event_id=got[-1][0])
    assert sorted(e["event_id"] for _, e in resumed) == sorted(e["event_id"] for e in second)
    again = await read_feed(store, key, lambda r: len(r) >= 4, after=got[-1][0])
    assert again == resumed

    # The customer withdraws partner sharing: from then on none of their events is sent.
    withdrawal = [consent("c-yes", 20, partner=False), *pickups("c-yes", 21, 3)]
    marker = [consent("c-later", 30, partner=True), *pickups("c-later", 31, 1)]
    await post(store, agent, withdrawal)
    await post(store, agent, marker)
    tail = await read_feed(store, key, lambda r: len(r) >= 2, after=resumed[-1][0])
    assert [e["customer_id"] for _, e in tail] == ["c-later", "c-later"]
    # Resolved when sent: replaying from the start no longer sends the withdrawn customer.
    replay = await read_feed(store, key, lambda r: len(r) >= 2, after="0")
    assert {e["customer_id"] for _, e in replay} == {"c-later"}


async def test_feed_scope_cursor_and_heartbeat(store: StoreProcess) -> None:
    aggregates = store_cli(
        store.db_url, "partner", "create", "--name", "b", "--scope", "aggregates:read"
    )
    key = store_cli(store.db_url, "partner", "create", "--name", "c", "--scope", "events:read")
    async with httpx.AsyncClient(timeout=10) as http:
        url = f"{store.url}/v1/feed"
        assert (await http.get(url)).status_code == 401
        denied = await http.get(url, headers={"Authorization": f"Bearer {aggregates}"})
        assert denied.status_code == 403
        bad = await http.get(url + "?after=-1", headers={"Authorization": f"Bearer {key}"})
        assert bad.status_code == 400
        # An idle feed sends comment lines, which keep proxies from closing it.
        lines: list[str] = []
        async with (
            asyncio.timeout(10),
            http.stream("GET", url, headers={"Authorization": f"Bearer {key}"}) as response,
        ):
            async for line in response.aiter_lines():
                lines.append(line)
                if line == ": heartbeat":
                    break
    assert ": heartbeat" in lines


async def test_a_reader_reconnecting_during_concurrent_ingests_misses_and_repeats_nothing(
    store: StoreProcess,
) -> None:
    stores = [f"store-{n:03d}" for n in range(1, 5)]
    tokens = {s: store_cli(store.db_url, "token", "create", "--store", s) for s in stores}
    key = store_cli(store.db_url, "partner", "create", "--name", "d", "--scope", "events:read")
    grants = [
        dict(consent(f"c-{s}", 0, partner=True), store_id=s, source=f"mqtt:{s}") for s in stores
    ]
    for grant in grants:
        await post(store, tokens[grant["store_id"]], [grant])
    batches = [
        [dict(e, store_id=s, source=f"mqtt:{s}") for e in pickups(f"c-{s}", 100 + round_ * 10, 10)]
        for round_ in range(6)
        for s in stores
    ]
    expected = sorted(e["event_id"] for batch in [grants, *batches] for e in batch)

    async def ingest_one(store_id: str) -> None:
        for batch in batches:  # one at a time per store, the stores at once
            if batch[0]["store_id"] == store_id:
                await post(store, tokens[store_id], batch)

    async def ingest() -> None:
        await asyncio.gather(*(ingest_one(s) for s in stores))

    async def read() -> list[str]:
        seen: list[str] = []
        cursor: str | None = None
        for _ in range(200):  # bounded: each round reads a few events and reconnects
            if len(seen) >= len(expected):
                break
            got = await read_feed(
                store,
                key,
                at_least(min(7, len(expected) - len(seen))),
                last_event_id=cursor,
            )
            seen += [e["event_id"] for _, e in got]
            cursor = got[-1][0] if got else cursor
        return seen

    _, seen = await asyncio.gather(ingest(), read())
    assert len(seen) == len(set(seen))
    assert sorted(seen) == expected


async def test_postgres_feed_waits_for_an_ingest_in_flight_instead_of_skipping_it(
    pg_url: str, tmp_path: Path
) -> None:
    """Identity values are drawn before commit: an ingest still open holds a lower seq than a
    batch committed after it. The feed must not move its cursor past the open one."""
    store = StoreProcess(
        pg_url, tmp_path / "store.log", extra=("--feed-poll-s", "0.05", "--rollout-check-s", "0")
    )
    store.start()
    try:
        agent = store_cli(pg_url, "token", "create", "--store", "store-001")
        key = store_cli(pg_url, "partner", "create", "--name", "e", "--scope", "events:read")
        await post(store, agent, [consent("c-slow", 0, partner=True)])
        slow = pickups("c-slow", 1, 1)[0]
        # A slow ingest, as the store's own ingest runs it: the shared feed lock, then a row.
        with psycopg.connect(pg_url) as conn:
            conn.execute("SELECT pg_advisory_xact_lock_shared(%s)", (FEED_LOCK,))
            conn.execute(
                "INSERT INTO events (event_id, type, ts, store_id, customer_id, source, schema,"
                " data) VALUES (%s, 'product.pickup', %s, 'store-001', 'c-slow', 'mqtt:x', 1,"
                ' \'{"sku": "S"}\')',
                (slow["event_id"], slow["ts"]),
            )
            fast = pickups("c-slow", 2, 1)
            posting = asyncio.create_task(post(store, agent, fast))
            reading = asyncio.create_task(read_feed(store, key, at_least(3)))
            await asyncio.sleep(1.0)  # the fast batch commits meanwhile (or waits its turn)
            conn.commit()
            await posting
            seen = await reading
    finally:
        store.stop()
    # Without the high-water mark the reader took the fast batch first, moved past the slow
    # row's lower seq, never sent it and timed out here.
    assert [e["event_id"] for _, e in seen[1:]] == [slow["event_id"], fast[0]["event_id"]]


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
async def test_a_connected_partner_does_not_hold_up_the_shutdown(
    db_url: str, tmp_path: Path
) -> None:
    store = StoreProcess(db_url, tmp_path / "store.log", extra=("--rollout-check-s", "0"))
    store.start()
    key = store_cli(db_url, "partner", "create", "--name", "f", "--scope", "events:read")
    try:
        headers = {"Authorization": f"Bearer {key}"}
        async with (
            asyncio.timeout(20),
            httpx.AsyncClient(timeout=20) as http,
            http.stream("GET", f"{store.url}/v1/feed", headers=headers) as response,
        ):
            lines = response.aiter_lines()
            assert await anext(lines) == ": feed open"
            assert store.proc is not None
            store.proc.terminate()
            # The store ends the stream itself; the client sees the end of the body.
            rest = [line async for line in lines]
            code = await asyncio.to_thread(store.proc.wait, 8)
    finally:
        store.stop()
    assert code == 0
    assert all(line == "" or line.startswith(":") for line in rest)
    assert "reason=shutdown" in (tmp_path / "store.log").read_text()
