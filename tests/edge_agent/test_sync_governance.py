"""The upload rule and the agent's keys (edge_agent.governance, cloud_sync.sync_batches)."""

from __future__ import annotations

import gzip
import json
import stat
from collections.abc import Sequence
from pathlib import Path
from typing import cast

import pytest

from cloud_sync.sync_batches import Row, build_batch
from edge_agent.buffer import Buffer
from edge_agent.config import BufferSection, config_from_dict
from edge_agent.errors import ConfigError
from edge_agent.events import Event, derive_event_id
from edge_agent.governance import (
    ConsentLedger,
    ConsentRecord,
    event_id_key,
    pseudonym_key,
    pseudonymise,
    pseudonymise_envelope,
)
from edge_agent.pipeline import Pipeline

KEY = b"k" * 32


def envelope(customer_id: str | None, event_type: str = "product.pickup", **data: object) -> str:
    return json.dumps(
        {
            "event_id": "e-1",
            "type": event_type,
            "ts": "2026-11-22T08:00:00.000Z",
            "store_id": "s",
            "device_id": "d",
            "customer_id": customer_id,
            "source": "mqtt:x",
            "schema": 1,
            "data": data or {"sku": "SKU-1"},
            "received_at": "2026-11-22T08:00:00.000Z",
        },
        separators=(",", ":"),
    )


def test_the_key_is_generated_once_private_and_kept(tmp_path: Path) -> None:
    config = config_from_dict({"agent": {"store_id": "s", "data_dir": str(tmp_path)}})
    first = pseudonym_key(config)
    path = tmp_path / "pseudonym.key"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert pseudonym_key(config) == first  # a restart keeps every pseudonym stable
    assert len(first) == 64


def test_a_configured_key_wins_and_a_short_one_is_refused_by_name(tmp_path: Path) -> None:
    base = {"agent": {"store_id": "s", "data_dir": str(tmp_path)}}
    config = config_from_dict({**base, "governance": {"pseudonym_key": "x" * 20}})
    assert pseudonym_key(config) == b"x" * 20
    assert not (tmp_path / "pseudonym.key").exists()
    short = config_from_dict({**base, "governance": {"pseudonym_key": "short"}})
    with pytest.raises(ConfigError, match=r"governance\.pseudonym_key"):
        pseudonym_key(short)


def test_pseudonyms_are_stable_per_key_and_differ_across_keys() -> None:
    assert pseudonymise("c-1", KEY) == pseudonymise("c-1", KEY)
    assert pseudonymise("c-1", KEY) != pseudonymise("c-2", KEY)
    assert pseudonymise("c-1", KEY) != pseudonymise("c-1", b"other-key-0123456789")
    assert pseudonymise("c-1", KEY).startswith("ps-")
    assert "c-1" not in pseudonymise("c-1", KEY)


def test_an_identified_event_hides_both_ids_and_keeps_the_rest() -> None:
    original = json.loads(envelope("c-9", "customer.identified", method="card", alias="card-9"))
    governed = json.loads(pseudonymise_envelope(json.dumps(original), KEY))
    assert governed["customer_id"] == pseudonymise("c-9", KEY)
    assert governed["data"] == {"method": "card", "alias": pseudonymise("card-9", KEY)}
    for field in ("event_id", "type", "ts", "store_id", "device_id", "source", "received_at"):
        assert governed[field] == original[field]


def ledger(require_consent: bool, sharing: dict[str, bool] | None = None) -> ConsentLedger:
    """The consent in force: ``sharing`` maps customers to their profile_sharing flag."""
    consent = ConsentLedger(require_consent)
    ts = "2026-11-22T08:00:00.000Z"
    consent.load(ConsentRecord(c, True, s, False, ts, f"e-{c}") for c, s in (sharing or {}).items())
    return consent


def body_of(
    rows: list[Row], require_consent: bool, sharing: dict[str, bool] | None = None
) -> list[dict[str, object]]:
    batch = build_batch(rows, ledger(require_consent, sharing), KEY, compress=True)
    assert batch.gzipped
    decoded: list[dict[str, object]] = json.loads(gzip.decompress(batch.body))
    return decoded


def test_the_upload_rule_follows_consent() -> None:
    rows = [
        Row(1, envelope("c-yes"), customer_id="c-yes"),
        Row(2, envelope("c-no"), customer_id="c-no"),
        Row(3, envelope("c-unknown"), customer_id="c-unknown"),
        Row(4, envelope(None, "telemetry", values={"temp_c": 4.0}), False),
    ]
    consent = {"c-yes": True, "c-no": False}
    governed = [item["customer_id"] for item in body_of(rows, True, consent)]
    assert governed == ["c-yes", pseudonymise("c-no", KEY), pseudonymise("c-unknown", KEY), None]
    clear = [item["customer_id"] for item in body_of(rows, False, consent)]
    assert clear == ["c-yes", "c-no", "c-unknown", None]
    assert build_batch(rows, ledger(True), KEY, compress=False).body.startswith(b"[{")


def hostile_envelopes(customer_id: str, alias: str) -> list[str]:
    """What a careless or hostile device can put in an envelope to dodge a text search."""
    return [
        envelope(customer_id, note={"customer_id": None}, sku="SKU-1"),
        envelope(customer_id, sku="SKU-1", tags=[{"customer_id": None}, "x"]),
        envelope(customer_id, "kiosk.view", page=f"profile/{customer_id}", sku=customer_id),
        envelope(customer_id, "checkout.purchase", items=[customer_id, {"sku": customer_id}]),
        envelope(customer_id, "customer.identified", method="card", alias=alias, copy=alias),
        envelope(customer_id, "product.pickup", sku="SKU-1", **{customer_id: 1}),
    ]


def test_consent_is_decided_from_structure_never_from_text() -> None:
    customers = [(f"c-{n:06d}", f"card-{n:06d}") for n in range(60)]
    rows = [
        Row(seq, text, customer_id=json.loads(text)["customer_id"])
        for seq, text in enumerate(
            (text for cid, alias in customers for text in hostile_envelopes(cid, alias)), 1
        )
    ]
    body = json.dumps(body_of(rows, require_consent=True))
    leaked = [clear for pair in customers for clear in pair if clear in body]
    assert leaked == []
    uploaded = body_of(rows, require_consent=True)
    assert {item["customer_id"] for item in uploaded} == {
        pseudonymise(cid, KEY) for cid, _ in customers
    }
    identified = next(item for item in uploaded if item["type"] == "customer.identified")
    assert cast(dict[str, object], identified["data"])["alias"] == pseudonymise("card-000000", KEY)


def test_short_ids_are_replaced_only_where_a_whole_string_names_them() -> None:
    governed = json.loads(pseudonymise_envelope(envelope("c-1", sku="c-1", shelf="abc-12"), KEY))
    assert governed["data"] == {"sku": pseudonymise("c-1", KEY), "shelf": "abc-12"}


def test_derived_event_ids_are_keyed_and_the_key_is_kept(tmp_path: Path) -> None:
    config = config_from_dict({"agent": {"store_id": "s", "data_dir": str(tmp_path)}})
    key = event_id_key(config)
    assert event_id_key(config) == key  # a restart derives the same ids
    assert key != pseudonym_key(config)  # an id never equals a pseudonym of the same input
    raw = b'{"type":"product.pickup","customer_id":"c-000123","data":{"sku":"S"}}'
    assert derive_event_id(key, "mqtt:t", raw) == derive_event_id(key, "mqtt:t", raw)
    assert derive_event_id(key, "mqtt:t", raw) != derive_event_id(b"other-key", "mqtt:t", raw)
    assert derive_event_id(key, "mqtt:t", raw, 1) != derive_event_id(key, "mqtt:t", raw, 0)


def test_only_rows_whose_columns_name_nobody_skip_the_parse() -> None:
    telemetry = envelope(None, "telemetry", values={"temp_c": 4.0})
    named = envelope("c-000042", "telemetry", values={"temp_c": 4.0})
    rows = [Row(1, telemetry, False, None), Row(2, named, False, "c-000042")]
    batch = build_batch(rows, ledger(True), KEY, compress=False)
    assert batch.body.decode() == f"[{telemetry},{pseudonymise_envelope(named, KEY)}]"
    assert "c-000042" not in batch.body.decode()


async def test_the_pipeline_governs_before_the_taps_and_the_buffer_keeps_the_same_consent(
    tmp_path: Path,
) -> None:
    """One stage: the ledger the taps and the uploader ask is updated before anything sees
    the events, and the buffer's durable copy (reloaded at the next start) agrees with it."""
    ts = "2026-11-22T08:00:00.000Z"
    grant = {"personalization": True, "profile_sharing": True, "partner_sharing": False}
    withdraw = {**grant, "personalization": False, "profile_sharing": False}

    def update(event_id: str, flags: dict[str, bool], at: str) -> Event:
        return Event(event_id, "consent.update", at, "s", "d", "c-7", "mqtt:t", flags, at)

    pickup = Event("p-1", "product.pickup", ts, "s", "d", "c-7", "mqtt:t", {"sku": "S"}, ts)
    async with await Buffer.open(tmp_path / "buffer.db", BufferSection()) as buffer:
        consent = ConsentLedger(require_consent=True)
        pipeline = Pipeline(buffer, consent)
        seen: list[tuple[str, bool, bool]] = []

        def tap(events: Sequence[Event]) -> None:
            for event in events:
                flags = consent.allows_personalization("c-7"), consent.shares_profile("c-7")
                seen.append((event.event_id, *flags))

        pipeline.taps.append(tap)
        await pipeline.emit([update("u-1", grant, ts)])
        await pipeline.emit([update("u-2", withdraw, "2026-11-22T09:00:00.000Z"), pickup])
        reloaded = ConsentLedger(require_consent=True)
        reloaded.load(await buffer.consent())
    assert seen == [("u-1", True, True), ("u-2", False, False), ("p-1", False, False)]
    for ledger_ in (consent, reloaded):
        assert not ledger_.allows_personalization("c-7")
        assert not ledger_.shares_profile("c-7")
