"""The agent's HTTP client for the central store; aiohttp errors end here, in one place
(``_exchange``): every request's network failure, timeout or unreadable answer becomes a
``StoreUnavailableError`` naming the request.

Every answer the uploader must act on differently is its own exception: retry the same
batch later (``StoreUnavailableError``), split it (``BatchTooLargeError``), look for the bad
event in it (``BatchRefusedError``), or stop and tell a person (``StoreForbiddenError``: a
token or config problem).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, NoReturn
from urllib.parse import quote

import aiohttp

from cloud_sync.erasure_blinding import blinding_key
from edge_agent.errors import SyncError

log = logging.getLogger(__name__)

_DOWNLOAD_CHUNK: Final = 256 * 1024
_MAX_RETRY_AFTER_S: Final = 300.0


class StoreUnavailableError(SyncError):
    """Network error, timeout, 429 or 5xx: the same request may succeed later."""

    def __init__(
        self, message: str, retry_after_s: float | None = None, status: int | None = None
    ) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s
        self.status = status  # the HTTP status; None: the store did not answer at all


class BatchTooLargeError(SyncError):
    """413: the store's batch limits are smaller than this batch; split it."""


class BatchRefusedError(SyncError):
    """400: the store could not read the batch at all (nothing was written)."""


class StoreForbiddenError(SyncError):
    """401/403/415 or another 4xx: retrying will not help until the config is fixed."""


class ModelTooLargeError(SyncError):
    """A model download is larger than ``[model] max_download_bytes``; it was cut off."""


class ProfileTooLargeError(SyncError):
    """A profile answer larger than ``[profiles] max_body_bytes``; it was cut off."""


@dataclass(frozen=True)
class PostResult:
    accepted: int
    duplicates: int
    erased: int
    rejected: list[dict[str, Any]] = field(default_factory=list)


@dataclass(frozen=True)
class ErasureNotice:
    """One feed entry: ``blinded`` for an agent token, ``customer_id`` for an admin key."""

    cursor: str
    blinded: str | None = None
    customer_id: str | None = None


@dataclass(frozen=True)
class PublishedModel:
    """The store's latest published model: its manifest and the ETag it came with."""

    manifest: dict[str, Any]
    etag: str

    @property
    def version(self) -> str:
        return str(self.manifest.get("version", ""))

    @property
    def sha256(self) -> str:
        return str(self.manifest.get("sha256", ""))


class StoreClient:
    """One aiohttp session to the store; ``async with StoreClient(...)`` closes it."""

    def __init__(self, url: str, token: str, timeout_s: float, connections: int = 4) -> None:
        self.base = url.rstrip("/")
        self.blinding_key = blinding_key(token)  # the erasure feed is blinded with it
        self._headers = {"Authorization": f"Bearer {token}"}
        self._session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=timeout_s),
            connector=aiohttp.TCPConnector(limit=connections),
            raise_for_status=False,
        )

    async def __aenter__(self) -> StoreClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self._session.close()

    async def post_events(self, body: bytes, gzipped: bool) -> PostResult:
        headers = {**self._headers, "Content-Type": "application/json"}
        if gzipped:
            headers["Content-Encoding"] = "gzip"
        url = f"{self.base}/v1/events"
        async with self._exchange("POST", url, data=body, headers=headers) as response:
            await _expect(response, lambda status: status // 100 == 2)
            answer = await response.json(content_type=None)
            return PostResult(
                int(answer.get("accepted", 0)),
                int(answer.get("duplicates", 0)),
                int(answer.get("erased", 0)),
                list(answer.get("rejected", [])),
            )

    async def ready(self, timeout_s: float) -> bool:
        """Whether the store answers ``GET /readyz`` with 200 within ``timeout_s``."""
        url = f"{self.base}/readyz"
        try:
            timeout = aiohttp.ClientTimeout(total=timeout_s)
            async with self._exchange("GET", url, timeout=timeout) as response:
                return response.status == 200
        except StoreUnavailableError:
            return False  # still away: the caller keeps waiting

    async def erasures(self, after: str, limit: int = 500) -> tuple[list[ErasureNotice], str]:
        answer = await self._get_json("/v1/erasures", {"after": after, "limit": str(limit)})
        items = []
        for item in answer.get("erasures", []):
            if not isinstance(item, dict) or "cursor" not in item:
                raise StoreUnavailableError("GET /v1/erasures: an entry without a cursor")
            blinded, clear = item.get("blinded"), item.get("customer_id")
            items.append(
                ErasureNotice(
                    str(item["cursor"]),
                    blinded if isinstance(blinded, str) else None,
                    clear if isinstance(clear, str) else None,
                )
            )
        return items, str(answer.get("next_after", after))

    async def report_erased_pseudonyms(self, cursor: str, pseudonyms: list[str]) -> None:
        """Tell the store which pseudonyms this agent used for the customers it just erased."""
        await self._post_json(
            "/v1/erasures/pseudonyms", {"cursor": cursor, "pseudonyms": pseudonyms}
        )

    async def pseudonymise(self, pairs: list[tuple[str, str]]) -> None:
        """Customers who withdrew profile sharing: their clear ids at this store become these
        pseudonyms in what the store already holds."""
        customers = [{"customer_id": c, "pseudonym": p} for c, p in pairs]
        await self._post_json("/v1/pseudonymisations", {"customers": customers})

    async def heartbeat(self, document: dict[str, Any]) -> dict[str, Any]:
        """Post this agent's figures (the fleet view); the store answers with its time."""
        url = f"{self.base}/v1/heartbeat"
        headers = {**self._headers, "Content-Type": "application/json"}
        try:
            async with self._session.post(url, json=document, headers=headers) as response:
                if response.status != 200:
                    _raise_for(response, (await response.text(errors="replace"))[:300])
                answer = await response.json(content_type=None)
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            raise StoreUnavailableError(f"POST {url}: {type(exc).__name__}: {exc}") from exc
        if not isinstance(answer, dict):
            raise StoreUnavailableError(f"POST {url}: not a JSON object")
        return answer

    async def _post_json(self, path: str, document: dict[str, Any]) -> None:
        url = f"{self.base}{path}"
        headers = {**self._headers, "Content-Type": "application/json"}
        async with self._exchange("POST", url, json=document, headers=headers) as response:
            await _expect(response)

    async def latest_model(self, etag: str | None) -> PublishedModel | None:
        """The published manifest, or None when it is unchanged (304) or none exists (404)."""
        url = f"{self.base}/v1/models/latest"
        headers = {**self._headers, **({"If-None-Match": etag} if etag else {})}
        async with self._exchange("GET", url, headers=headers) as response:
            if response.status in (304, 404):
                return None
            await _expect(response)
            manifest = await response.json(content_type=None)
            if not isinstance(manifest, dict):
                raise StoreUnavailableError(f"GET {url}: the manifest is not a JSON object")
            return PublishedModel(manifest, response.headers.get("ETag", ""))

    async def download_model(self, version: str, target: Path, max_bytes: int) -> str:
        """Stream the artifact to ``target``; return its sha256 (hex). More than
        ``max_bytes`` (announced or received) stops the download: ModelTooLargeError."""
        url = f"{self.base}/v1/models/{version}/model.onnx"
        digest = hashlib.sha256()
        received = 0
        async with self._exchange("GET", url, headers=self._headers) as response:
            await _expect(response)
            if (response.content_length or 0) > max_bytes:
                raise ModelTooLargeError(
                    f"GET {url}: {response.content_length} bytes, limit {max_bytes}"
                )
            with target.open("wb") as out:
                async for chunk in response.content.iter_chunked(_DOWNLOAD_CHUNK):
                    received += len(chunk)
                    if received > max_bytes:  # a server that lies about its length
                        raise ModelTooLargeError(f"GET {url}: more than {max_bytes} bytes")
                    digest.update(chunk)
                    out.write(chunk)
        return digest.hexdigest()

    async def profile(self, customer_id: str, max_bytes: int) -> bytes | None:
        """The body of ``GET /v1/profiles/{customer_id}``; None for a 404 (no profile, or no
        consent to share it: the store does not say which). A body larger than ``max_bytes``
        (announced or received) is ``ProfileTooLargeError``."""
        url = f"{self.base}/v1/profiles/{quote(customer_id, safe='')}"
        async with self._exchange("GET", url, headers=self._headers) as response:
            if response.status == 404:
                return None
            await _expect(response)
            if (response.content_length or 0) > max_bytes:
                raise ProfileTooLargeError(f"GET {url}: {response.content_length} bytes")
            body = bytearray()
            async for chunk in response.content.iter_chunked(_DOWNLOAD_CHUNK):
                body += chunk
                if len(body) > max_bytes:
                    raise ProfileTooLargeError(f"GET {url}: more than {max_bytes} bytes")
        return bytes(body)

    async def _get_json(self, path: str, params: dict[str, str]) -> dict[str, Any]:
        url = f"{self.base}{path}"
        async with self._exchange("GET", url, headers=self._headers, params=params) as response:
            await _expect(response)
            answer = await response.json(content_type=None)
        if not isinstance(answer, dict):
            raise StoreUnavailableError(f"GET {url}: not a JSON object")
        return answer

    @contextlib.asynccontextmanager
    async def _exchange(
        self, method: str, url: str, **options: Any
    ) -> AsyncIterator[aiohttp.ClientResponse]:
        """One request: the I/O edge where aiohttp's errors (and an answer that cannot be
        read: bad JSON, a bad number) become ``StoreUnavailableError``, once for all."""
        try:
            async with self._session.request(method, url, **options) as response:
                yield response
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            raise StoreUnavailableError(f"{method} {url}: {type(exc).__name__}: {exc}") from exc


async def _expect(
    response: aiohttp.ClientResponse, ok: Callable[[int], bool] = lambda status: status == 200
) -> None:
    """Raise the error an unexpected status means (``_raise_for``)."""
    if not ok(response.status):
        _raise_for(response, (await response.text(errors="replace"))[:300])


def _raise_for(response: aiohttp.ClientResponse, text: str) -> NoReturn:
    status = response.status
    where = f"{response.method} {response.url.path}: HTTP {status} {text}"
    if status == 413:
        raise BatchTooLargeError(where)
    if status == 400:
        raise BatchRefusedError(where)
    if status == 429 or status >= 500:
        retry_after = _retry_after(response.headers.get("Retry-After"))
        raise StoreUnavailableError(where, retry_after, status)
    raise StoreForbiddenError(where)


def _retry_after(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return min(max(float(value), 0.0), _MAX_RETRY_AFTER_S)
    except ValueError:
        return None  # an HTTP date: our own backoff is good enough
