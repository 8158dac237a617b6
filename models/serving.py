"""The runtime API the agent uses: load a verified model directory and suggest, fast.

The agent reads only the model directory through this module (it imports nothing from the
agent or the central store). ``SuggestionModel.suggest`` is synchronous and allocation-light;
the agent runs it off the event loop, e.g. in a one-thread executor. Calls are serialised by
a lock because the feed arrays are allocated once and reused.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import math
import threading
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, Final

import numpy as np
import numpy.typing as npt

from models.errors import ModelFormatError, ModelIntegrityError, ModelVerificationError
from models.features import (
    MASK_PENALTY,
    FeatureEncoder,
    FeatureSpec,
    HistoryEntry,
    SuggestionContext,
)
from models.graph_names import INPUT_NAMES, OUTPUT_NAMES
from models.manifest import Manifest, read_manifest
from models.sessions import RUNTIMES, InferenceSession, Runtime, open_session

logger = logging.getLogger(__name__)

__all__ = ["DEFAULT_MODEL_DIR", "RUNTIMES", "Runtime", "SuggestionContext", "SuggestionModel"]

# The model that ships in the package: what the agent uses when [model] path is empty.
DEFAULT_MODEL_DIR: Final = Path(__file__).resolve().parent / "default_model"

# Scores are float32 with values up to about 1: a relative tolerance far above rounding noise.
GOLDEN_SCORE_TOLERANCE = 1e-5
# A model file is read whole into memory to be checked and parsed: beyond this it is refused.
MAX_MODEL_FILE_BYTES: Final = 512 * 1024 * 1024


class SuggestionModel:
    """A loaded, verified suggestion model. Use ``SuggestionModel.load(model_dir)``."""

    def __init__(self, model_dir: Path, manifest: Manifest, session: InferenceSession) -> None:
        self.model_dir = model_dir
        self.manifest = manifest
        self.version: str = manifest.version
        self.items: tuple[str, ...] = manifest.items
        self.top_k: int = manifest.top_k
        self.feature_spec: FeatureSpec = manifest.feature_spec
        self._session = session
        self.runtime: str = session.runtime  # "numpy" or "onnxruntime"
        self._encoder = FeatureEncoder(manifest.feature_spec, manifest.items)
        self._lock = threading.Lock()
        self._check_signature()

    @classmethod
    def load(
        cls, model_dir: str | Path, *, check_golden: bool = True, runtime: Runtime = "auto"
    ) -> SuggestionModel:
        """Verify the sha256, open a session (``runtime``: "numpy", "onnxruntime", or "auto":
        numpy when it runs every op of the graph) and (by default) run the golden requests.
        Raises ModelFormatError, ModelIntegrityError or ModelVerificationError."""
        if runtime not in RUNTIMES:
            raise ValueError(f"runtime must be one of {RUNTIMES}, not {runtime!r}")
        directory = Path(model_dir)
        manifest = read_manifest(directory)
        model_path = directory / manifest.model_file
        data = _read_verified(model_path, manifest.sha256)
        model = cls(directory, manifest, open_session(data, runtime, str(model_path)))
        del data  # the session holds what it needs; the file's bytes go now
        if check_golden:
            model.check_golden_requests()
        logger.info(
            "model.loaded version=%s items=%d runtime=%s",
            model.version,
            len(model.items),
            model.runtime,
        )
        return model

    def _check_signature(self) -> None:
        inputs = self._session.input_shapes()
        outputs = self._session.output_names()
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
        """One model call: (top scores, top item indices), best first."""
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
        except (
            Exception
        ) as exc:  # ModelRunError, onnxruntime's untyped errors, values no request can hold
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


def _read_verified(path: Path, sha256: str) -> bytes:
    """The model file's bytes once their sha256 matches the manifest's: the session is built
    from the very bytes that were checked, not from a second read of the file."""
    if not path.is_file():
        raise ModelFormatError(f"model file missing: {path}")
    with path.open("rb") as handle:
        data = handle.read(MAX_MODEL_FILE_BYTES + 1)
    if len(data) > MAX_MODEL_FILE_BYTES:
        raise ModelFormatError(f"{path}: larger than {MAX_MODEL_FILE_BYTES} bytes")
    actual = hashlib.sha256(data).hexdigest()
    if actual != sha256:
        raise ModelIntegrityError(f"{path}: sha256 {actual} does not match the manifest's {sha256}")
    return data
