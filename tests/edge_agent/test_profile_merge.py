"""The pure merge of a central profile into the model's history (profile_merge.py)."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from edge_agent.personalize.profile_merge import (
    CentralInteraction,
    ProfileRejectedError,
    merge_history,
    parse_profile,
)

T0 = 1_790_000_000.0  # 2026-09-21


def _doc(customer_id: str = "c-1", interactions: list[Any] | None = None) -> dict[str, Any]:
    return {
        "customer_id": customer_id,
        "consent": {"personalization": True, "profile_sharing": True, "partner_sharing": False},
        "interactions": interactions
        if interactions is not None
        else [
            {
                "ts": "2026-11-20T10:00:00.250Z",
                "type": "product.pickup",
                "sku": "SKU-1",
                "store_id": "store-a",
                "event_id": "e1",
            },
            {
                "ts": "2026-11-19T10:00:00Z",
                "type": "checkout.purchase",
                "sku": "SKU-2",
                "store_id": "web-shop",
                "event_id": "e2",
            },
        ],
        "aggregates": {"by_sku": {"SKU-1": 1}},
        "generated_at": "2026-11-27T10:00:00Z",
    }


def test_parse_reads_the_store_document_oldest_first() -> None:
    profile = parse_profile(json.dumps(_doc()).encode(), "c-1")
    assert [i.event_id for i in profile.interactions] == ["e2", "e1"]
    assert profile.allows_personalization
    assert profile.interactions[1].store_id == "store-a"
    assert profile.interactions[1].ts % 1 == pytest.approx(0.25)


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b"\xff\xfe", "not_json"),
        (b"{", "not_json"),
        (b"[1,2]", "bad_type"),
        (b"[" * 100_000 + b"]" * 100_000, "too_deep"),
        (json.dumps(_doc("c-2")).encode(), "wrong_customer"),
        (json.dumps({**_doc(), "consent": {"personalization": "yes"}}).encode(), "bad_type"),
        (json.dumps({**_doc(), "interactions": {"a": 1}}).encode(), "bad_type"),
        (json.dumps(_doc(interactions=[1])).encode(), "bad_type"),
        (json.dumps(_doc(interactions=[{"event_id": 5}])).encode(), "bad_type"),
        (
            json.dumps(
                _doc(
                    interactions=[
                        {"event_id": "e", "store_id": "s", "type": "t", "sku": "x", "ts": "now"}
                    ]
                )
            ).encode(),
            "bad_type",
        ),
        (json.dumps(_doc(interactions=[{}] * 1001)).encode(), "too_many"),
    ],
)
def test_hostile_bodies_are_refused_with_a_reason(body: bytes, reason: str) -> None:
    with pytest.raises(ProfileRejectedError) as caught:
        parse_profile(body, "c-1")
    assert caught.value.reason == reason


def _central(
    event_id: str, store: str, sku: str | None, ts: float, kind: str = "product.pickup"
) -> CentralInteraction:
    return CentralInteraction(event_id, store, kind, sku, ts)


def test_merge_dedupes_own_store_events_and_counts_origins() -> None:
    local = [("SKU-1", "product.pickup", T0 + 10), ("SKU-3", "basket.add", T0 + 20)]
    central = [  # oldest first, as parse_profile returns them
        _central("a-1", "store-a", "SKU-4", T0 + 1),
        _central("a-1", "store-a", "SKU-4", T0 + 1),  # a repeat in the body
        _central("w-1", "web-shop", "SKU-5", T0 + 2, "checkout.purchase"),
        _central("a-2", "store-a", None, T0 + 3, "customer.identified"),  # no item
        _central("a-3", "store-a", "SKU-6", T0 + 4, "product.putback"),  # not history
        _central("own-2", "store-b", "SKU-9", T0 + 5),  # ours by id
        _central("own-1", "store-b", "SKU-1", T0 + 10),  # our own upload: already local
    ]
    merged = merge_history(
        local, central, own_store_id="store-b", limit=32, local_event_ids={"own-2"}
    )
    assert merged.entries == [
        ("SKU-4", "product.pickup", T0 + 1),
        ("SKU-5", "checkout.purchase", T0 + 2),
        ("SKU-1", "product.pickup", T0 + 10),
        ("SKU-3", "basket.add", T0 + 20),
    ]
    assert (merged.local, merged.central) == (2, 2)


def test_merge_keeps_the_newest_within_the_limit_and_horizon() -> None:
    local = [("L", "product.pickup", T0 + 100)]
    central = [_central(f"e{i}", "store-a", f"S{i}", T0 + i) for i in range(50)]
    merged = merge_history(local, central, own_store_id="store-b", limit=5, since=T0 + 47)
    assert [e[0] for e in merged.entries] == ["S47", "S48", "S49", "L"]
    assert (merged.local, merged.central) == (1, 3)
    assert merge_history(local, central, own_store_id="b", limit=2).entries[-1][0] == "L"
    assert merge_history(local, central, own_store_id="b", limit=0).entries == []


entries = st.lists(
    st.tuples(
        st.sampled_from(["A", "B", "C"]),
        st.sampled_from(["product.pickup", "basket.add"]),
        st.integers(0, 1000).map(lambda s: T0 + s / 8),
    ),
    max_size=20,
)


@given(local=entries, others=entries, limit=st.integers(0, 40))
def test_merge_properties(
    local: list[tuple[str, str, float]], others: list[tuple[str, str, float]], limit: int
) -> None:
    local.sort(key=lambda e: e[2])
    # The store returns our own events too, plus others: ours never count twice.
    central = [_central(f"own{n}", "me", *e[0:1], e[2], e[1]) for n, e in enumerate(local)]
    central += [_central(f"o{n}", "other", e[0], e[2], e[1]) for n, e in enumerate(others)]
    central.sort(key=lambda i: i.ts)
    merged = merge_history(local, central, own_store_id="me", limit=limit)
    assert merged.local + merged.central == len(merged.entries) <= limit
    assert len(merged.entries) == min(limit, len(local) + len(others))
    assert [e[2] for e in merged.entries] == sorted(e[2] for e in merged.entries)
