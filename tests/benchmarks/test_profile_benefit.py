"""The profile-benefit benchmark at a tiny size, so that it cannot rot; and its merge."""

from __future__ import annotations

import re

import pytest

from benchmarks.profile_benefit import Entry, main, merge_history
from benchmarks.profile_ceiling import OracleRanker
from models.simulator import SimulationConfig


def _entry(event_id: str, ts: float, store: str = "store-001") -> Entry:
    return Entry(event_id, "product.pickup", f"SKU-{event_id}", ts, store, "shelf-01")


def test_merge_dedupes_by_event_id_orders_by_time_and_keeps_the_newest() -> None:
    local = [_entry("b", 20.0), _entry("d", 40.0)]
    central = [_entry("a", 10.0, "web-shop"), _entry("b", 20.0), _entry("c", 30.0, "store-002")]
    merged = merge_history(local, central, cap=3)
    assert [entry.event_id for entry in merged] == ["b", "c", "d"]
    assert [entry.event_id for entry in merge_history(local, central, cap=10)] == [
        "a", "b", "c", "d",
    ]  # fmt: skip
    assert merge_history([], [], cap=5) == []


def test_the_benchmark_prints_its_figures(capsys: pytest.CaptureFixture[str]) -> None:
    main(
        [
            "--customers", "300", "--days", "10", "--items", "200", "--holdout-days", "3",
            "--travellers", "0.5", "--latency-calls", "50", "--latency-budget-s", "20",
        ]
    )  # fmt: skip
    out = capsys.readouterr().out
    rows = re.findall(
        r"HitRate@10 (.+?): ([\d,]+) suggestions; without profile ([\d.]+), with ([\d.]+)", out
    )
    assert [row[0].split(" (")[0] for row in rows] == [
        "first suggestion of a visit",
        "later suggestions in the visit",
        "every suggestion",
    ]
    first, later, every = (int(row[1].replace(",", "")) for row in rows)
    assert first > 0
    assert later > 0
    assert every == first + later
    assert all(0.0 <= float(value) <= 1.0 for row in rows for value in row[2:])
    ceilings = re.findall(r"ceiling \(an oracle [^)]*\) ([\d.]+)", out)
    assert len(ceilings) == 3
    assert all(0.0 <= float(value) <= 1.0 for value in ceilings)
    assert re.search(r"model call, [\d,]+ interleaved pairs: local history p50 [\d.]+ ms", out)


def test_the_oracle_ranks_by_the_simulators_own_distribution() -> None:
    config = SimulationConfig(seed=3, customers=20, items=200, travellers=0.5)
    oracle = OracleRanker(config)
    customer = "c-000001"
    ts = 1_762_000_000.0
    first = oracle.distribution(customer, ts, None)
    assert first.sum() == pytest.approx(1.0)
    last = oracle.catalogue.skus[0]
    after = oracle.distribution(customer, ts, last)
    assert after.sum() == pytest.approx(1.0)
    complements = {oracle.catalogue.skus[int(i)] for i in oracle.catalogue.complements[0]}
    ranked = oracle.rank(customer, ts, last, [], 10)
    assert complements <= set(ranked)
    # what the customer took recently is never ranked: the simulator avoids it
    recent = sorted(complements)[:2]
    masked = oracle.rank(customer, ts, last, [last, *recent], 10)
    assert not set(masked) & {last, *recent}
    assert len(masked) == 10
