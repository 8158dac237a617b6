"""The upload rule and the pseudonym key (edge_agent.governance, cloud_sync.sync_batches)."""

from __future__ import annotations

import gzip
import json
import stat
from pathlib import Path

import pytest

from cloud_sync.sync_batches import Row, build_batch
from edge_agent.config import config_from_dict
from edge_agent.errors import ConfigError
from edge_agent.governance import pseudonym_key, pseudonymise, pseudonymise_envelope

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


def body_of(rows: list[Row], require_consent: bool) -> list[dict[str, object]]:
    batch = build_batch(rows, require_consent, KEY, compress=True)
    assert batch.gzipped
    decoded: list[dict[str, object]] = json.loads(gzip.decompress(batch.body))
    return decoded


def test_the_upload_rule_follows_consent() -> None:
    rows = [
        Row(1, envelope("c-yes"), 1),
        Row(2, envelope("c-no"), 0),
        Row(3, envelope("c-unknown"), None),
        Row(4, envelope(None, "telemetry", values={"temp_c": 4.0}), None),
    ]
    governed = [item["customer_id"] for item in body_of(rows, require_consent=True)]
    assert governed == ["c-yes", pseudonymise("c-no", KEY), pseudonymise("c-unknown", KEY), None]
    clear = [item["customer_id"] for item in body_of(rows, require_consent=False)]
    assert clear == ["c-yes", "c-no", "c-unknown", None]
    assert build_batch(rows, True, KEY, compress=False).body.startswith(b"[{")
