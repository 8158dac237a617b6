"""The uploader's NATS JetStream transport: each governed envelope is one message.

``[sync] transport = "nats"``: the uploader (``cloud_sync.uploader``) claims rows and
applies the upload rule exactly as for HTTP (``sync_batches.governed_envelopes``); this
module publishes them to ``<sync.nats_subject>.<store_id>`` with the header
``Nats-Msg-Id: <store_id>:<event_id>`` and waits for every JetStream acknowledgement
(PubAck) before the uploader marks the rows synced. A resend inside the stream's
duplicate window is dropped by JetStream (the PubAck says ``duplicate``); one after it is
dropped by the central store's ``(store_id, event_id)`` key. The messages of one batch are
written to the one connection in order, so the stream keeps the buffer's order.

The messages of a batch are pipelined: all are written, then their PubAcks are gathered,
within one deadline of ``sync.timeout_s`` for the whole batch (one timer per batch, not one
per message). A connection lost meanwhile fails the batch at once instead of at the
deadline: the PubAcks of messages written to the old connection can never come, and the
resend after the reconnect is a duplicate that JetStream drops (``benchmarks/fleet.py``: an
agent back from a hub outage resumes after the reconnect, not after ``sync.timeout_s``).

nats-py's errors end here: a server that is away, a stream that does not answer, a
timeout become ``StoreUnavailableError`` (the uploader backs off and retries the same
rows); a refused authorisation becomes ``StoreForbiddenError``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import ssl
from collections.abc import Sequence
from typing import Any, Final

import nats.errors
import nats.js.errors
from nats.aio.client import Client
from nats.js import JetStreamContext

from cloud_sync.sync_batches import Row, governed_envelopes
from cloud_sync.sync_client import PostResult, StoreForbiddenError, StoreUnavailableError
from edge_agent.config import SyncSection
from edge_agent.errors import SyncError
from edge_agent.governance import ConsentLedger

log = logging.getLogger(__name__)

MSG_ID_HEADER: Final = "Nats-Msg-Id"
_CONNECT_TIMEOUT_S: Final = 2.0
_TOO_LARGE: Final = "too_large"


def event_subject(prefix: str, store_id: str) -> str:
    """The subject a store's events go to (docs/contracts.md: NATS subjects)."""
    return f"{prefix}.{store_id}"


def message_id(store_id: str, event_id: str) -> str:
    """``Nats-Msg-Id``: unique across the fleet, since products may choose their own ids."""
    return f"{store_id}:{event_id}"


def inbox_prefix(store_id: str) -> str:
    """Replies (PubAcks, fetched messages, API answers) come to inboxes only this store may
    read: a store's NATS user subscribes to ``_INBOX_<store_id>.>``, never ``_INBOX.>``."""
    return f"_INBOX_{store_id}"


def tls_context(settings: SyncSection) -> ssl.SSLContext | None:
    """The TLS context the settings ask for, or None (the URL's tls:// scheme still works)."""
    if not (settings.nats_tls_ca or settings.nats_tls_cert):
        return None
    context = ssl.create_default_context(cafile=settings.nats_tls_ca or None)
    if settings.nats_tls_cert:
        context.load_cert_chain(settings.nats_tls_cert, settings.nats_tls_key or None)
    return context


def connect_options(settings: SyncSection) -> dict[str, Any]:
    """``nats.connect`` keyword arguments for the configured servers and credentials."""
    servers = [part.strip() for part in settings.url.split(",") if part.strip()]
    options: dict[str, Any] = {
        "servers": servers,
        "connect_timeout": min(_CONNECT_TIMEOUT_S, settings.timeout_s),
        "allow_reconnect": True,
        "max_reconnect_attempts": -1,  # the uploader's backoff decides when to give up: never
        "reconnect_time_wait": 1,
        "name": "edge-agent",
        # One log line per event instead of nats-py's default traceback on every retry.
        "error_cb": _log_error,
        "disconnected_cb": _log_disconnected,
        "reconnected_cb": _log_reconnected,
    }
    if settings.nats_creds:
        options["user_credentials"] = settings.nats_creds
    elif settings.nats_user:
        options["user"] = settings.nats_user
        options["password"] = settings.nats_password
    elif settings.token:
        options["token"] = settings.token
    context = tls_context(settings)
    if context is not None:
        options["tls"] = context
    return options


class NatsEvents:
    """The event transport over JetStream; connects lazily, so a hub that is down at start
    is retried like a store that is down (``async with`` closes the connection)."""

    def __init__(self, settings: SyncSection, store_id: str) -> None:
        self.settings = settings
        self.subject = event_subject(settings.nats_subject, store_id)
        self.store_id = store_id
        self._nc: Client | None = None
        self._js: JetStreamContext | None = None
        self._connect_lock = asyncio.Lock()
        # Resolved when the connection drops, then replaced: a batch waiting for PubAcks
        # on the old connection stops waiting.
        self._connection_lost: asyncio.Future[None] | None = None

    async def __aenter__(self) -> NatsEvents:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        nc, self._nc, self._js = self._nc, None, None
        if nc is not None and not nc.is_closed:
            try:
                await asyncio.wait_for(nc.drain(), self.settings.timeout_s)
            except (nats.errors.Error, TimeoutError, OSError) as exc:
                log.warning("sync.nats.close_failed detail=%s", exc)
                await nc.close()

    async def post_rows(
        self, rows: Sequence[Row], consent: ConsentLedger, key: bytes, compress: bool
    ) -> PostResult:
        """Publish the governed ``rows``; return once JetStream acknowledged all of them.

        ``compress`` is the HTTP body's option: a NATS message is one envelope, sent as is.
        """
        del compress
        js = await self._jetstream()
        lost = self._lost_future()
        envelopes = await asyncio.to_thread(governed_envelopes, rows, consent, key)
        limit = self._nc.max_payload if self._nc is not None else 1024 * 1024
        pending: list[asyncio.Future[Any]] = []
        rejected: list[dict[str, Any]] = []
        try:
            async with asyncio.timeout(self.settings.timeout_s):
                # One after the other on one connection: the stream keeps the buffer's order.
                for index, envelope in enumerate(envelopes):
                    payload = envelope.encode("utf-8")
                    if len(payload) > limit:
                        # Settled like an event the store refused: it can never be published.
                        rejected.append({"index": index, "reason": _TOO_LARGE})
                        continue
                    headers = {MSG_ID_HEADER: message_id(self.store_id, _event_id(envelope))}
                    # The batch's deadline bounds a stall; no timer per message.
                    pending.append(await js.publish_async(self.subject, payload, headers=headers))
                acks = await _acks_unless_lost(pending, lost)
        except nats.js.errors.APIError as exc:
            raise _translate(self.subject, exc) from exc
        except (nats.errors.Error, TimeoutError, OSError) as exc:
            raise StoreUnavailableError(
                f"NATS publish {self.subject}: {type(exc).__name__}: {exc}"
            ) from exc
        finally:
            _cancel(pending)  # those not acknowledged: their rows are resent
        duplicates = sum(1 for ack in acks if ack.duplicate)
        return PostResult(len(acks) - duplicates, duplicates, 0, rejected)

    async def ready(self, timeout_s: float) -> bool:
        """Whether a server answers and JetStream is there, within ``timeout_s``."""
        try:
            js = await self._jetstream()
            await asyncio.wait_for(js.account_info(), timeout_s)
        except (StoreUnavailableError, StoreForbiddenError, nats.errors.Error, TimeoutError):
            return False
        return True

    async def _jetstream(self) -> JetStreamContext:
        async with self._connect_lock:
            if self._js is not None and self._nc is not None and not self._nc.is_closed:
                return self._js
            nc = Client()
            try:
                # Reconnects never give up once connected; the first connect is bounded here.
                await asyncio.wait_for(
                    nc.connect(
                        **{
                            **connect_options(self.settings),
                            "inbox_prefix": inbox_prefix(self.store_id),
                            "disconnected_cb": self._on_disconnected,
                        }
                    ),
                    self.settings.timeout_s,
                )
            except (nats.errors.Error, TimeoutError, OSError) as exc:
                await nc.close()
                text = str(exc).lower()
                if "authorization" in text or "permissions" in text:
                    raise StoreForbiddenError(f"NATS connect: {exc}") from exc
                raise StoreUnavailableError(
                    f"NATS connect {self.settings.url}: {type(exc).__name__}: {exc}"
                ) from exc
            log.info("sync.nats.connected server=%s", nc.connected_url)
            domain = self.settings.nats_domain or None  # through a leaf node: the hub's
            self._nc, self._js = nc, nc.jetstream(timeout=self.settings.timeout_s, domain=domain)
            return self._js

    def _lost_future(self) -> asyncio.Future[None]:
        if self._connection_lost is None or self._connection_lost.done():
            self._connection_lost = asyncio.get_running_loop().create_future()
        return self._connection_lost

    async def _on_disconnected(self) -> None:
        await _log_disconnected()
        if self._connection_lost is not None and not self._connection_lost.done():
            self._connection_lost.set_result(None)


async def _acks_unless_lost(
    pending: Sequence[asyncio.Future[Any]], lost: asyncio.Future[None]
) -> list[Any]:
    """Every PubAck, in order; ``ConnectionLostError`` as soon as the connection drops."""
    if not pending:
        return []
    acks = asyncio.gather(*pending)
    try:
        await asyncio.wait((acks, lost), return_when=asyncio.FIRST_COMPLETED)
        if acks.done():
            return acks.result()
        raise ConnectionLostError(f"connection lost with {len(pending)} PubAcks due")
    finally:
        if not acks.done():  # lost, the deadline, or the uploader cancelled
            acks.add_done_callback(_retrieved)  # its cancellation is not an unread error
            acks.cancel()


def _retrieved(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()


class ConnectionLostError(nats.errors.Error):
    """The connection dropped while PubAcks were due: they will not come on a new one."""


async def _log_error(exc: Exception) -> None:
    log.debug("sync.nats.error kind=%s detail=%s", type(exc).__name__, exc)


async def _log_disconnected() -> None:
    log.info("sync.nats.disconnected")


async def _log_reconnected() -> None:
    log.info("sync.nats.reconnected")


def _event_id(envelope: str) -> str:
    """The envelope's ``event_id`` (the buffer wrote it; every envelope has one)."""
    value = json.loads(envelope).get("event_id")
    return value if isinstance(value, str) else ""


def _translate(subject: str, exc: nats.js.errors.APIError) -> SyncError:
    """An API error as the uploader's exception: refused authorisation, or away for now."""
    if exc.code in (401, 403):
        return StoreForbiddenError(f"NATS publish {subject}: {exc}")
    return StoreUnavailableError(f"NATS publish {subject}: {exc}")


def _cancel(sends: Sequence[asyncio.Future[Any]]) -> None:
    for send in sends:
        send.cancel()
