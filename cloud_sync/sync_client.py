"""The agent's HTTP client for the central store; aiohttp errors end here.

Every answer the uploader must act on differently is its own exception: retry the same
batch later (``StoreUnavailableError``), split it (``BatchTooLargeError``), look for the bad
event in it (``BatchRefusedError``), or stop and tell a person (``StoreForbiddenError``: a
token or config problem).
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import aiohttp

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


@dataclass(frozen=True)
class PostResult:
    accepted: int
    duplicates: int
    erased: int
    rejected: list[dict[str, Any]] = field(default_factory=list)


@dataclass(frozen=True)
class Erasure:
    cursor: str
    customer_id: str


@dataclass(frozen=True)
class ModelOffer:
    manifest: dict[str, Any]
    etag: str

    @property
    def version(self) -> str:
        return str(self.manifest["version"])

    @property
    def sha256(self) -> str:
        return str(self.manifest["sha256"])


class StoreClient:
    """One aiohttp session to the store; ``async with StoreClient(...)`` closes it."""

    def __init__(self, url: str, token: str, timeout_s: float, connections: int = 4) -> None:
        self.base = url.rstrip("/")
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
        try:
            async with self._session.post(url, data=body, headers=headers) as response:
                if response.status // 100 == 2:
                    answer = await response.json(content_type=None)
                    return PostResult(
                        int(answer.get("accepted", 0)),
                        int(answer.get("duplicates", 0)),
                        int(answer.get("erased", 0)),
                        list(answer.get("rejected", [])),
                    )
                text = await response.text(errors="replace")
                _raise_for(response, text[:300])
        except (aiohttp.ClientError, TimeoutError, json.JSONDecodeError, ValueError) as exc:
            raise StoreUnavailableError(f"POST {url}: {type(exc).__name__}: {exc}") from exc
        raise AssertionError("unreachable")  # _raise_for always raises

    async def ready(self, timeout_s: float) -> bool:
        """Whether the store answers ``GET /readyz`` with 200 within ``timeout_s``."""
        url = f"{self.base}/readyz"
        try:
            timeout = aiohttp.ClientTimeout(total=timeout_s)
            async with self._session.get(url, timeout=timeout) as response:
                return response.status == 200
        except (aiohttp.ClientError, TimeoutError):
            return False  # still away: the caller keeps waiting

    async def erasures(self, after: str, limit: int = 500) -> tuple[list[Erasure], str]:
        answer = await self._get_json("/v1/erasures", {"after": after, "limit": str(limit)})
        items = [
            Erasure(str(item["cursor"]), str(item["customer_id"]))
            for item in answer.get("erasures", [])
        ]
        return items, str(answer.get("next_after", after))

    async def latest_model(self, etag: str | None) -> ModelOffer | None:
        """The published manifest, or None when it is unchanged (304) or none exists (404)."""
        url = f"{self.base}/v1/models/latest"
        headers = {**self._headers, **({"If-None-Match": etag} if etag else {})}
        try:
            async with self._session.get(url, headers=headers) as response:
                if response.status in (304, 404):
                    return None
                if response.status != 200:
                    _raise_for(response, (await response.text(errors="replace"))[:300])
                manifest = await response.json(content_type=None)
                return ModelOffer(manifest, response.headers.get("ETag", ""))
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            raise StoreUnavailableError(f"GET {url}: {type(exc).__name__}: {exc}") from exc

    async def download_model(self, version: str, target: Path) -> str:
        """Stream the artifact to ``target``; return its sha256 (hex)."""
        url = f"{self.base}/v1/models/{version}/model.onnx"
        digest = hashlib.sha256()
        try:
            async with self._session.get(url, headers=self._headers) as response:
                if response.status != 200:
                    _raise_for(response, (await response.text(errors="replace"))[:300])
                with target.open("wb") as out:
                    async for chunk in response.content.iter_chunked(_DOWNLOAD_CHUNK):
                        digest.update(chunk)
                        out.write(chunk)
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise StoreUnavailableError(f"GET {url}: {type(exc).__name__}: {exc}") from exc
        return digest.hexdigest()

    async def _get_json(self, path: str, params: dict[str, str]) -> dict[str, Any]:
        url = f"{self.base}{path}"
        try:
            async with self._session.get(url, headers=self._headers, params=params) as response:
                if response.status != 200:
                    _raise_for(response, (await response.text(errors="replace"))[:300])
                answer = await response.json(content_type=None)
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            raise StoreUnavailableError(f"GET {url}: {type(exc).__name__}: {exc}") from exc
        if not isinstance(answer, dict):
            raise StoreUnavailableError(f"GET {url}: not a JSON object")
        return answer


def _raise_for(response: aiohttp.ClientResponse, text: str) -> None:
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
