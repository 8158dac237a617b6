from __future__ import annotations

import asyncio
import json
import sqlite3
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edge_agent.buffer import Buffer
from edge_agent.buffer.erasure import erase_customer
from edge_agent.buffer.inspect import iter_envelopes, open_read_only, stats
from edge_agent.buffer.reads import CUSTOMER, TELEMETRY
from edge_agent.config import BufferSection
from edge_agent.events import Event, Rejected
from edge_agent.governance import ConsentRecord

TS = "2026-11-22T08:00:00.000Z"


def event(
    n: int,
    *,
    customer: bool = True,
    customer_id: str | None = "c-1",
    size: int = 0,
    event_type: str | None = None,
    data: dict[str, object] | None = None,
    ts: str = TS,
) -> Event:
    kind = event_type or ("product.pickup" if customer else "telemetry")
    payload = (
        data
        if data is not None
        else (
            {"sku": f"SKU-{n}", "pad": "x" * size}
            if customer
            else {"values": {"t": n, "pad": "x" * size}}
        )
    )
    return Event(
        f"ev-{n:08d}",
        kind,
        ts,
        "store-1",
        "dev-1",
        customer_id if customer else None,
        "mqtt:test",
        payload,
        TS,
        customer=customer,
    )


async def open_buffer(path: Path, **settings: object) -> Buffer:
    return await Buffer.open(path, BufferSection(**settings))  # type: ignore[arg-type]


async def test_commit_is_durable_and_duplicates_are_stored_once(tmp_path: Path) -> None:
    path = tmp_path / "buffer.db"
    async with await open_buffer(path) as buffer:
        await buffer.commit([event(1), event(2)])
        await buffer.commit([event(2), event(3)])  # a redelivery of 2
        assert buffer.counters.committed == 3
        assert buffer.counters.duplicates == 1
    async with await open_buffer(path) as reopened:
        assert reopened.counters.total == 3
        assert reopened.counters.pending == 3
    with open_read_only(path) as connection:
        exported = [json.loads(line) for line in iter_envelopes(connection)]
    assert [e["event_id"] for e in exported] == ["ev-00000001", "ev-00000002", "ev-00000003"]
    assert exported[0]["data"] == {"sku": "SKU-1", "pad": ""}


async def test_migrations_are_recorded_once(tmp_path: Path) -> None:
    path = tmp_path / "buffer.db"
    for _ in range(2):
        async with await open_buffer(path):
            pass
    with sqlite3.connect(path) as connection:
        rows = connection.execute("SELECT version, name FROM _migrations").fetchall()
        mode = connection.execute("PRAGMA journal_mode").fetchone()[0]
    assert rows == [(1, "0001_initial"), (2, "0002_central_consent")]
    assert mode == "wal"


async def test_quarantine_keeps_reason_source_and_truncated_raw(tmp_path: Path) -> None:
    path = tmp_path / "buffer.db"
    async with await open_buffer(path, quarantine_raw_bytes=64, quarantine_max_rows=10) as buffer:
        await buffer.commit([], [Rejected("mqtt:t", "too_large", b"y" * 1000, "1000 bytes")])
        for n in range(15):
            await buffer.commit([], [Rejected("mqtt:t", "not_json", b"{" + str(n).encode())])
        assert buffer.counters.quarantined == {"too_large": 1, "not_json": 15}
    with sqlite3.connect(path) as connection:
        rows = connection.execute(
            "SELECT reason, raw, raw_len FROM quarantine ORDER BY id"
        ).fetchall()
        counters = dict(connection.execute("SELECT name, value FROM counters").fetchall())
    assert len(rows) == 10  # bounded by rows
    assert rows[-1] == ("not_json", b"{14", 3)
    assert counters["quarantine.not_json"] == 15
    assert counters["quarantine.too_large"] == 1
    async with await open_buffer(path, quarantine_raw_bytes=64) as buffer:
        await buffer.commit([], [Rejected("mqtt:t", "too_large", b"z" * 1000)])
    with sqlite3.connect(path) as connection:
        raw, raw_len = connection.execute(
            "SELECT raw, raw_len FROM quarantine ORDER BY id DESC LIMIT 1"
        ).fetchone()
    assert raw == b"z" * 64
    assert raw_len == 1000


async def test_latest_consent_by_event_time_wins(tmp_path: Path) -> None:
    path = tmp_path / "buffer.db"

    def consent(n: int, ts: str, personalization: bool) -> Event:
        return event(
            n,
            event_type="consent.update",
            ts=ts,
            data={
                "personalization": personalization,
                "profile_sharing": False,
                "partner_sharing": False,
            },
        )

    async with await open_buffer(path) as buffer:
        await buffer.commit([consent(1, "2026-11-22T08:00:02.000Z", True)])
        await buffer.commit([consent(2, "2026-11-22T08:00:01.000Z", False)])  # older, arrives late
        rows = await buffer._call(
            lambda c: c.execute(
                "SELECT customer_id, personalization, event_id FROM consent"
            ).fetchall()
        )
    assert rows == [("c-1", 1, "ev-00000001")]


async def test_damaged_file_is_moved_aside_and_a_fresh_one_opened(tmp_path: Path) -> None:
    path = tmp_path / "buffer.db"
    for attempt in range(3):
        path.write_bytes(b"this is not a database" * 1000)
        async with await open_buffer(path) as buffer:
            assert buffer.recovered_from is not None
            assert buffer.recovered_from.read_bytes().startswith(b"this is not")
            await buffer.commit([event(attempt)])
            assert buffer.counters.total == 1
    damaged = sorted(p.name for p in tmp_path.iterdir() if ".damaged-" in p.name)
    assert len([name for name in damaged if not name.endswith(("-wal", "-shm"))]) == 2  # pruned


async def test_corrupted_pages_are_detected(tmp_path: Path) -> None:
    path = tmp_path / "buffer.db"
    async with await open_buffer(path) as buffer:
        await buffer.commit([event(n, size=500) for n in range(300)])
    with sqlite3.connect(path) as connection:
        connection.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    data = bytearray(path.read_bytes())
    for offset in range(8192, len(data) - 4096, 4096):  # scribble over the middle of every page
        data[offset + 100 : offset + 300] = b"\x07" * 200
    path.write_bytes(bytes(data))
    async with await open_buffer(path) as buffer:
        assert buffer.recovered_from is not None
        record = buffer.counters.salvage
        assert record is not None
        assert record.files == {
            buffer.recovered_from.name: record.files[buffer.recovered_from.name]
        }
        # Every row is either salvaged into the fresh file or counted as unreadable.
        assert buffer.counters.total == record.salvaged
        assert record.salvaged + record.unreadable == 300
        assert record.unreadable > 0


async def test_budget_evicts_synced_then_telemetry_and_never_customer_events(
    tmp_path: Path,
) -> None:
    path = tmp_path / "buffer.db"
    max_bytes = 2 * 1024 * 1024
    async with await open_buffer(path, max_bytes=max_bytes) as buffer:
        customer = [event(n, size=200) for n in range(0, 2000)]
        await buffer.commit(customer[:1000])
        marked = await buffer.mark_synced(
            await buffer._call(lambda c: [r[0] for r in c.execute("SELECT seq FROM events")])
        )
        assert marked == 1000
        await buffer.commit(customer[1000:])
        telemetry = [event(n, customer=False, size=200) for n in range(10_000, 14_000)]
        for start in range(0, len(telemetry), 500):
            await buffer.commit(telemetry[start : start + 500])
        drops = buffer.counters.drops
        assert drops["synced_evicted"] == 1000  # all synced rows went first
        assert drops["telemetry_evicted_unsynced"] > 0
        remaining = await buffer._call(
            lambda c: dict(
                c.execute("SELECT customer, count(*) FROM events GROUP BY customer").fetchall()
            )
        )
        assert remaining[1] == 1000  # every unsynced customer event is still here
        kept_telemetry = await buffer._call(
            lambda c: [
                r[0]
                for r in c.execute("SELECT event_id FROM events WHERE customer = 0 ORDER BY seq")
            ]
        )
        assert kept_telemetry[-1] == "ev-00013999"  # the oldest telemetry went, the newest stayed
        assert kept_telemetry[0] > "ev-00010000"
        used = await buffer._call(lambda c: c.execute("PRAGMA page_count").fetchone()[0]) * 4096
        assert used <= max_bytes * 1.05


async def test_backpressure_holds_commits_until_sync_makes_room(tmp_path: Path) -> None:
    path = tmp_path / "buffer.db"
    async with await open_buffer(path, max_bytes=1024 * 1024) as buffer:
        n = 0
        while True:  # fill with unsynced customer events until a commit no longer returns
            batch = [event(n + i, size=400) for i in range(100)]
            n += 100
            try:
                await asyncio.wait_for(
                    asyncio.shield(pending := asyncio.ensure_future(buffer.commit(batch))),
                    timeout=1.0,
                )
            except TimeoutError:
                break
            assert n < 10_000, "the budget never pushed back"
        assert buffer.counters.backpressure is True
        assert not pending.done()
        held_ids = {e.event_id for e in batch}
        present = await buffer._call(
            lambda c: {r[0] for r in c.execute("SELECT event_id FROM events")}
        )
        assert not held_ids & present  # nothing of the held batch is acknowledged or written
        seqs = await buffer._call(
            lambda c: [r[0] for r in c.execute("SELECT seq FROM events ORDER BY seq LIMIT 1500")]
        )
        await buffer.mark_synced(seqs)  # the uploader's job: frees room by policy
        await asyncio.wait_for(pending, timeout=5.0)
        assert buffer.counters.backpressure is False
        present = await buffer._call(
            lambda c: {r[0] for r in c.execute("SELECT event_id FROM events")}
        )
        assert held_ids <= present


async def test_cancelled_commit_leaves_a_working_buffer(tmp_path: Path) -> None:
    path = tmp_path / "buffer.db"
    async with await open_buffer(path) as buffer:
        task = asyncio.create_task(buffer.commit([event(n) for n in range(2000)]))
        await asyncio.sleep(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await buffer.commit([event(5000)])
        total = await buffer._call(lambda c: c.execute("SELECT count(*) FROM events").fetchone()[0])
    assert total in (1, 2001)  # the cancelled batch is all there or not at all


async def test_erase_customer_removes_events_consent_and_quarantine(tmp_path: Path) -> None:
    path = tmp_path / "buffer.db"
    async with await open_buffer(path) as buffer:
        await buffer.commit(
            [
                event(1, customer_id="c-gone"),
                event(2, customer_id="c-stay"),
                event(
                    3,
                    event_type="consent.update",
                    customer_id="c-gone",
                    data={
                        "personalization": True,
                        "profile_sharing": True,
                        "partner_sharing": True,
                    },
                ),
            ],
            [Rejected("mqtt:t", "not_json", b'{"customer_id": "c-gone", ')],
        )
    with sqlite3.connect(path, isolation_level=None) as connection:
        deleted = erase_customer(connection, "c-gone")
    assert deleted == {"events": 2, "consent": 1, "quarantine": 1}
    with open_read_only(path) as connection:
        figures = stats(connection)
        remaining = [json.loads(e)["customer_id"] for e in iter_envelopes(connection)]
    assert remaining == ["c-stay"]
    assert figures["total"] == 1
    assert figures["consent_records"] == 0


async def test_quarantine_erasure_matches_whole_ids_only(tmp_path: Path) -> None:
    path = tmp_path / "buffer.db"
    async with await open_buffer(path) as buffer:
        await buffer.commit(
            [],
            [
                Rejected("mqtt:t", "not_json", b'{"customer_id": "c-erase", '),
                Rejected("mqtt:t", "not_json", b'{"customer_id": "c-erase0", '),
                Rejected("serial:x", "bad_frame", b"\x02ID=c-erase;SKU=9\xff"),
                Rejected("mqtt:t", "not_json", b'{"customer_id": "xc-erase"'),
            ],
        )
    with sqlite3.connect(path, isolation_level=None) as connection:
        deleted = erase_customer(connection, "c-erase")
        left = [bytes(r[0]) for r in connection.execute("SELECT raw FROM quarantine")]
    assert deleted["quarantine"] == 2
    assert sorted(left) == [b'{"customer_id": "c-erase0", ', b'{"customer_id": "xc-erase"']


envelopes = st.builds(
    lambda n, sku, customer_id: event(n, customer_id=customer_id, data={"sku": sku}),
    st.integers(0, 10_000),
    st.text(min_size=1, max_size=40),
    st.one_of(st.none(), st.text(min_size=1, max_size=20)),
)


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(st.lists(envelopes, max_size=30))
def test_export_round_trips_every_envelope(tmp_path: Path, events: list[Event]) -> None:
    path = tmp_path / f"rt-{abs(hash(tuple(e.event_id for e in events)))}.db"
    path.unlink(missing_ok=True)

    async def run() -> None:
        async with await open_buffer(path) as buffer:
            await buffer.commit(events)

    asyncio.run(run())
    unique = {e.event_id: e for e in reversed(events)}  # the first of each id wins
    with open_read_only(path) as connection:
        exported = {
            json.loads(line)["event_id"]: json.loads(line) for line in iter_envelopes(connection)
        }
    assert exported == {i: json.loads(e.to_json()) for i, e in unique.items()}


async def test_recount_follows_rows_deleted_behind_the_writers_back(tmp_path: Path) -> None:
    path = tmp_path / "buffer.db"
    async with await open_buffer(path) as buffer:
        await buffer.commit(
            [
                event(1, customer_id="c-gone"),
                event(2, customer_id="c-gone"),
                event(3, customer_id="c-stay"),
            ]
        )
        with sqlite3.connect(path, isolation_level=None, timeout=10) as other:
            erase_customer(other, "c-gone")  # what `edge-agent buffer erase` does meanwhile
        assert (buffer.counters.total, buffer.counters.pending) == (3, 3)
        await buffer.recount()
        assert (buffer.counters.total, buffer.counters.pending) == (1, 1)


async def test_erasure_through_the_buffer_keeps_its_counters_and_the_cursor_in_step(
    tmp_path: Path,
) -> None:
    path = tmp_path / "buffer.db"
    async with await open_buffer(path) as buffer:
        await buffer.commit([event(n, customer_id="c-gone") for n in range(3)])
        await buffer.commit([event(10, customer_id="c-stay"), event(11, customer=False)])
        rows = await buffer.pending(10, {CUSTOMER: 0, TELEMETRY: 0})
        await buffer.mark_synced([rows[0].seq])  # one of c-gone's events went up already
        assert sorted(await buffer.held_customers()) == ["c-gone", "c-stay"]
        totals = await buffer.erase(["c-gone"], ("sync.erasure_cursor", "42"))
        assert totals == {"events": 3, "pending": 2, "consent": 0, "quarantine": 0}
        assert (buffer.counters.total, buffer.counters.pending) == (2, 2)
        assert await buffer.read_meta("sync.erasure_cursor") == "42"
        await buffer.recount()  # what the file says agrees with what was kept in memory
        assert (buffer.counters.total, buffer.counters.pending) == (2, 2)
        assert await buffer.held_customers() == ["c-stay"]


async def test_refusals_found_after_the_commit_are_quarantined_and_counted(
    tmp_path: Path,
) -> None:
    path = tmp_path / "buffer.db"
    async with await open_buffer(path, quarantine_max_rows=10) as buffer:
        refusals = [Rejected("sync", "store_rejected", b"{}" * n, f"n={n}") for n in range(12)]
        await buffer.quarantine(refusals)
        assert buffer.counters.quarantined == {"store_rejected": 12}
    with open_read_only(path) as connection:
        figures = stats(connection)
    assert figures["quarantine_by_reason"] == {"store_rejected": 12}  # persisted counters
    assert figures["quarantine_rows"] == 10  # bounded like any quarantine


async def test_consent_is_recorded_with_its_event_and_read_back_whole(tmp_path: Path) -> None:
    flags: dict[str, object] = {
        "personalization": True,
        "profile_sharing": False,
        "partner_sharing": True,
    }
    older: dict[str, object] = {
        "personalization": False,
        "profile_sharing": True,
        "partner_sharing": False,
    }
    async with await open_buffer(tmp_path / "buffer.db") as buffer:
        await buffer.commit(
            [
                event(1, event_type="consent.update", data=flags, ts="2026-11-22T09:00:00.000Z"),
                event(2, event_type="consent.update", data=older),  # older: loses
            ]
        )
        records = await buffer.consent()
    assert records == [
        ConsentRecord("c-1", True, False, True, "2026-11-22T09:00:00.000Z", "ev-00000001")
    ]
