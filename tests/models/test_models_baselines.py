"""The ranking metrics and the two popularity baselines, on hand-made data."""

from __future__ import annotations

import math

import pytest

from models.baselines import SESSION_WINDOW_S, PopularityBaselines, RankMetrics
from models.events import Interaction

DAY = 86400.0


def _takes(sku: str, count: int, ts: float, store: str) -> list[Interaction]:
    return [Interaction(sku, "basket.add", ts + i, store, "shelf-01") for i in range(count)]


@pytest.fixture
def baselines() -> PopularityBaselines:
    events = _takes("G", 5, 0.0, "s-1") + _takes("R", 2, 3 * DAY, "s-1")
    events += _takes("Q", 3, 3 * DAY, "s-2")
    return PopularityBaselines(events, catalogue=["Z"])


def test_metrics_follow_the_rank_of_the_single_target() -> None:
    metrics = RankMetrics(cutoff=3)
    metrics.add(["a", "b", "c", "d"], "b")  # rank 2
    metrics.add(["a", "b", "c", "d"], "d")  # beyond the cutoff
    metrics.add(["a"], "a")  # rank 1
    metrics.add([], "a")
    report = metrics.report()
    assert report["hit_rate@3"] == pytest.approx(2 / 4)
    assert report["mrr@3"] == pytest.approx((1 / 2 + 1) / 4)
    assert report["ndcg@3"] == pytest.approx((1 / math.log2(3) + 1) / 4, abs=1e-6)


def test_global_popularity_ranks_by_count_and_masks_taken(baselines: PopularityBaselines) -> None:
    assert baselines.global_ranking(set(), 10) == ["G", "Q", "R", "Z"]
    assert baselines.global_ranking({"G", "unknown"}, 2) == ["Q", "R"]


def test_session_popularity_counts_this_store_in_the_last_day(
    baselines: PopularityBaselines,
) -> None:
    later = 3 * DAY + 3600.0
    assert baselines.session_ranking("s-1", later, set(), 3) == ["R", "G", "Q"]
    assert baselines.session_ranking("s-2", later, set(), 3) == ["Q", "G", "R"]
    # before the recent takes, or in an unknown store: global popularity order
    assert baselines.session_ranking("s-1", 3 * DAY - 1.0, set(), 3) == ["G", "Q", "R"]
    assert baselines.session_ranking("s-9", later, set(), 3) == ["G", "Q", "R"]
    # a day later the recent takes have left the window
    assert baselines.session_ranking("s-1", 3 * DAY + SESSION_WINDOW_S + 10, set(), 1) == ["G"]
    assert baselines.session_ranking("s-1", later, {"R"}, 2) == ["G", "Q"]


def test_an_empty_training_set_still_ranks() -> None:
    empty = PopularityBaselines([], catalogue=["B", "A"])
    assert empty.global_ranking(set(), 5) == ["A", "B"]
    assert empty.session_ranking("s", 0.0, {"A"}, 5) == ["B"]
