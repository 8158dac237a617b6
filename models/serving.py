"""The runtime API the agent uses: load a verified model directory and suggest, fast.

The agent reads only the model directory through this module (it imports nothing from the
agent or the central store). ``SuggestionModel.suggest`` is synchronous and allocation-light;
the agent runs it off the event loop, e.g. in a one-thread executor. Calls are serialised by
a lock because the feed arrays are allocated once and reused.
"""

from __future__ import annotations

import functools
import logging
import math
import threading
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, Final

import numpy as np
import numpy.typing as npt
import onnxruntime as ort

from models.errors import ModelFormatError, ModelVerificationError
from models.features import (
    MASK_PENALTY,
    FeatureEncoder,
    FeatureSpec,
    HistoryEntry,
    SuggestionContext,
)
from models.io_names import INPUT_NAMES, OUTPUT_NAMES
from models.manifest import Manifest, read_manifest, verify_model_file

logger = logging.getLogger(__name__)

__all__ = ["DEFAULT_MODEL_DIR", "SuggestionContext", "SuggestionModel"]

# The model that ships in the package: what the agent uses when [model] path is empty.
DEFAULT_MODEL_DIR: Final = Path(__file__).resolve().parent / "default_model"

# Scores are float32 with values up to about 1: a relative tolerance far above rounding noise.
GOLDEN_SCORE_TOLERANCE = 1e-5


def _session_options() -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1  # one core for one tiny model: no thread hand-offs
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.log_severity_level = 3
    return options


class SuggestionModel:
    """A loaded, verified suggestion model. Use ``SuggestionModel.load(model_dir)``."""

    def __init__(self, model_dir: Path, manifest: Manifest, session: ort.InferenceSession) -> None:
        self.model_dir = model_dir
        self.manifest = manifest
        self.version: str = manifest.version
        self.items: tuple[str, ...] = manifest.items
        self.top_k: int = manifest.top_k
        self.feature_spec: FeatureSpec = manifest.feature_spec
        self._session = session
        self._encoder = FeatureEncoder(manifest.feature_spec, manifest.items)
        self._lock = threading.Lock()
        self._check_signature()

    @classmethod
    def load(cls, model_dir: str | Path, *, check_golden: bool = True) -> SuggestionModel:
        """Verify the sha256, open a single-threaded session and (by default) run the golden
        requests. Raises ModelFormatError, ModelIntegrityError or ModelVerificationError."""
        directory = Path(model_dir)
        manifest = read_manifest(directory)
        model_path = verify_model_file(directory, manifest)
        try:
            session = ort.InferenceSession(
                str(model_path), _session_options(), providers=["CPUExecutionProvider"]
            )
        except Exception as exc:  # onnxruntime raises its own untyped errors: translate once
            raise ModelFormatError(f"onnxruntime cannot load {model_path}: {exc}") from exc
        model = cls(directory, manifest, session)
        if check_golden:
            model.check_golden_requests()
        logger.info("model.loaded version=%s items=%d", model.version, len(model.items))
        return model

    def _check_signature(self) -> None:
        inputs = {node.name: node.shape for node in self._session.get_inputs()}
        outputs = [node.name for node in self._session.get_outputs()]
        if set(inputs) != set(INPUT_NAMES) or outputs != list(OUTPUT_NAMES):
            raise ModelFormatError(f"{self.model_dir}: unexpected model inputs/outputs")
        if inputs["penalty"] != [len(self.items)]:
            raise ModelFormatError(f"{self.model_dir}: model and manifest disagree on items")
        if inputs["history_items"] != [self.feature_spec.history_length]:
            raise ModelFormatError(f"{self.model_dir}: history_length disagrees with the model")

    def build_feeds(
        self,
        history: Sequence[HistoryEntry],
        context: tuple[int, str, str | None],
        penalty_skus: Iterable[str] = (),
        *,
        k: int | None = None,
        now: float | None = None,
        exclude_history: bool = True,
    ) -> dict[str, npt.NDArray[Any]]:
        """The model's feed arrays for one request (reused by the next call: copy to keep).
        ``history`` is (sku, event type, ts seconds), oldest first; ``now`` defaults to the
        latest ts; with ``exclude_history`` the history's items are masked too."""
        return self._encoder.encode(
            history,
            context,
            penalty_skus,
            k=self.top_k if k is None else k,
            now=now,
            exclude_history=exclude_history,
        )

    def run_feeds(
        self, feeds: dict[str, npt.NDArray[Any]]
    ) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]:
        """One onnxruntime call: (top scores, top item indices), best first."""
        scores, indices = self._session.run(OUTPUT_NAMES, feeds)
        return scores, indices

    def suggest(
        self,
        history: Sequence[HistoryEntry],
        context: tuple[int, str, str | None],
        penalty_skus: Iterable[str] = (),
        *,
        k: int | None = None,
        now: float | None = None,
        exclude_history: bool = True,
    ) -> list[tuple[str, float]]:
        """Up to k (default ``top_k``) (sku, score) pairs, best first, never a masked item."""
        with self._lock:
            feeds = self.build_feeds(
                history, context, penalty_skus, k=k, now=now, exclude_history=exclude_history
            )
            scores, indices = self._session.run(OUTPUT_NAMES, feeds)
            penalty = self._encoder.penalty
            items = self.items
            return [
                (items[index], float(score))
                for score, index in zip(scores.tolist(), indices.tolist(), strict=True)
                if penalty[index] < MASK_PENALTY
            ]

    def _run_checked(
        self, what: str, run: Callable[[], list[tuple[str, float]]]
    ) -> list[tuple[str, float]]:
        try:
            return run()
        except Exception as exc:  # onnxruntime's untyped errors, or values no request can hold
            raise ModelVerificationError(f"{self.model_dir}: {what} failed: {exc!r}"[:500]) from exc

    def check_golden_requests(self) -> None:
        """Re-run the requests stored at export; raise ModelVerificationError on a difference.
        The agent's hot swap calls this before switching to a new model."""
        spec = self.feature_spec
        # The manifest's last store and device must index the model's tables: a manifest that
        # names more than the model holds fails here, not on some customer's request later.
        last_store = spec.stores[-1] if spec.stores else ""
        probe = (12, last_store, spec.devices[-1] if spec.devices else None)
        self._run_checked("the store/device probe", functools.partial(self.suggest, (), probe))
        for number, request in enumerate(self.manifest.golden_requests):
            answer = self._run_checked(
                f"golden request {number}",
                functools.partial(
                    self.suggest,
                    request.history,
                    request.context,
                    request.penalty_skus,
                    k=len(request.expected) or None,
                    now=request.now,
                ),
            )
            expected = list(request.expected)
            same_items = [sku for sku, _ in answer] == [sku for sku, _ in expected]
            close = same_items and all(
                math.isclose(got, want, rel_tol=GOLDEN_SCORE_TOLERANCE, abs_tol=1e-7)
                for (_, got), (_, want) in zip(answer, expected, strict=True)
            )
            if not close:
                raise ModelVerificationError(
                    f"{self.model_dir}: golden request {number} answered {answer[:3]}..., "
                    f"expected {expected[:3]}..."
                )
