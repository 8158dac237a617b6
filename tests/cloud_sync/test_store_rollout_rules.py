"""The rollout's pure rules: the canary share by store id, and the rollback rule's test."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cloud_sync.store import acceptance, rollout
from cloud_sync.store.errors import RolloutError
from cloud_sync.store.records import RolloutState

NOW = datetime(2026, 11, 27, tzinfo=UTC)
store_ids = st.text(min_size=1, max_size=40)


@given(store_ids, st.integers(1, 99), st.integers(1, 99))
def test_a_wider_canary_keeps_every_store_it_had(store_id: str, low: int, high: int) -> None:
    low, high = sorted((low, high))
    narrow = RolloutState("v1", "v2", low, NOW)
    wide = RolloutState("v1", "v2", high, NOW)
    if rollout.version_for(narrow, store_id) == "v2":
        assert rollout.version_for(wide, store_id) == "v2"
    assert rollout.version_for(wide, None) == "v1"


def test_the_share_is_about_the_percent() -> None:
    state = RolloutState("v1", "v2", 25, NOW)
    chosen = sum(rollout.version_for(state, f"store-{n:05d}") == "v2" for n in range(4000))
    assert 800 <= chosen <= 1200


@pytest.mark.parametrize("percent", [0, 100, -5])
def test_a_canary_share_is_1_to_99(percent: int) -> None:
    with pytest.raises(RolloutError):
        rollout.published(RolloutState("v1", None, 0, None), "v2", percent, NOW)


def perf(shown: int, accepted: int) -> acceptance.Performance:
    return acceptance.Performance("v", 1, shown, accepted, 0, 0, None)


@given(st.integers(0, 2000), st.integers(0, 2000), st.integers(1, 5000))
def test_never_judged_on_fewer_than_min_shown(a: int, b: int, min_shown: int) -> None:
    canary, control = perf(a, a // 10), perf(b, b // 2)
    verdict = acceptance.judge(canary, control, min_shown)
    if a < min_shown or b < min_shown:
        assert not verdict.roll_back


@given(st.integers(1, 3000), st.integers(0, 3000))
def test_a_canary_at_least_as_good_is_never_rolled_back(shown: int, accepted: int) -> None:
    accepted = min(accepted, shown)
    control = perf(shown, accepted)
    better = perf(shown, min(shown, accepted + shown // 20))
    assert not acceptance.judge(better, control, 1).roll_back
    assert not acceptance.judge(control, control, 1).roll_back


def test_the_threshold_is_one_sided_p_below_0_01() -> None:
    # 1000 each side: 30 % vs 35 % gives z = -2.4 (rolled back); 31 % vs 35 %, z = -1.9 (kept).
    assert acceptance.judge(perf(1000, 300), perf(1000, 350), 500).roll_back
    assert not acceptance.judge(perf(1000, 310), perf(1000, 350), 500).roll_back
