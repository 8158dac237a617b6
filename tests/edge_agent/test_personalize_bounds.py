"""The personalizer's per-customer state stays bounded however many customers come (issue 11).

Each test tries to break a bound with far more customers or suggestions than it allows, and
checks the bound held, the evictions were counted, and the memory held did not grow with the
number of customers (weighed with tracemalloc: allocations, not timings).
"""

from __future__ import annotations

import gc
import json
import sys
import time
import tracemalloc

from edge_agent.personalize.feedback import MAX_PER_CUSTOMER, MAX_TRACKED, FeedbackBook, Shown
from edge_agent.personalize.session import SessionStore


def _held_bytes(_fill: object) -> int:
    gc.collect()
    return tracemalloc.get_traced_memory()[0]


def _observe(sessions: SessionStore, customer: int, n: int) -> None:
    # Strings made per event, as json.loads makes them from each message.
    document = json.loads(f'{{"c": "c-{customer:07d}", "s": "SKU-{n % 5000:06d}"}}')
    sessions.observe(document["c"], "product.pickup", document["s"], 1_000_000.0 + n)


def test_sessions_stay_bounded_in_count_and_memory_with_ever_more_customers() -> None:
    cap, history = 200, 32
    sessions = SessionStore(cap, history, max_age_s=10**9)
    # The catalogue's skus stay interned (as the model's item list keeps them): the process-
    # wide table of interned strings then does not resize during the measurement.
    catalogue = [sys.intern(f"SKU-{n:06d}") for n in range(5000)]
    n = 0

    def customers(first: int, last: int) -> None:
        nonlocal n
        for customer in range(first, last):
            for _ in range(history + 5):  # every history full
                _observe(sessions, customer, n)
                n += 1

    tracemalloc.start()  # from the first customer: what is freed later was traced too
    try:
        customers(0, cap * 5)  # the cap reached and churned: dicts and interned strings settle
        full = _held_bytes(sessions)
        customers(cap * 5, cap * 20)  # 15 times as many customers again
        after = _held_bytes(sessions)
    finally:
        tracemalloc.stop()
    assert len(catalogue) == 5000
    assert len(sessions) == cap
    assert sessions.evicted == cap * 19
    assert "c-0000000" not in sessions
    newest = sessions.get(f"c-{cap * 20 - 1:07d}")
    assert newest is not None
    assert len(newest.history) == history
    assert full > 200_000  # what the cap's sessions hold (about 1 KB each)
    assert after - full < 50_000  # bounded: not 4x more for 4x the customers


def test_session_history_keeps_its_entries_and_order() -> None:
    sessions = SessionStore(cap=10, history_length=3, max_age_s=100)
    kinds = ["product.pickup", "kiosk.view", "basket.add", "product.scan", "customer.identified"]
    for n, kind in enumerate(kinds):
        sessions.observe("c-1", kind, f"SKU-{n}", 1000.0 + n * 10)
    session = sessions.get("c-1")
    assert session is not None
    assert session.history == [
        ("SKU-2", "basket.add", 1020.0),
        ("SKU-3", "product.scan", 1030.0),
        ("SKU-4", "customer.identified", 1040.0),
    ]
    assert sessions.history("c-1", 1125.0) == [
        ("SKU-3", "product.scan", 1030.0),
        ("SKU-4", "customer.identified", 1040.0),
    ]


def test_feedback_tracking_is_bounded_and_counts_what_it_forgets() -> None:
    book = FeedbackBook(window_s=300)
    customers = MAX_TRACKED * 2  # more customers than suggestions tracked
    total = MAX_TRACKED + 7_000
    now = time.monotonic()
    for n in range(total):
        customer = f"c-{n % customers:07d}"
        book.record_shown(Shown(f"s-{n}", customer, (f"SKU-{n % 97}",), "v1", now))
    assert book.evicted == total - MAX_TRACKED
    assert book.was_accepted("s-0") is None  # forgotten
    assert book.was_accepted(f"s-{total - 1}") is False  # still tracked
    assert book.totals().shown == total  # the counts keep everything
    tracked_per_customer = book._by_customer  # what implicit acceptance reads
    assert len(tracked_per_customer) <= MAX_TRACKED
    assert sum(len(entries) for entries in tracked_per_customer.values()) <= MAX_TRACKED


def test_feedback_keeps_the_newest_few_per_customer() -> None:
    book = FeedbackBook(window_s=300)
    now = time.monotonic()
    for n in range(MAX_PER_CUSTOMER * 3):
        book.record_shown(Shown(f"s-{n}", "c-1", (f"SKU-{n}",), "v1", now))
    assert book.implicit_match("c-1", "SKU-0", now) is None  # beyond the newest few
    newest = MAX_PER_CUSTOMER * 3 - 1
    match = book.implicit_match("c-1", f"SKU-{newest}", now)
    assert match is not None
    assert match.suggestion_id == f"s-{newest}"
