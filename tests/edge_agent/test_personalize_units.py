"""The personalizer's parts on their own: LRU bound, exploration, fallback order, files."""

from __future__ import annotations

import base64
import collections
import json
import random
import shutil
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast

import pytest

from cloud_sync.model_signature import load_private_key, sign_manifest, write_new_key
from edge_agent import cli
from edge_agent.buffer import Buffer
from edge_agent.config import BufferSection, config_from_dict
from edge_agent.errors import ConfigError
from edge_agent.events import Event, format_ts
from edge_agent.governance import ConsentLedger, ConsentRecord
from edge_agent.personalize.exploration import Catalogue, explore
from edge_agent.personalize.fallback import StorePopularity, bestsellers
from edge_agent.personalize.model_slot import LoadedModel, ModelSlot
from edge_agent.personalize.model_store import ModelStore, ModelStoreError
from edge_agent.personalize.policy import MaskFiles
from edge_agent.personalize.ranker import Masked, Ranker, Request
from edge_agent.personalize.session import SessionStore
from models import DEFAULT_MODEL_DIR, SuggestionContext, SuggestionModel

CONTEXT = SuggestionContext(12, "store-001", "shelf-01")


def test_sessions_are_bounded_by_the_lru_cap_and_history_length() -> None:
    sessions = SessionStore(cap=3, history_length=4, max_age_s=3600)
    for n in range(5):
        sessions.observe(f"c-{n}", "product.pickup", f"SKU-{n}", 1000.0 + n)
    assert len(sessions) == 3
    assert sessions.evicted == 2
    assert "c-0" not in sessions
    assert "c-1" not in sessions
    sessions.observe("c-2", "kiosk.view", "SKU-9", 1010.0)  # c-2 becomes the most recent
    sessions.observe("c-5", "product.pickup", "SKU-5", 1011.0)
    assert "c-2" in sessions
    assert "c-3" not in sessions  # the least recently active went
    for n in range(10):
        sessions.observe("c-2", "basket.add", f"SKU-{100 + n}", 1020.0 + n)
    assert [sku for sku, _, _ in sessions.history("c-2", 1030.0)] == [
        "SKU-106",
        "SKU-107",
        "SKU-108",
        "SKU-109",
    ]
    session = sessions.get("c-2")
    assert session is not None
    assert len(session.basket) == 10
    sessions.observe("c-2", "checkout.purchase", None, 1031.0)
    assert session.basket == set()
    assert sessions.history("c-2", 1020.0 + 3600 + 8) == [
        ("SKU-108", "basket.add", 1028.0),
        ("SKU-109", "basket.add", 1029.0),
    ]


def test_exploration_shows_one_uniform_item_with_its_propensity() -> None:
    catalogue = Catalogue.of([f"SKU-{n:03d}" for n in range(100)])
    greedy = [("SKU-000", 0.9), ("SKU-001", 0.8), ("SKU-002", 0.7)]
    masked = Masked(frozenset({f"SKU-{n:03d}" for n in range(90, 95)}))
    pool = 100 - 5 - 3
    rng = random.Random(7)
    trials = 20_000
    explored: collections.Counter[str] = collections.Counter()
    for _ in range(trials):
        slate = explore(greedy, catalogue, masked, 0.2, rng)
        assert slate.items[:2] == greedy[:2]
        assert slate.propensities[:2] == [1.0, 1.0]
        if slate.explored_slot is None:
            assert slate.items[2] == greedy[2]
            assert slate.propensities[2] == pytest.approx(0.8)
            continue
        assert slate.explored_slot == 2
        sku = slate.items[2][0]
        assert sku not in masked
        assert sku not in {s for s, _ in greedy}
        assert slate.propensities[2] == pytest.approx(0.2 / pool)
        explored[sku] += 1
    assert sum(explored.values()) / trials == pytest.approx(0.2, abs=0.015)
    assert len(explored) == pool  # every eligible item can be drawn ...
    expected = 0.2 * trials / pool
    assert all(0.4 * expected < n < 1.8 * expected for n in explored.values())  # ... evenly
    still = explore(greedy, catalogue, masked, 0.0, rng)
    assert still.propensities == [1.0, 1.0, 1.0]
    assert still.explored_slot is None


class RaisingModel:
    """Stands in for an onnxruntime session that fails (a boundary we do not own)."""

    version = "broken"
    items = ("SKU-000001",)

    def suggest(self, *_args: Any, **_kwargs: Any) -> list[tuple[str, float]]:
        raise RuntimeError("onnxruntime: bad allocation")


def request(personal: bool = True, masked: Masked | None = None) -> Request:
    history = [("SKU-000010", "product.pickup", 1000.0)]
    return Request(history, CONTEXT, masked or Masked(frozenset({"SKU-000010"})), 1000.0, personal)


def test_fallback_order_model_then_store_popularity_then_bestsellers(tmp_path: Path) -> None:
    slot = ModelSlot(ModelStore(tmp_path, DEFAULT_MODEL_DIR))
    popularity = StorePopularity(86_400)
    ranker = Ranker(slot, popularity, bestsellers(), k=3, epsilon=0.0)
    # No model, no popularity: bestsellers, masked items skipped.
    top = bestsellers()[0][0]
    decision = ranker.decide(request(masked=Masked(frozenset({top}))))
    assert decision.source == "bestsellers"
    assert top not in {sku for sku, _ in decision.slate.items}
    assert len(decision.slate.items) == 3
    # Popularity with fewer than k usable items is not an answer; with k it is.
    popularity.ranked = (("SKU-000010", 1.0), ("SKU-000011", 0.5), ("SKU-000012", 0.4))
    assert ranker.decide(request()).source == "bestsellers"  # SKU-000010 is masked
    popularity.ranked = (*popularity.ranked, ("SKU-000013", 0.1))
    decision = ranker.decide(request())
    assert decision.source == "store_popularity"
    assert [sku for sku, _ in decision.slate.items] == ["SKU-000011", "SKU-000012", "SKU-000013"]
    # A model that raises: the fallback answers and says why.
    broken = cast(SuggestionModel, RaisingModel())
    slot.current = LoadedModel(broken, Catalogue.of(broken.items), tmp_path, "test", 0.0)
    decision = ranker.decide(request())
    assert decision.source == "store_popularity"
    assert decision.error is not None
    assert "bad allocation" in decision.error
    assert ranker.model_errors == 1
    # A working model answers personal requests only.
    model = SuggestionModel.load(DEFAULT_MODEL_DIR)
    slot.current = LoadedModel(model, Catalogue.of(model.items), DEFAULT_MODEL_DIR, "test", 0.0)
    decision = ranker.decide(request())
    assert decision.source == "model"
    assert decision.model_version == model.version
    assert "SKU-000010" not in {sku for sku, _ in decision.slate.items}
    assert ranker.decide(request(personal=False)).source == "store_popularity"
    slot.close()


async def test_store_popularity_counts_the_buffer_window(tmp_path: Path) -> None:
    now = format_ts(datetime.now(UTC))
    events = [
        Event(
            f"e{n}",
            kind,
            now,
            "store-001",
            "shelf-01",
            "c-1",
            "test",
            cast(dict[str, Any], data),
            now,
        )
        for n, (kind, data) in enumerate(
            [
                ("product.pickup", {"sku": "SKU-A"}),
                ("basket.add", {"sku": "SKU-A"}),
                ("product.scan", {"sku": "SKU-B"}),
                ("telemetry", {"values": {"t": 1}}),
                ("checkout.purchase", {"items": []}),
            ]
        )
    ]
    popularity = StorePopularity(86_400)
    async with await Buffer.open(tmp_path / "buffer.db", BufferSection()) as buffer:
        await buffer.commit(events)
        assert await popularity.refresh(buffer) == (("SKU-A", 1.0), ("SKU-B", 0.5))
        await buffer.commit(
            [Event("e9", "kiosk.view", now, "store-001", None, None, "t", {"sku": "SKU-B"}, now)]
        )
        assert await popularity.refresh(buffer) == (("SKU-A", 1.0), ("SKU-B", 1.0))
        two_days_later = time.time() + 2 * 86_400
        assert await popularity.refresh(buffer, two_days_later) == ()


def consent_record(customer_id: str, ts: str, personalization: bool) -> ConsentRecord:
    return ConsentRecord(customer_id, personalization, False, False, ts, f"e-{ts}")


def test_consent_latest_wins_and_unknown_depends_on_require_consent() -> None:
    strict = ConsentLedger(require_consent=True)
    assert not strict.allows_personalization("c-1")
    strict.load([consent_record("c-1", "2026-11-22T10:00:00.000Z", True)])
    strict.load([consent_record("c-1", "2026-11-22T09:00:00.000Z", False)])  # older: ignored
    assert strict.allows_personalization("c-1")
    strict.load([consent_record("c-1", "2026-11-22T11:00:00.000Z", False)])
    assert not strict.allows_personalization("c-1")
    lenient = ConsentLedger(require_consent=False)
    assert lenient.allows_personalization("c-2")
    lenient.load([consent_record("c-2", "2026-11-22T11:00:00.000Z", False)])
    assert not lenient.allows_personalization("c-2")


def test_mask_files_are_reread_when_they_change(tmp_path: Path) -> None:
    out_of_stock, blocked = tmp_path / "oos.txt", tmp_path / "blocked.txt"
    masks = MaskFiles(out_of_stock, blocked)
    assert not masks.refresh()
    out_of_stock.write_text("SKU-1  # left shelf\n\n# a comment\nSKU-2\n")
    blocked.write_text("SKU-3\n")
    assert masks.refresh()
    assert masks.skus == {"SKU-1", "SKU-2", "SKU-3"}
    assert not masks.refresh()
    out_of_stock.unlink()
    assert masks.refresh()
    assert masks.skus == {"SKU-3"}


def test_model_cli_status_and_rollback_without_previous(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "agent.toml"
    config.write_text(f'[agent]\nstore_id = "s-1"\ndata_dir = "{tmp_path / "data"}"\n')
    assert cli.main(["model", "rollback", "--config", str(config)]) == 1
    assert "no previous model" in capsys.readouterr().err
    store = ModelStore(tmp_path / "data", DEFAULT_MODEL_DIR)
    store.ensure_dirs()
    with pytest.raises(ModelStoreError):
        store.rollback()
    assert cli.main(["model", "status", "--config", str(config)]) == 0
    status = json.loads(capsys.readouterr().out)
    assert status["current"]["version"] == "sim-8bf6d734370d"
    assert status["current"]["chosen_by"] == "config"
    assert status["rollback_possible"] is False


@pytest.mark.parametrize(
    "manifest", ['{"version": {"x": 1}, "items": 5}', "[" * 50_000 + "]" * 50_000, "[]"]
)
def test_model_cli_status_reports_a_hostile_manifest_without_crashing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], manifest: str
) -> None:
    hostile = tmp_path / "hostile"
    hostile.mkdir()
    (hostile / "manifest.json").write_text(manifest)
    config = tmp_path / "agent.toml"
    config.write_text(
        f'[agent]\nstore_id = "s-1"\ndata_dir = "{tmp_path / "data"}"\n'
        f'[model]\npath = "{hostile}"\n'
    )
    assert cli.main(["model", "status", "--config", str(config)]) == 0
    current = json.loads(capsys.readouterr().out)["current"]
    assert current["version"] is None
    assert current.get("items") is None


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("epsilon", 1.5),
        ("session_cap", 0),
        ("suggestion_topic", "edge/{store_id}/suggestions"),
        ("suggestion_topic", "edge/{device_id}/{nope}"),
        ("suggestion_topic", "edge/+/{device_id}"),
        ("suggestion_qos", 2),
        ("implicit_accept_window_s", -1),
    ],
)
def test_bad_personalizer_config_names_the_key(key: str, value: object) -> None:
    with pytest.raises(ConfigError, match=f"model.{key}"):
        config_from_dict({"agent": {"store_id": "s-1"}, "model": {key: value}})


async def test_an_arriving_model_must_be_signed_when_a_key_is_configured(tmp_path: Path) -> None:
    public = base64.b64decode(write_new_key(tmp_path / "signing.pem"))
    slot = ModelSlot(ModelStore(tmp_path / "data", DEFAULT_MODEL_DIR), [public])
    await slot.start()  # the bundled model is the operator's: no signature needed
    try:
        unsigned = tmp_path / "unsigned"
        shutil.copytree(DEFAULT_MODEL_DIR, unsigned)
        offer = await slot.offer_model(unsigned)
        assert not offer.accepted
        assert "unsigned" in offer.detail
        assert slot.status()["refused"] == 1

        signed = tmp_path / "signed"
        shutil.copytree(DEFAULT_MODEL_DIR, signed)
        manifest = json.loads((signed / "manifest.json").read_text())
        manifest["version"] = "signed-1"
        key = load_private_key(tmp_path / "signing.pem")
        (signed / "manifest.json").write_text(json.dumps(sign_manifest(manifest, key)))
        offer = await slot.offer_model(signed)
        assert offer.accepted, offer.detail
        assert slot.version == "signed-1"
    finally:
        slot.close()
