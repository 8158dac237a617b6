"""What the central profile is worth at a store: HitRate@10 with it vs without it, one run.

    .venv/bin/python -m benchmarks.profile_benefit [--customers 3000] [--days 28]
        [--items 2000] [--stores 3] [--travellers 0.3] [--holdout-days 7] [--fetch --pg URL]

The world is the shopper simulator with shoppers who visit several stores and the web shop
(``--travellers``). A model is trained (``edge-models train --until``) on the days before
the holdout and served through ``models.serving`` (the ONNX model the agent runs). Then, at
every physical store, every suggestion the agent would make in the holdout for a customer
whose history is *mostly elsewhere* (under half of their earlier interactions were at this
store) and whose consent allows personalization and profile sharing:

- the triggers are the visit's ``customer.identified`` and each take (consecutive events on
  one sku); the target is the visit's next take on another sku;
- WITHOUT the profile, the history is the agent's local state: this store's events of the
  last ``session_max_age_s`` (24 h, the agent's default);
- WITH the profile, it is that merged with the central profile (the customer's interactions
  at every store and channel before the trigger, the latest ``PROFILE_INTERACTIONS``, as
  ``GET /v1/profiles`` returns them) through the agent's ``profile_merge.merge_history``
  when installed (else a stand-in): de-duplicated by event id, in time order, capped at
  ``--merge-cap`` (default: the agent's limit, ``AGENT_HISTORY`` = 32 entries, as many as
  its session keeps per customer; the local history is capped at that too);
- the model ranks 10 items at the trigger's hour, store and device, ``now`` = the trigger's
  time, and is scored on the target. Masking: the agent's ranker masks every item of the
  history it is given; a second row masks only the local items (what the customer took at
  this store), to show what masking the far history costs;
- bounds from the simulator itself (``benchmarks.profile_ceiling``): a *ceiling*, an oracle
  ranking by the simulator's own next-take distribution with the customer's true (hidden)
  taste, which no history can beat; and the same oracle with the taste *estimated* from the
  local vs the merged history, what a model that knew the world's structure could make of
  the profile.

Also measured, interleaved in the same run: the model call's latency with the local and
with the merged history (the suggestion's own cost: the fetch itself runs off the critical
path, and a merged history is capped), and the merge's own cost. With ``--fetch`` the
profile fetch's latency (loopback, and 200 agents) is measured by
``benchmarks.profile_fetch`` against PostgreSQL in the same invocation.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import math
import tempfile
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

from benchmarks.figures import Figures, add_png_argument
from benchmarks.profile_ceiling import OracleRanker
from benchmarks.store import DEFAULT_PG
from models.baselines import RankMetrics
from models.events import format_ts, iter_envelopes, parse_ts
from models.pipeline import train_to_dir
from models.serving import SuggestionModel
from models.simulator import WEB_SHOP, SimulationConfig, write_events

SESSION_MAX_AGE_S: Final = 86_400.0  # edge_agent config model.session_max_age_s default
# edge_agent.personalize.personalizer.SESSION_HISTORY: the entries the agent's session keeps
# per customer and the limit its merge_history is given (the model reads the newest entries
# until its history_length slots of distinct takes are full, and masks every entry's item).
AGENT_HISTORY: Final = 32
PROFILE_INTERACTIONS: Final = 200  # cloud_sync.store.profiles.DEFAULT_INTERACTIONS
CUTOFF: Final = 10
TAKE_TYPES: Final = frozenset({"product.pickup", "product.scan", "kiosk.view", "basket.add"})


@dataclass(frozen=True, slots=True)
class Entry:
    """One interaction as both the agent's session and the central profile hold it."""

    event_id: str
    event_type: str
    sku: str | None
    ts: float
    store_id: str
    device_id: str


def merge_history(local: Iterable[Entry], central: Iterable[Entry], cap: int) -> list[Entry]:
    """Local state and the central profile as one history: de-duplicated by event id (the
    store holds this store's uploaded events too), in time order, the latest ``cap``.

    The stand-in used while the agent's own merge (``edge_agent.personalize.profile_merge``,
    the "profile" work) is not on this branch; ``merged_history`` prefers the agent's.
    """
    seen: dict[str, Entry] = {}
    for entry in [*local, *central]:
        seen.setdefault(entry.event_id, entry)
    ordered = sorted(seen.values(), key=lambda entry: (entry.ts, entry.event_id))
    return ordered[-cap:]


def _agent_merge() -> Any | None:
    """The agent's merge module when it is installed (the "profile" branch), else None."""
    try:
        return importlib.import_module("edge_agent.personalize.profile_merge")
    except ModuleNotFoundError:
        return None


AGENT_MERGE: Final = _agent_merge()


def merged_history(
    local: Sequence[Entry], central: Sequence[Entry], store_id: str, cap: int
) -> list[tuple[str, str, float]]:
    """The model's history with the profile: the agent's merge if present, else the stand-in."""
    if AGENT_MERGE is None:
        return _history(merge_history(local, central, cap))
    interactions = [
        AGENT_MERGE.CentralInteraction(e.event_id, e.store_id, e.event_type, e.sku, e.ts)
        for e in central
    ]
    merged = AGENT_MERGE.merge_history(
        _history(local),
        interactions,
        own_store_id=store_id,
        limit=cap,
        local_event_ids={e.event_id for e in local},
    )
    return list(merged.entries)


@dataclass(frozen=True, slots=True)
class Case:
    customer: str
    first_of_visit: bool
    trigger: Entry
    target: str
    local: list[Entry]
    central: list[Entry]  # every earlier interaction (the oracle reads them all)


def read_customers(path: Path) -> tuple[dict[str, list[Entry]], set[str]]:
    """Every customer's entries in time order, and who may have a profile (the latest
    consent.update grants personalization and profile sharing)."""
    entries: dict[str, list[Entry]] = {}
    consent: dict[str, tuple[float, bool]] = {}
    for _, envelope in iter_envelopes(path):
        if envelope is None:
            continue
        customer, ts = envelope.get("customer_id"), parse_ts(envelope.get("ts"))
        if not isinstance(customer, str) or ts is None:
            continue
        raw = envelope.get("data")
        data: dict[str, Any] = raw if isinstance(raw, dict) else {}
        event_type = str(envelope.get("type"))
        if event_type == "consent.update":
            allowed = bool(data.get("personalization")) and bool(data.get("profile_sharing"))
            if ts >= consent.get(customer, (-math.inf, False))[0]:
                consent[customer] = (ts, allowed)
            continue
        sku = data.get("sku")
        take = event_type in TAKE_TYPES and isinstance(sku, str)
        if take or event_type == "customer.identified":
            entries.setdefault(customer, []).append(
                Entry(
                    str(envelope.get("event_id")),
                    event_type,
                    sku if isinstance(sku, str) else None,
                    ts,
                    str(envelope.get("store_id")),
                    str(envelope.get("device_id")),
                )
            )
    for timeline in entries.values():
        timeline.sort(key=lambda entry: entry.ts)
    return entries, {customer for customer, (_, ok) in consent.items() if ok}


def _visits(timeline: list[Entry]) -> Iterator[tuple[int, int]]:
    """(start, end) index ranges: each visit starts at a customer.identified."""
    starts = [n for n, entry in enumerate(timeline) if entry.event_type == "customer.identified"]
    for number, start in enumerate(starts):
        yield start, starts[number + 1] if number + 1 < len(starts) else len(timeline)


def cases(entries: dict[str, list[Entry]], profiled: set[str], cut: float) -> Iterator[Case]:
    for customer in sorted(profiled & entries.keys()):
        timeline = entries[customer]
        for start, end in _visits(timeline):
            identified = timeline[start]
            store = identified.store_id
            if identified.ts < cut or store == WEB_SHOP:
                continue
            # takes: consecutive events on one sku. Trigger i is the identification (i = 0)
            # or the last event of take i - 1; its target is take i.
            triggers, take_starts, last_sku = [start], [], None
            for n in range(start + 1, end):
                sku = timeline[n].sku
                if sku is None:
                    continue
                if sku != last_sku:
                    take_starts.append(n)
                    triggers.append(n)
                else:
                    triggers[-1] = n
                last_sku = sku
            for position, target_position in zip(triggers, take_starts, strict=False):
                target_sku = timeline[target_position].sku
                past = [e for e in timeline[: position + 1] if e.sku is not None]
                here = sum(1 for e in past if e.store_id == store)
                if not past or here * 2 >= len(past):
                    continue  # only customers whose history is mostly elsewhere
                trigger = timeline[position]
                horizon = trigger.ts - SESSION_MAX_AGE_S
                local = [e for e in past if e.store_id == store and e.ts >= horizon]
                yield Case(
                    customer=customer,
                    first_of_visit=position == start,
                    trigger=trigger,
                    target=str(target_sku),
                    local=local,
                    central=past,
                )


def _skus(entries: Sequence[Entry]) -> list[str]:
    return [e.sku for e in entries if e.sku is not None]


def _history(entries: Sequence[Entry]) -> list[tuple[str, str, float]]:
    return [(e.sku, e.event_type, e.ts) for e in entries if e.sku is not None]


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))] if ordered else math.nan


@dataclass
class Scores:
    without: RankMetrics
    merged: RankMetrics  # the agent's masking: every item of the merged history
    merged_local_mask: RankMetrics
    ceiling: RankMetrics  # the oracle that knows the simulated customer's taste
    estimated_without: RankMetrics  # the oracle's structure, taste read from the local history
    estimated_with: RankMetrics  # ... and from the merged one (the central profile's 200)


def measure(
    model: SuggestionModel, all_cases: list[Case], merge_cap: int, oracle: OracleRanker
) -> dict[str, Scores]:
    groups = {
        name: Scores(*(RankMetrics(CUTOFF) for _ in range(6))) for name in ("first", "later", "all")
    }
    for case in all_cases:
        trigger = case.trigger
        context = (
            datetime.fromtimestamp(trigger.ts, UTC).hour,
            trigger.store_id,
            trigger.device_id,
        )
        local = case.local[-AGENT_HISTORY:]  # the agent's session keeps as many
        central = case.central[-PROFILE_INTERACTIONS:]  # what GET /v1/profiles returns
        merged = merged_history(local, central, trigger.store_id, merge_cap)
        local_skus = {e.sku for e in local if e.sku is not None}
        rankings = (
            model.suggest(_history(local), context, k=CUTOFF, now=trigger.ts),
            model.suggest(merged, context, k=CUTOFF, now=trigger.ts),
            model.suggest(
                merged, context, local_skus, k=CUTOFF, now=trigger.ts,
                exclude_history=False,
            ),
        )  # fmt: skip
        last = None if case.first_of_visit else trigger.sku
        everything = [e.sku for e in case.central if e.sku is not None]
        oracle_rankings = (
            oracle.rank(case.customer, trigger.ts, last, everything, CUTOFF),
            oracle.rank(case.customer, trigger.ts, last, _skus(local), CUTOFF, estimate=True),
            oracle.rank(case.customer, trigger.ts, last, _skus(central), CUTOFF, estimate=True),
        )
        ranked_skus = [[sku for sku, _ in ranked] for ranked in rankings] + list(oracle_rankings)
        for name in ("first" if case.first_of_visit else "later", "all"):
            scores = groups[name]
            for metrics, skus in zip(
                (
                    scores.without,
                    scores.merged,
                    scores.merged_local_mask,
                    scores.ceiling,
                    scores.estimated_without,
                    scores.estimated_with,
                ),
                ranked_skus,
                strict=True,
            ):
                metrics.add(skus, case.target)
    return groups


def latencies(
    model: SuggestionModel, all_cases: list[Case], merge_cap: int, count: int, budget_s: float
) -> dict[str, list[float]]:
    """Model call with the local / the merged history, interleaved; and the merge itself."""
    found: dict[str, list[float]] = {"local": [], "merged": [], "merge": []}
    deadline = time.perf_counter() + budget_s
    for case in all_cases[:count]:
        if time.perf_counter() > deadline:
            break
        trigger = case.trigger
        context = (
            datetime.fromtimestamp(trigger.ts, UTC).hour,
            trigger.store_id,
            trigger.device_id,
        )
        started = time.perf_counter_ns()
        local_entries = case.local[-AGENT_HISTORY:]
        merged = merged_history(
            local_entries, case.central[-PROFILE_INTERACTIONS:], trigger.store_id, merge_cap
        )
        found["merge"].append((time.perf_counter_ns() - started) / 1e6)
        local, far = _history(local_entries), merged
        for name, history in (("local", local), ("merged", far)):
            started = time.perf_counter_ns()
            model.suggest(history, context, k=CUTOFF, now=trigger.ts)
            found[name].append((time.perf_counter_ns() - started) / 1e6)
    return found


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if b > 0 else "n/a (without: 0)"


def report(groups: dict[str, Scores], figures: Figures) -> None:
    key = f"hit_rate@{CUTOFF}"
    labels = {
        "first": "first suggestion of a visit (at identification)",
        "later": "later suggestions in the visit (after a take)",
        "all": "every suggestion",
    }
    for name, scores in groups.items():
        without = scores.without.report()[key]
        merged = scores.merged.report()[key]
        local_mask = scores.merged_local_mask.report()[key]
        ceiling = scores.ceiling.report()[key]
        print(
            f"HitRate@{CUTOFF} {labels[name]}: {scores.without.cases:,} suggestions;"
            f" without profile {without:.4f}, with {merged:.4f} ({_ratio(merged, without)}),"
            f" with, masking local items only {local_mask:.4f} ({_ratio(local_mask, without)});"
            f" ceiling (an oracle that knows the customer's simulated taste) {ceiling:.4f}"
            f" ({_ratio(ceiling, without)})"
        )
        estimated = (scores.estimated_without.report()[key], scores.estimated_with.report()[key])
        print(
            f"  the oracle's structure with the taste estimated from the history: local"
            f" {estimated[0]:.4f}, merged {estimated[1]:.4f}"
            f" ({_ratio(estimated[1], estimated[0])})"
        )
        figures.add(f"{name}: without", without)
        figures.add(f"{name}: with", merged)
        figures.add(f"{name}: with, local mask", local_mask)
        figures.add(f"{name}: ceiling", ceiling)
        figures.add(f"{name}: estimated taste, local", estimated[0])
        figures.add(f"{name}: estimated taste, merged", estimated[1])


def run(args: argparse.Namespace) -> None:
    config = SimulationConfig(
        seed=args.seed,
        customers=args.customers,
        days=args.days,
        items=args.items,
        stores=args.stores,
        travellers=args.travellers,
        web_shop_rate=args.web_shop_rate,
    )
    with tempfile.TemporaryDirectory(prefix="profile-benefit-") as scratch:
        events = Path(scratch) / "events.jsonl"
        started = time.perf_counter()
        count = write_events(config, events)
        entries, profiled = read_customers(events)
        last_ts = max(e.ts for timeline in entries.values() for e in timeline)
        cut = last_ts - args.holdout_days * 86_400.0
        model, _ = train_to_dir(events, Path(scratch) / "model", until=cut, progress=False)
        print(
            f"world: {count:,} events, {config.customers:,} customers ({config.travellers:.0%}"
            f" shop at {config.stores} stores and the web shop), {config.items:,} items;"
            f" model {model.version} trained before {format_ts(cut)}"
            f" ({time.perf_counter() - started:.1f} s)"
        )
        merge_cap = args.merge_cap
        all_cases = list(cases(entries, profiled, cut))
        if not all_cases:
            raise SystemExit("no suggestion for a customer whose history is mostly elsewhere")
        where = "the agent's" if AGENT_MERGE is not None else "the benchmark's stand-in"
        print(f"merged history capped at {merge_cap} entries ({where} merge_history)")
        figures = Figures(f"HitRate@{CUTOFF}, history mostly elsewhere", "HitRate@10")
        report(measure(model, all_cases, merge_cap, OracleRanker(config)), figures)
        timing = latencies(model, all_cases, merge_cap, args.latency_calls, args.latency_budget_s)
        local_p = (percentile(timing["local"], 0.5), percentile(timing["local"], 0.99))
        merged_p = (percentile(timing["merged"], 0.5), percentile(timing["merged"], 0.99))
        print(
            f"model call, {len(timing['local']):,} interleaved pairs: local history p50"
            f" {local_p[0]:.3f} ms p99 {local_p[1]:.3f} ms; merged p50 {merged_p[0]:.3f} ms"
            f" p99 {merged_p[1]:.3f} ms (ratio p50 {_ratio(merged_p[0], local_p[0])},"
            f" p99 {_ratio(merged_p[1], local_p[1])}); the merge itself (off the path)"
            f" p50 {percentile(timing['merge'], 0.5):.3f} ms"
        )
    if args.png is not None:
        figures.write_png(args.png)
    if args.fetch:
        from benchmarks import profile_fetch  # PostgreSQL and store processes: only when asked

        print("profile fetch latency (benchmarks.profile_fetch):")
        fetch_args = argparse.Namespace(
            pg=args.pg,
            customers=args.fetch_customers,
            events_per_customer=40,
            agents=args.agents,
            fetches=args.fetches,
            instances=1,
            interval_s=1.0,
            pool_size=10,
            png=None,
        )
        asyncio.run(profile_fetch.run(fetch_args))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    defaults = SimulationConfig()
    parser.add_argument("--seed", type=int, default=11)
    parser.add_argument("--customers", type=int, default=3000)
    parser.add_argument("--days", type=int, default=28)
    parser.add_argument("--items", type=int, default=2000)
    parser.add_argument("--stores", type=int, default=3)
    parser.add_argument("--travellers", type=float, default=0.3)
    parser.add_argument("--web-shop-rate", type=float, default=defaults.web_shop_rate)
    parser.add_argument("--holdout-days", type=float, default=7.0)
    parser.add_argument(
        "--merge-cap",
        type=int,
        default=AGENT_HISTORY,
        help="entries kept after the merge, the newest (default: the agent's limit, as many"
        " as its session keeps)",
    )
    parser.add_argument("--latency-calls", type=int, default=3000)
    parser.add_argument("--latency-budget-s", type=float, default=60.0)
    parser.add_argument("--fetch", action="store_true", help="also run benchmarks.profile_fetch")
    parser.add_argument("--pg", default=DEFAULT_PG, help="PostgreSQL for --fetch (scratch db)")
    parser.add_argument("--fetch-customers", type=int, default=5000)
    parser.add_argument("--agents", type=int, default=200)
    parser.add_argument("--fetches", type=int, default=4000)
    add_png_argument(parser)
    run(parser.parse_args(argv))


if __name__ == "__main__":
    main()
