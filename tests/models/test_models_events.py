"""Reading event files: takes, leave-last-out, consent, and a fuzz pass over hostile lines."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from models.events import Interaction, collapse_takes, load_event_log, split_last_take


def _event(kind: str, ts: str, customer: str = "c-1", **data: Any) -> dict[str, Any]:
    return {"type": kind, "ts": ts, "customer_id": customer, "store_id": "s", "data": data}


def _write(path: Path, lines: list[Any]) -> Path:
    text = "".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines)
    path.write_text(text, encoding="utf-8")
    return path


def _at(sku: str, ts: float) -> Interaction:
    return Interaction(sku, "product.pickup", ts, "s", "d")


def test_the_last_take_includes_the_same_sku_events_just_before_it() -> None:
    events = [_at("A", 1), _at("B", 2), _at("A", 3), _at("C", 4), _at("C", 5), _at("C", 6)]
    context, target = split_last_take(events)
    assert target == events[-1]
    assert context == events[:3]  # the C view/pickup belong to the held-out take
    assert [len(take) for take in collapse_takes(events)] == [1, 1, 1, 3]
    assert split_last_take([]) == ([], None)
    assert split_last_take(events[3:]) == ([], events[-1])


def test_latest_consent_wins_whatever_the_line_order(tmp_path: Path) -> None:
    lines = [
        _event("consent.update", "2026-11-02T10:00:00.000Z", personalization=False),
        _event("consent.update", "2026-11-01T10:00:00.000Z", personalization=True),
        _event("product.pickup", "2026-11-01T11:00:00.000Z", sku="SKU-1"),
        _event("consent.update", "2026-11-01T10:00:00.000Z", "c-2", personalization=False),
        _event("consent.update", "2026-11-03T10:00:00.000Z", "c-2", personalization=True),
        _event("basket.add", "2026-11-03T11:00:00.000Z", "c-2", sku="SKU-2"),
    ]
    log = load_event_log(_write(tmp_path / "e.jsonl", lines))
    assert [t.customer_id for t in log.consenting()] == ["c-2"]
    assert log.excluded_customers() == 1


def test_a_customer_without_any_consent_record_is_left_out(tmp_path: Path) -> None:
    lines = [
        _event("product.pickup", "2026-11-01T11:00:00.000Z", "c-silent", sku="SKU-1"),
        _event("consent.update", "2026-11-01T10:00:00.000Z", "c-2", personalization=True),
        _event("basket.add", "2026-11-01T11:00:00.000Z", "c-2", sku="SKU-2"),
    ]
    log = load_event_log(_write(tmp_path / "e.jsonl", lines))
    assert [t.customer_id for t in log.consenting()] == ["c-2"]
    assert log.excluded_customers() == 1


def test_only_trigger_events_with_an_sku_become_interactions(tmp_path: Path) -> None:
    lines = [
        _event("product.pickup", "2026-11-01T11:00:02.000Z", sku="B"),
        _event("product.pickup", "2026-11-01T11:00:01.000Z", sku="A"),
        _event("product.putback", "2026-11-01T11:00:03.000Z", sku="B"),
        _event("customer.identified", "2026-11-01T11:00:04.000Z", method="card"),
        _event("kiosk.view", "2026-11-01T11:00:05.000Z", page="home"),
        _event("checkout.purchase", "2026-11-01T11:00:06.000Z", items=[]),
        {"type": "telemetry", "ts": "2026-11-01T11:00:07.000Z", "customer_id": None, "data": {}},
        "not json",
        _event("basket.add", "yesterday", sku="C"),
    ]
    log = load_event_log(_write(tmp_path / "e.jsonl", lines))
    (timeline,) = log.timelines.values()
    assert [(i.sku, i.event_type) for i in timeline.interactions] == [
        ("A", "product.pickup"),
        ("B", "product.pickup"),
    ]
    assert (log.lines, log.malformed) == (9, 2)


json_values = st.recursive(
    st.none() | st.booleans() | st.floats() | st.integers() | st.text(max_size=12),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=6), children, max_size=3)
    ),
    max_leaves=8,
)
envelopes = st.fixed_dictionaries(
    {},
    optional={
        "type": st.sampled_from(["product.pickup", "consent.update", "basket.add"]) | json_values,
        "ts": st.sampled_from(["2026-11-01T10:00:00.000Z", "0001-01-01T00:00:00+01:00"])
        | json_values,
        "customer_id": st.sampled_from(["c-1", "c-2"]) | json_values,
        "data": st.fixed_dictionaries(
            {}, optional={"sku": json_values, "personalization": json_values}
        )
        | json_values,
        "store_id": json_values,
    },
)


@settings(max_examples=60, deadline=None)
@given(
    lines=st.lists(
        envelopes.map(json.dumps) | st.text(max_size=40) | st.binary(max_size=20), max_size=12
    )
)
def test_any_file_loads_without_raising(tmp_path_factory: Any, lines: list[Any]) -> None:
    path = tmp_path_factory.mktemp("fuzz") / "e.jsonl"
    with path.open("wb") as handle:
        for line in lines:
            raw = line if isinstance(line, bytes) else line.encode("utf-8", "surrogatepass")
            handle.write(raw.replace(b"\n", b" ") + b"\n")
    log = load_event_log(path)
    assert log.malformed <= log.lines <= len(lines)
    for timeline in log.timelines.values():
        assert all(isinstance(i.sku, str) and i.sku for i in timeline.interactions)
