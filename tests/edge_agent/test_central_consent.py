"""The central store's consent at the upload rule (governance ``CentralGrant``): a customer
who consented at another store leaves this one with the clear id, for events committed after
the grant, unless a local record says otherwise. A real buffer file, the real upload rule."""

from __future__ import annotations

import json
from pathlib import Path

from cloud_sync.sync_batches import governed_envelopes
from edge_agent.buffer import Buffer
from edge_agent.buffer.reads import CUSTOMER, TELEMETRY
from edge_agent.events import Event
from edge_agent.governance import CentralGrant, ConsentLedger, pseudonymise
from tests.edge_agent.test_buffer import event, open_buffer

KEY = b"central-consent-test-key-0123456789"
CUSTOMER_ID = "c-from-store-a"
GRANT_TS = "2026-11-27T21:00:00.000Z"


async def uploaded_ids(buffer: Buffer, ledger: ConsentLedger) -> dict[str, str]:
    """event_id → customer_id of every pending row, as the upload rule would send it."""
    rows = await buffer.pending(1000, {CUSTOMER: 0, TELEMETRY: 0})
    envelopes = [json.loads(text) for text in governed_envelopes(rows, ledger, KEY)]
    return {e["event_id"]: e["customer_id"] for e in envelopes}


async def granted(buffer: Buffer, ledger: ConsentLedger, customer_id: str) -> CentralGrant:
    grant = await buffer.grant_central(customer_id, GRANT_TS)
    assert grant is not None
    assert ledger.grant_central(grant)
    return grant


def local_consent(n: int, sharing: bool, ts: str = "2026-11-22T09:00:00.000Z") -> Event:
    flags: dict[str, object] = {
        "personalization": sharing,
        "profile_sharing": sharing,
        "partner_sharing": False,
    }
    return event(n, event_type="consent.update", customer_id=CUSTOMER_ID, data=flags, ts=ts)


async def test_only_events_committed_after_the_grant_leave_with_the_clear_id(
    tmp_path: Path,
) -> None:
    ledger = ConsentLedger(require_consent=True)
    pseudonym = pseudonymise(CUSTOMER_ID, KEY)
    async with await open_buffer(tmp_path / "buffer.db") as buffer:
        await buffer.commit([event(1, customer_id=CUSTOMER_ID), event(2, customer_id="c-other")])
        grant = await granted(buffer, ledger, CUSTOMER_ID)
        await buffer.commit([event(3, customer_id=CUSTOMER_ID), event(4, customer_id="c-other")])
        ids = await uploaded_ids(buffer, ledger)
    assert grant.after_seq == 2
    assert ids["ev-00000001"] == pseudonym  # committed before the grant: stays pseudonymised
    assert ids["ev-00000003"] == CUSTOMER_ID
    assert ids["ev-00000002"] == ids["ev-00000004"] == pseudonymise("c-other", KEY)


async def test_a_local_withdrawal_wins_over_the_grant_and_a_later_refresh(
    tmp_path: Path,
) -> None:
    ledger = ConsentLedger(require_consent=True)
    path = tmp_path / "buffer.db"
    async with await open_buffer(path) as buffer:
        await granted(buffer, ledger, CUSTOMER_ID)
        withdrawal = local_consent(1, sharing=False)
        ledger.observe([withdrawal])  # the pipeline's order
        await buffer.commit([withdrawal, event(2, customer_id=CUSTOMER_ID)])
        # A later refresh says yes again: the local record still wins, in memory and kept.
        assert await buffer.grant_central(CUSTOMER_ID, "2026-11-27T22:00:00.000Z") is None
        assert not ledger.grant_central(CentralGrant(CUSTOMER_ID, GRANT_TS, 0))
        ids = await uploaded_ids(buffer, ledger)
    assert set(ids.values()) == {pseudonymise(CUSTOMER_ID, KEY)}
    # After a restart too: the local record is loaded first and the kept grant is refused.
    restarted = ConsentLedger(require_consent=True)
    async with await open_buffer(path) as buffer:
        restarted.load(await buffer.consent())
        restarted.load_central(await buffer.central_grants())
        assert not restarted.shares_profile(CUSTOMER_ID, 10**9)
        assert restarted.central_grant(CUSTOMER_ID) is None


async def test_a_central_withdrawal_revokes_at_once_for_rows_not_yet_uploaded(
    tmp_path: Path,
) -> None:
    ledger = ConsentLedger(require_consent=True)
    path = tmp_path / "buffer.db"
    async with await open_buffer(path) as buffer:
        await granted(buffer, ledger, CUSTOMER_ID)
        await buffer.commit([event(1, customer_id=CUSTOMER_ID)])
        assert set((await uploaded_ids(buffer, ledger)).values()) == {CUSTOMER_ID}
        assert ledger.revoke_central(CUSTOMER_ID)  # in force before the buffer is told
        assert set((await uploaded_ids(buffer, ledger)).values()) == {
            pseudonymise(CUSTOMER_ID, KEY)
        }
        assert await buffer.revoke_central(CUSTOMER_ID)
        assert not await buffer.revoke_central(CUSTOMER_ID)
    async with await open_buffer(path) as buffer:
        assert await buffer.central_grants() == []


async def test_a_restart_keeps_the_grant_and_its_cut(tmp_path: Path) -> None:
    ledger = ConsentLedger(require_consent=True)
    path = tmp_path / "buffer.db"
    async with await open_buffer(path) as buffer:
        await buffer.commit([event(1, customer_id=CUSTOMER_ID)])
        grant = await granted(buffer, ledger, CUSTOMER_ID)
        await buffer.commit([event(2, customer_id=CUSTOMER_ID)])
        # A refresh keeps the first grant (its cut does not move forward).
        assert await buffer.grant_central(CUSTOMER_ID, "2026-11-28T08:00:00.000Z") == grant
    restarted = ConsentLedger(require_consent=True)
    async with await open_buffer(path) as buffer:
        restarted.load(await buffer.consent())
        restarted.load_central(await buffer.central_grants())
        ids = await uploaded_ids(buffer, restarted)
    assert restarted.central_grant(CUSTOMER_ID) == grant
    assert ids == {"ev-00000001": pseudonymise(CUSTOMER_ID, KEY), "ev-00000002": CUSTOMER_ID}


async def test_erasure_drops_the_grant(tmp_path: Path) -> None:
    ledger = ConsentLedger(require_consent=True)
    path = tmp_path / "buffer.db"
    async with await open_buffer(path) as buffer:
        await granted(buffer, ledger, CUSTOMER_ID)
        assert CUSTOMER_ID in await buffer.held_customers()  # an erasure by pseudonym finds it
        totals = await buffer.erase([CUSTOMER_ID])
        ledger.forget(CUSTOMER_ID)  # the erasure listener
        assert totals["consent"] == 1
        assert await buffer.central_grants() == []
        await buffer.commit([event(1, customer_id=CUSTOMER_ID)])
        ids = await uploaded_ids(buffer, ledger)
    assert ids == {"ev-00000001": pseudonymise(CUSTOMER_ID, KEY)}
    assert ledger.central_grant(CUSTOMER_ID) is None


def test_pseudonyms_and_rows_without_a_seq_are_never_granted() -> None:
    ledger = ConsentLedger(require_consent=True)
    pseudonym = pseudonymise(CUSTOMER_ID, KEY)
    assert not ledger.grant_central(CentralGrant(pseudonym, GRANT_TS, 0))
    assert not ledger.shares_profile(pseudonym, 10)
    assert ledger.grant_central(CentralGrant(CUSTOMER_ID, GRANT_TS, 5))
    assert not ledger.shares_profile(CUSTOMER_ID)  # no seq: no central grant applies
    assert not ledger.shares_profile(CUSTOMER_ID, 5)
    assert ledger.shares_profile(CUSTOMER_ID, 6)
    assert not ledger.shares_profile(None, 6)
