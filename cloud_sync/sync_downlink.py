"""The way back to the store: erasure requests and model updates, once per sync cycle.

With ``[sync] nats_downlink`` the two arrive over NATS instead (``sync_nats_downlink``),
which applies them through this module's own steps: ``apply_erasure_page`` for an erasure
notice and ``offer_model`` for a model announcement, so the checks, the report to the store,
the cursor and the listeners are one code for both transports.

Erasures: ``GET /v1/erasures?after=CURSOR`` page by page. Each entry names an erased id
blinded with this agent's own key (``cloud_sync.erasure_blinding``); the agent blinds the ids
it holds (each clear id and its pseudonym) and matches. For the customers found it first tells
the store the pseudonyms it uploaded them under (``POST /v1/erasures/pseudonyms``: the store
erases those copies too), then erases them from the buffer and keeps the cursor in the buffer's
``meta`` table, in one transaction (``Buffer.erase``). A crash or a failed report
re-applies the page next cycle: both steps are idempotent.

Withdrawals: a ``consent.update`` that leaves a customer without ``profile_sharing`` means the
events the store already holds under the clear id must not stay in clear. Once per cycle the
consent updates committed since the last look (``meta`` ``sync.withdrawal_seq``) are read;
for each customer still without profile sharing, the clear id and its aliases are sent with
their pseudonyms (``POST /v1/pseudonymisations``) and the store rewrites that store's copies.

Models: ``GET /v1/models/latest`` with ``If-None-Match``. With ``[model] public_key`` set,
the manifest's ed25519 signature is checked first (``cloud_sync.model_signature``), before
anything is downloaded; then the artifact is streamed to
``<data_dir>/models/incoming/<version>/`` (at most ``[model] max_download_bytes``), its
sha256 checked against the manifest, and the verified directory offered to the model
listeners (``component.Ports``: the personalizer, if the agent has one). The ETag is kept
once the version was handled: a refused model (unsigned, badly signed, too large) is not
fetched again until a new one is published; a failed download (network, sha256 mismatch)
retries next cycle.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Final

from cloud_sync.envelope_schema import MAX_ID_LENGTH
from cloud_sync.erasure_blinding import blind
from cloud_sync.model_signature import ModelSignatureError, verify_manifest
from cloud_sync.sync_client import (
    BatchRefusedError,
    ErasureNotice,
    ModelTooLargeError,
    PublishedModel,
    StoreClient,
)
from edge_agent.buffer import Buffer
from edge_agent.component import ErasureListener, ModelListener
from edge_agent.config import Config, public_keys
from edge_agent.errors import SyncError
from edge_agent.governance import PSEUDONYM_PREFIX, pseudonymise

log = logging.getLogger(__name__)

ERASURE_CURSOR_KEY: Final = "sync.erasure_cursor"
MODEL_ETAG_KEY: Final = "sync.model_etag"
WITHDRAWAL_SEQ_KEY: Final = "sync.withdrawal_seq"
_WITHDRAWALS_PER_PAGE: Final = 500
_IDS_PER_REQUEST: Final = 1000
_MAX_PAGES_PER_CYCLE: Final = 20
_VERSION: Final = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,127}$")
_SHA256: Final = re.compile(r"^[0-9a-f]{64}$")


class ModelDigestMismatchError(SyncError):
    """A downloaded artifact does not match its manifest's sha256."""


class ModelRefusedError(SyncError):
    """A published model this agent must not use (signature, size, manifest); ``reason``
    is a short token for status and logs."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


def erasure_targets(
    held: Sequence[str], page: Sequence[ErasureNotice], key: bytes, blinding: bytes
) -> list[str]:
    """The held ids the page names (blinded, or clear for an admin-read feed), directly or
    through their pseudonym. Three HMACs per held id: run it off the buffer's owner thread."""
    blinded = {item.blinded for item in page if item.blinded}
    clear = {item.customer_id for item in page if item.customer_id}
    targets = []
    for cid in held:
        names = {cid, pseudonymise(cid, key)}
        if names & clear or {blind(blinding, name) for name in names} & blinded:
            targets.append(cid)
    return sorted(targets)


def _announceable(customer_id: str) -> bool:
    """An id the store accepts in a pseudonymisation (not one of our pseudonyms itself)."""
    return (
        0 < len(customer_id) <= MAX_ID_LENGTH
        and "\x00" not in customer_id
        and not customer_id.startswith(PSEUDONYM_PREFIX)
    )


def _withdrawn_ids(withdrawn: Sequence[tuple[str, Sequence[str]]]) -> set[str]:
    """Each withdrawn customer's clear id and the aliases its ``customer.identified``
    envelopes name."""
    ids: set[str] = set()
    for customer_id, identified in withdrawn:
        ids.add(customer_id)
        ids.update(alias for alias in map(_alias_of, identified) if alias)
    return ids - {""}


def _alias_of(envelope_json: str) -> str | None:
    try:
        data = json.loads(envelope_json).get("data")
    except (ValueError, AttributeError):
        return None
    alias = data.get("alias") if isinstance(data, dict) else None
    return alias if isinstance(alias, str) and alias else None


class Downlink:
    """Erasures and models for one agent; ``run_once`` is called once per sync cycle."""

    def __init__(self, client: StoreClient, buffer: Buffer, config: Config, key: bytes) -> None:
        self.client = client
        self.buffer = buffer
        self.incoming = config.data_dir / "models" / "incoming"
        self.key = key
        self.require_consent = config.governance.require_consent
        settings = config.model
        self.public_keys = public_keys(settings)
        self.max_download_bytes = settings.max_download_bytes
        self.erasures_applied = 0
        self.model_version: str | None = None
        self.models_refused = 0
        self.last_model_error: str | None = None

    async def apply_erasures(self, listeners: Sequence[ErasureListener] = ()) -> int:
        """Fetch and apply every new erasure request; return how many were applied.

        Each listener is told each erased clear id, for state outside the
        buffer (the personalizer's sessions).
        """
        cursor = str(await self.erasure_cursor())
        applied = 0
        for _ in range(_MAX_PAGES_PER_CYCLE):  # bounded: the rest waits for the next cycle
            page, next_after = await self.client.erasures(cursor)
            if not page:
                break
            applied += await self.apply_erasure_page(page, next_after, listeners)
            cursor = next_after
        if applied:
            await self.buffer.recount()  # erased rows left the counters behind
        return applied

    async def erasure_cursor(self) -> int:
        """The cursor of the last erasure applied, from the HTTP feed or the NATS downlink."""
        kept = await self.buffer.read_meta(ERASURE_CURSOR_KEY) or "0"
        return int(kept) if kept.isdigit() else 0

    async def apply_erasure_page(
        self, page: Sequence[ErasureNotice], next_after: str, listeners: Sequence[ErasureListener]
    ) -> int:
        """Apply one page of erasures (the HTTP feed's or one NATS notice) and keep
        ``next_after`` as the cursor, in the buffer's erase transaction; returns the
        requests applied. The caller recounts the buffer once it is done."""
        held = await self.buffer.held_customers()
        targets = await asyncio.to_thread(
            erasure_targets, held, page, self.key, self.client.blinding_key
        )
        if targets:  # before the local erase: a failed report retries the whole page
            pseudonyms = sorted({pseudonymise(cid, self.key) for cid in targets})
            await self.client.report_erased_pseudonyms(next_after, pseudonyms)
        totals = await self.buffer.erase(targets, (ERASURE_CURSOR_KEY, next_after))
        self.erasures_applied += len(page)
        for forget in listeners:
            for customer_id in targets:
                forget(customer_id)
        log.info(
            "sync.erasures.applied requests=%d customers=%d events=%d cursor=%s",
            len(page),
            len(targets),
            totals["events"],
            next_after,
        )
        return len(page)

    async def announce_withdrawals(self) -> int:
        """Send the store the pseudonyms of customers who withdrew profile sharing since the
        last look; returns how many ids were announced."""
        if not self.require_consent:
            return 0  # every id leaves in clear by configuration: nothing to rewrite
        kept = await self.buffer.read_meta(WITHDRAWAL_SEQ_KEY)
        after = int(kept or "0")
        announced = 0
        for _ in range(_MAX_PAGES_PER_CYCLE):
            withdrawn, last = await self.buffer.withdrawals_since(after, _WITHDRAWALS_PER_PAGE)
            if last == after:
                break
            ids = sorted(_withdrawn_ids(withdrawn))
            ids = [i for i in ids if _announceable(i)]
            for start in range(0, len(ids), _IDS_PER_REQUEST):  # the store takes 5000 at most
                chunk = ids[start : start + _IDS_PER_REQUEST]
                try:
                    await self.client.pseudonymise([(i, pseudonymise(i, self.key)) for i in chunk])
                except BatchRefusedError as exc:  # bad data must not stall the downlink
                    log.warning("sync.withdrawals.refused ids=%d error=%s", len(chunk), exc)
            announced += len(ids)
            if ids:
                log.info("sync.withdrawals.announced ids=%d up_to_seq=%d", len(ids), last)
            await self.buffer.write_meta(WITHDRAWAL_SEQ_KEY, str(last))
            after = last
        return announced

    async def fetch_model(self, listeners: Sequence[ModelListener] = ()) -> str | None:
        """Download a new published model; return its version when one was handled."""
        etag = await self.buffer.read_meta(MODEL_ETAG_KEY)
        model = await self.client.latest_model(etag)
        if model is None:
            return None
        return await self.offer_model(model, listeners)

    async def offer_model(
        self, model: PublishedModel, listeners: Sequence[ModelListener] = ()
    ) -> str | None:
        """Check, download, verify and offer ``model`` (from ``GET /v1/models/latest`` or a
        NATS announcement of the same answer); return its version when it was handled.
        A refused model is remembered by its ETag; a failed download raises SyncError."""
        try:
            self._check_offer(model)
            directory = self.incoming / model.version
            if not (directory / "manifest.json").exists():
                await self._download(model.version, model.sha256, model.manifest, directory)
        except ModelRefusedError as exc:
            self.models_refused += 1
            self.last_model_error = f"{model.version[:128]!r}: {exc}"
            log.error(  # noqa: TRY400 (the reason is the message; no traceback to show)
                "sync.model.refused version=%r reason=%s detail=%s",
                model.version[:128],
                exc.reason,
                exc,
            )
            # Refused for good: fetched again only once another model is published.
            await self.buffer.write_meta(MODEL_ETAG_KEY, model.etag)
            return None
        if not listeners:
            log.info(
                "sync.model.verified version=%s path=%s personalizer=absent",
                model.version,
                directory,
            )
        for offer in listeners:
            answer = await offer(directory)
            log.info(
                "sync.model.offered version=%s path=%s accepted=%s detail=%s",
                model.version,
                directory,
                answer.accepted,
                answer.detail,
            )
        await self.buffer.write_meta(MODEL_ETAG_KEY, model.etag)
        self.model_version = model.version
        return model.version

    def _check_offer(self, model: PublishedModel) -> None:
        """Everything decidable from the manifest alone, signature first."""
        if self.public_keys:
            try:
                signer = verify_manifest(model.manifest, self.public_keys)
            except ModelSignatureError as exc:
                raise ModelRefusedError(exc.reason, exc.detail) from exc
            log.info("sync.model.signature_ok version=%r key_id=%s", model.version[:128], signer)
        if not _VERSION.match(model.version):
            raise ModelRefusedError("bad_manifest", "version is not a safe directory name")
        if not _SHA256.match(model.sha256.lower()):
            raise ModelRefusedError("bad_manifest", "sha256 is not 64 hex digits")
        declared = model.manifest.get("size_bytes")
        if isinstance(declared, int) and declared > self.max_download_bytes:
            raise ModelRefusedError(
                "too_large", f"{declared} bytes, limit {self.max_download_bytes}"
            )

    async def _download(
        self, version: str, sha256: str, manifest: dict[str, Any], directory: Path
    ) -> None:
        staging = self.incoming / f".{version}.part"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        try:
            try:
                actual = await self.client.download_model(
                    version, staging / "model.onnx", self.max_download_bytes
                )
            except ModelTooLargeError as exc:
                raise ModelRefusedError("too_large", str(exc)) from exc
            if actual != sha256.lower():
                raise ModelDigestMismatchError(
                    f"model {version}: sha256 {actual} does not match the manifest's {sha256}"
                )
            # The manifest last: its presence marks a complete, verified directory.
            (staging / "manifest.json").write_text(json.dumps(manifest, indent=1), "utf-8")
            shutil.rmtree(directory, ignore_errors=True)
            staging.rename(directory)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        log.info("sync.model.downloaded version=%s sha256=%s", version, sha256)
