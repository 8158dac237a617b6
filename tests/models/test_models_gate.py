"""The evaluation gate: the time-based holdout, the beats_current rule, and
``edge-models evaluate --holdout-from/--holdout-days --current`` writing evaluation.json."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from models.cli import main
from models.events import collapse_takes, format_ts, load_event_log, parse_ts
from models.gate import EVALUATION_FILE, GateRule, decide, holdout_cases
from tests.support.model_loop import CUT, LoopModels, build_loop_models


@pytest.fixture(scope="module")
def loop(tmp_path_factory: pytest.TempPathFactory) -> LoopModels:
    return build_loop_models(tmp_path_factory.mktemp("loop"))


def test_holdout_cases_are_the_takes_after_the_cut_with_their_whole_past(
    loop: LoopModels,
) -> None:
    log = load_event_log(loop.events)
    cut = parse_ts(CUT)
    assert cut is not None
    cases = list(holdout_cases(log, cut))
    expected = 0
    for timeline in log.consenting():
        takes = collapse_takes(timeline.interactions)
        expected += sum(1 for n, take in enumerate(takes) if n > 0 and take[0].ts >= cut)
    assert len(cases) == expected > 500
    for case in cases:
        assert case.target.ts >= cut
        assert case.context
        assert all(event.ts <= case.target.ts for event in case.context)
        assert case.context[-1].sku != case.target.sku  # an earlier take, not the same one
    assert any(case.context[-1].ts >= cut for case in cases)  # earlier holdout takes count


def _side(hit: float, snips: float | None = None, se: float = 0.01, n: int = 100) -> dict[str, Any]:
    return {"hit_rate@10": hit, "snips": snips, "snips_se": se, "snips_matched_items": n}


@pytest.mark.parametrize(
    ("candidate", "current", "beats", "reason"),
    [
        (_side(0.30), _side(0.25), True, "beats_current"),
        (_side(0.30), _side(0.30), False, "not better on any measure"),
        (_side(0.296), _side(0.30), False, "not better on any measure"),  # within tolerance
        (_side(0.29), _side(0.30), False, "worse by 0.0100 > tolerance"),
        # SNIPS compared: clearly lower fails, a little lower (noise) does not
        (_side(0.35, 0.10), _side(0.30, 0.20), False, "snips lower by 0.1000"),
        (_side(0.35, 0.19), _side(0.30, 0.20), True, "beats_current"),
        # equal hit rate, but a compared SNIPS higher: better somewhere
        (_side(0.30, 0.25), _side(0.30, 0.20), True, "beats_current"),
        # too little support: SNIPS is not compared and cannot carry the decision
        (_side(0.30, 0.90, n=5), _side(0.30, 0.20), False, "not better on any measure"),
        (_side(0.35, 0.01, n=5), _side(0.30, 0.20), True, "beats_current"),
        (_side(0.35, None), _side(0.30, 0.20), True, "beats_current"),
    ],
)
def test_the_beats_current_rule(
    candidate: dict[str, Any], current: dict[str, Any], beats: bool, reason: str
) -> None:
    decided, details = decide(candidate, current, GateRule())
    assert decided is beats
    assert reason in details["reason"]


def test_nothing_to_beat_without_a_current_model() -> None:
    assert decide(_side(0.0), None, GateRule())[0] is True


def _evaluate(
    capsys: pytest.CaptureFixture[str], model: Path, loop: LoopModels, *extra: str
) -> dict[str, Any]:
    argv = ["evaluate", "--model", str(model), "--events", str(loop.events), "--json", *extra]
    assert main(argv) == 0
    printed = json.loads(capsys.readouterr().out)
    written: dict[str, Any] = json.loads((model / EVALUATION_FILE).read_text("utf-8"))
    assert printed == written
    return written


def test_evaluate_writes_the_gate_document(
    loop: LoopModels, capsys: pytest.CaptureFixture[str]
) -> None:
    better = _evaluate(
        capsys, loop.better, loop, "--current", str(loop.current), "--holdout-from", CUT
    )
    assert better["candidate"]["version"] == "better-1"
    assert better["current"]["version"] == "current-1"
    for side in (better["candidate"], better["current"]):
        assert {"version", "hit_rate@10", "ndcg@10", "snips"} <= set(side)
        assert side["leak"] is False  # trained with --until the cut
    assert better["beats_current"] is True
    assert better["candidate"]["hit_rate@10"] > better["current"]["hit_rate@10"]
    assert better["holdout"]["from"] == "2026-11-15T00:00:00.000Z"
    assert better["holdout"]["cases"] > 500
    assert better["feedback"]["suggestions"] > 100
    # the simulator's feedback is clean, but it shows suggestions to customers without consent
    skipped = better["feedback"]["skipped"]
    assert set(skipped) == {"shown_customer_not_consenting"}
    assert skipped["shown_customer_not_consenting"] > 0

    worse = _evaluate(
        capsys, loop.worse, loop, "--current", str(loop.current), "--holdout-from", CUT
    )
    assert worse["beats_current"] is False
    assert "hit_rate@10 worse" in worse["decision"]["reason"]
    # the worse model is worse than plain popularity too: it learnt the wrong items
    assert worse["candidate"]["hit_rate@10"] < worse["holdout"]["popularity"]["hit_rate@10"]


def test_holdout_days_and_a_leaking_model(
    loop: LoopModels, holdout_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # holdout_model_dir was trained on a whole (other) file: its window reaches past any cut
    model = tmp_path / "leaky"
    shutil.copytree(holdout_model_dir, model)
    document = _evaluate(capsys, model, loop, "--holdout-days", "7")
    assert document["current"] is None
    assert document["beats_current"] is True
    last_ts = load_event_log(loop.events).last_ts
    assert document["holdout"]["from"] == format_ts(last_ts - 7 * 86400.0)
    assert document["candidate"]["leak"] is True


def test_current_without_a_holdout_is_a_usage_error(
    loop: LoopModels, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["evaluate", "--model", str(loop.better), "--events", str(loop.events)]
    with pytest.raises(SystemExit) as exited:
        main([*argv, "--current", str(loop.current)])
    assert exited.value.code == 2
    assert "needs a time holdout" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([*argv, "--holdout-days", "3", "--holdout-from", CUT])
    assert main([*argv, "--holdout-from", "2030-01-01T00:00:00Z"]) == 1  # nothing after it
    assert "no take at or after" in capsys.readouterr().err
