"""The HTTP routes of the central customer store (aiohttp).

Handlers translate between HTTP and the backend; every refusal is a JSON body
``{"error": reason, "detail": text}`` with a 4xx, and a database outage is a 503 the agents
retry. Auth rules live in ``auth``; profile shaping in ``profiles``. See ``openapi.json``.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections import Counter
from collections.abc import Awaitable, Callable
from datetime import UTC, date, datetime
from importlib import resources
from typing import Any, Final

from aiohttp import web

from cloud_sync.envelope_schema import MAX_ID_LENGTH, default_registry
from cloud_sync.erasure_blinding import blind, blinding_key
from cloud_sync.store import auth, feed, fleet, profiles, rollout
from cloud_sync.store.backend import Backend
from cloud_sync.store.errors import BackendError, BadRequestError
from cloud_sync.store.ingest import (
    CheckedBatch,
    Limits,
    Piece,
    check_batch,
    check_content_type,
    decode_body,
)
from cloud_sync.store.metrics import StoreMetrics
from cloud_sync.store.records import PSEUDONYM_PATTERN, Principal, format_ts
from cloud_sync.store.sql_shared import AGENT_REPORT_PREFIX

log = logging.getLogger(__name__)


class IngestSlots:
    """Ingests in progress per credential: one token cannot hold every worker and its memory."""

    def __init__(self, per_credential: int) -> None:
        self.per_credential = per_credential
        self._busy: dict[int, int] = {}

    def in_progress(self) -> int:
        return sum(self._busy.values())

    def take(self, credential_id: int) -> bool:
        busy = self._busy.get(credential_id, 0)
        if busy >= self.per_credential:
            return False
        self._busy[credential_id] = busy + 1
        return True

    def give_back(self, credential_id: int) -> None:
        busy = self._busy.pop(credential_id) - 1
        if busy:
            self._busy[credential_id] = busy


BACKEND: Final = web.AppKey("backend", Backend)
LIMITS: Final = web.AppKey("limits", Limits)
SLOTS: Final = web.AppKey("slots", IngestSlots)
METRICS: Final = web.AppKey("metrics", StoreMetrics)
FEED: Final = web.AppKey("feed", feed.FeedSettings)
HIGH_WATER: Final = web.AppKey("high_water", feed.HighWater)
CLOSING: Final = web.AppKey("closing", asyncio.Event)
DEFAULT_PAGE: Final = 100
MAX_PAGE: Final = 1000
MAX_ERASURES_PAGE: Final = 5000
MAX_PSEUDONYMS: Final = 5000
MAX_SMALL_BODY_BYTES: Final = 1024 * 1024
MAX_CURSOR_DIGITS: Final = 19
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def create_app(
    backend: Backend,
    limits: Limits | None = None,
    feed_settings: feed.FeedSettings | None = None,
    *,
    stale_after_s: float = fleet.DEFAULT_STALE_AFTER_S,
) -> web.Application:
    """The application; the caller owns ``backend`` and closes it after the app stops."""
    limits = limits or Limits()
    store_metrics = StoreMetrics(stale_after_s)
    # aiohttp's own cap is a backstop; decode_body answers oversized bodies with a JSON 413.
    app = web.Application(
        client_max_size=limits.max_body_bytes + 1,
        middlewares=[store_metrics.middleware, _errors_as_json],
    )
    app[METRICS] = store_metrics
    app[BACKEND] = backend
    app[LIMITS] = limits
    app[SLOTS] = IngestSlots(limits.max_concurrent_ingests)
    app[FEED] = feed_settings or feed.FeedSettings()
    app[HIGH_WATER] = feed.HighWater(backend, app[FEED].poll_s)
    app[CLOSING] = asyncio.Event()
    app.on_shutdown.append(_closing)
    app.router.add_get("/healthz", _healthz)
    app.router.add_get("/readyz", _readyz)
    app.router.add_get("/openapi.json", _openapi)
    app.router.add_post("/v1/events", _post_events)
    app.router.add_get("/v1/customers/{customer_id}", _get_customer)
    app.router.add_delete("/v1/customers/{customer_id}", _delete_customer)
    app.router.add_get("/v1/customers/{customer_id}/events", _get_customer_events)
    app.router.add_get("/v1/erasures", _get_erasures)
    app.router.add_post("/v1/erasures/pseudonyms", _post_erased_pseudonyms)
    app.router.add_post("/v1/pseudonymisations", _post_pseudonymisations)
    app.router.add_get("/v1/profiles/{customer_id}", _get_profile)
    app.router.add_get("/v1/feed", _get_feed)
    app.router.add_get("/v1/models/latest", _get_latest_model)
    app.router.add_get("/v1/models/{version}/model.onnx", _get_model_artifact)
    app.router.add_get("/v1/models/{version}/performance", _get_model_performance)
    app.router.add_get("/v1/aggregates", _get_aggregates)
    _add_fleet_routes(app)
    return app


def _error(status: int, reason: str, detail: str = "", **headers: str) -> web.Response:
    return web.json_response({"error": reason, "detail": detail}, status=status, headers=headers)


@web.middleware
async def _errors_as_json(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except _RefusedError as refusal:
        return refusal.response
    except BadRequestError as exc:
        log.info(
            "store.request.refused path=%s status=%d reason=%s",
            request.path,
            exc.status,
            exc.reason,
        )
        return _error(exc.status, exc.reason, exc.detail)
    except BackendError as exc:
        log.warning("store.backend.unavailable path=%s error=%s", request.path, exc)
        return _error(503, "backend_unavailable", exc.operation, **{"Retry-After": "1"})
    except web.HTTPRequestEntityTooLarge:
        return _error(413, "body_too_large", f"limit {request.app[LIMITS].max_body_bytes} bytes")


async def _principal(request: web.Request, allowed: Callable[[Principal], bool]) -> Principal:
    principal = await auth.authenticate(request.app[BACKEND], request.headers.get("Authorization"))
    if principal is None:
        raise _RefusedError(
            _error(
                401,
                "unauthorized",
                "missing or unknown bearer token",
                **{"WWW-Authenticate": 'Bearer realm="customer-store"'},
            )
        )
    if not allowed(principal):
        raise _RefusedError(
            _error(403, "forbidden", f"a {principal.kind} credential may not do this")
        )
    return principal


class _RefusedError(Exception):
    """Carries a ready 4xx response out of a helper; the middleware answers with it."""

    def __init__(self, response: web.Response) -> None:
        super().__init__(response.status)
        self.response = response


async def _healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def _readyz(request: web.Request) -> web.Response:
    try:
        await request.app[BACKEND].ping()
    except BackendError as exc:
        return _error(503, "backend_unavailable", str(exc))
    return web.json_response({"status": "ready"})


async def _openapi(request: web.Request) -> web.Response:
    text = resources.files("cloud_sync.store").joinpath("openapi.json").read_text("utf-8")
    return web.Response(text=text, content_type="application/json")


async def _post_events(request: web.Request) -> web.Response:
    principal = await _principal(request, auth.may_upload)
    check_content_type(request.headers.get("Content-Type"))
    limits = request.app[LIMITS]
    if (request.content_length or 0) > limits.max_body_bytes:
        raise BadRequestError(413, "body_too_large", f"limit {limits.max_body_bytes} bytes")
    slots = request.app[SLOTS]
    # Taken before the body is read: the limit bounds memory, not only database work.
    if not slots.take(principal.credential_id):
        log.info("store.batch.throttled store=%s", principal.store_id)
        return _error(
            429,
            "too_many_concurrent_ingests",
            f"at most {slots.per_credential} at once per credential",
            **{"Retry-After": "1"},
        )
    try:
        return await _ingest(request, principal, limits)
    finally:
        slots.give_back(principal.credential_id)


async def _ingest(request: web.Request, principal: Principal, limits: Limits) -> web.Response:
    body = await request.read()
    now = datetime.now(UTC)
    # Gunzip, scan and per-envelope checks take up to seconds of CPU on a hostile body:
    # off the event loop, so health checks and other agents are still answered meanwhile.
    items, batch = await asyncio.to_thread(
        _decode_and_check,
        body,
        request.headers.get("Content-Encoding"),
        limits,
        principal.store_id,
        now,
    )
    counts = await request.app[BACKEND].ingest(batch.rows, now, principal.credential_id)
    request.app[METRICS].count_ingest(
        counts.accepted, counts.duplicates + batch.repeated, len(batch.rejected), counts.erased
    )
    log.info(
        "store.batch.ingested store=%s received=%d accepted=%d duplicates=%d rejected=%d"
        " reasons=%s",
        principal.store_id,
        len(items),
        counts.accepted,
        counts.duplicates + batch.repeated,
        len(batch.rejected),
        ",".join(f"{k}:{n}" for k, n in Counter(r["reason"] for r in batch.rejected).items()),
    )
    return web.json_response(
        {
            "accepted": counts.accepted,
            "duplicates": counts.duplicates + batch.repeated,
            "erased": counts.erased,
            "rejected": batch.rejected,
        }
    )


def _decode_and_check(
    body: bytes, encoding: str | None, limits: Limits, store_id: str | None, now: datetime
) -> tuple[list[Piece], CheckedBatch]:
    items = decode_body(body, encoding, limits).items
    batch = check_batch(
        items, store_id, default_registry(), now=now, max_future_skew_s=limits.max_future_skew_s
    )
    return items, batch


async def _profile_ids(request: web.Request) -> tuple[str, list[str], Any]:
    """The requested id, its profile's ids and facts; a 404 for whatever the caller may not see."""
    principal = await _principal(request, auth.may_read_profiles)
    customer_id = _id_param(request.match_info["customer_id"], "customer_id")
    backend = request.app[BACKEND]
    ids = await backend.identities(customer_id)
    facts = await backend.customer_facts(ids, profiles.RECENT_SKU_EVENTS)
    # Unconsented and absent look the same to a partner: a 404 must not reveal a customer.
    if facts is None or (
        auth.needs_partner_consent(principal) and not profiles.shares_with_partners(facts)
    ):
        raise _RefusedError(_error(404, "not_found", "no such customer"))
    return customer_id, ids, facts


async def _get_customer(request: web.Request) -> web.Response:
    customer_id, _, facts = await _profile_ids(request)
    return web.json_response(profiles.profile_document(customer_id, facts))


async def _get_customer_events(request: web.Request) -> web.Response:
    limit = _int_param(request, "limit", DEFAULT_PAGE, 1, MAX_PAGE)
    after_text = request.query.get("after")
    after = profiles.decode_cursor(after_text) if after_text else None
    _, ids, _ = await _profile_ids(request)
    events = await request.app[BACKEND].customer_events(ids, after, limit + 1)
    return web.json_response(profiles.events_page(events, limit))


async def _delete_customer(request: web.Request) -> web.Response:
    principal = await _principal(request, auth.may_erase)
    customer_id = _id_param(request.match_info["customer_id"], "customer_id")
    backend = request.app[BACKEND]
    ids = await backend.identities(customer_id)
    deleted = await backend.erase(ids, f"{principal.kind}:{principal.name}", datetime.now(UTC))
    log.info("store.customer.erased ids=%d events=%d by=%s", len(ids), deleted, principal.name)
    return web.json_response(
        {"customer_id": customer_id, "identities": ids, "events_deleted": deleted}
    )


async def _get_erasures(request: web.Request) -> web.Response:
    """Admins read clear ids; an agent reads each id blinded with its own credential's key
    (``cloud_sync.erasure_blinding``), so the feed names nobody to anyone else."""
    principal = await _principal(request, auth.may_read_feeds)
    after = _int_param(request, "after", 0, 0, 2**62)
    limit = _int_param(request, "limit", 500, 1, MAX_ERASURES_PAGE)
    agent = principal.kind != "admin"
    rows = await request.app[BACKEND].erasures(after, limit, agent_reports=not agent)
    key = None
    if agent:
        token = auth.bearer_token(request.headers.get("Authorization")) or ""
        key = blinding_key(token)
    entries: list[dict[str, str]] = []
    for e in rows:
        entry = {"cursor": str(e.seq), "requested_at": format_ts(e.requested_at)}
        if key is None:
            entry["customer_id"] = e.customer_id
        else:
            entry["blinded"] = blind(key, e.customer_id)
        entries.append(entry)
    return web.json_response(
        {"erasures": entries, "next_after": str(rows[-1].seq if rows else after)}
    )


async def _post_erased_pseudonyms(request: web.Request) -> web.Response:
    """An agent that applied an erasure names the pseudonyms it uploaded that customer under;
    the store erases them too, for that agent's store only."""
    principal = await _principal(request, auth.may_upload)
    body = await _small_json(request)
    cursor = body.get("cursor")
    if not isinstance(cursor, str) or not cursor.isdigit() or len(cursor) > MAX_CURSOR_DIGITS:
        raise BadRequestError(400, "bad_cursor", "cursor must be an erasure's cursor")
    backend = request.app[BACKEND]
    if not await backend.erasure_exists(int(cursor)):
        raise BadRequestError(400, "bad_cursor", "no erasure has this cursor")
    pseudonyms = _pseudonyms(body.get("pseudonyms"), "pseudonyms")
    store_id = principal.store_id or ""
    requested_by = f"{AGENT_REPORT_PREFIX}{principal.name} store={store_id} cursor={cursor}"
    deleted = await backend.erase_pseudonyms(store_id, pseudonyms, requested_by, datetime.now(UTC))
    log.info(
        "store.pseudonyms.erased store=%s pseudonyms=%d events=%d cursor=%s",
        store_id,
        len(pseudonyms),
        deleted,
        cursor,
    )
    return web.json_response({"pseudonyms": len(pseudonyms), "events_deleted": deleted})


async def _post_pseudonymisations(request: web.Request) -> web.Response:
    """A customer withdrew profile sharing at an agent's store: that store's events already
    stored under the clear id are rewritten to the pseudonym it uploads them under now."""
    principal = await _principal(request, auth.may_upload)
    body = await _small_json(request)
    items = body.get("customers")
    if not isinstance(items, list) or not 0 < len(items) <= MAX_PSEUDONYMS:
        raise BadRequestError(400, "bad_customers", f"customers: 1..{MAX_PSEUDONYMS} objects")
    pairs: list[tuple[str, str]] = []
    for item in items:
        if not isinstance(item, dict):
            raise BadRequestError(400, "bad_customers", "each entry is an object")
        clear = item.get("customer_id")
        if not isinstance(clear, str):
            raise BadRequestError(400, "bad_customers", "customer_id must be a string")
        clear = _id_param(clear, "customer_id")
        (pseudonym,) = _pseudonyms([item.get("pseudonym")], "pseudonym")
        if PSEUDONYM_PATTERN.match(clear):
            raise BadRequestError(400, "bad_customers", "customer_id is already a pseudonym")
        pairs.append((clear, pseudonym))
    store_id = principal.store_id or ""
    rewritten = await request.app[BACKEND].pseudonymise(store_id, pairs)
    log.info("store.pseudonymised store=%s customers=%d events=%d", store_id, len(pairs), rewritten)
    return web.json_response({"customers": len(pairs), "events_rewritten": rewritten})


async def _small_json(request: web.Request) -> dict[str, Any]:
    """A small JSON object body (read with a cap: these requests name ids, nothing more)."""
    check_content_type(request.headers.get("Content-Type"))
    if (request.content_length or 0) > MAX_SMALL_BODY_BYTES:
        raise BadRequestError(413, "body_too_large", f"limit {MAX_SMALL_BODY_BYTES} bytes")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.content.iter_chunked(64 * 1024):
        size += len(chunk)
        if size > MAX_SMALL_BODY_BYTES:  # checked while reading: a liar's length costs nothing
            raise BadRequestError(413, "body_too_large", f"limit {MAX_SMALL_BODY_BYTES} bytes")
        chunks.append(chunk)
    body = b"".join(chunks)
    try:
        document = json.loads(body)
    except (ValueError, RecursionError) as exc:
        raise BadRequestError(400, "malformed_json", str(exc)[:200]) from exc
    if not isinstance(document, dict):
        raise BadRequestError(400, "bad_batch_shape", "expected a JSON object")
    return document


def _pseudonyms(value: Any, name: str) -> list[str]:
    if not isinstance(value, list) or not 0 < len(value) <= MAX_PSEUDONYMS:
        raise BadRequestError(400, "bad_pseudonyms", f"{name}: 1..{MAX_PSEUDONYMS} pseudonyms")
    if not all(isinstance(p, str) and PSEUDONYM_PATTERN.match(p) for p in value):
        raise BadRequestError(400, "bad_pseudonyms", f"{name}: each is ps- and 32 hex digits")
    return sorted(set(value))


async def _get_profile(request: web.Request) -> web.Response:
    """An agent's view of a customer across stores and channels; consent-gated: a customer
    without personalization and profile sharing is a 404 identical to an unknown one."""
    await _principal(request, auth.may_fetch_profiles)
    customer_id = _id_param(request.match_info["customer_id"], "customer_id")
    limit = _int_param(
        request, "limit", profiles.DEFAULT_INTERACTIONS, 1, profiles.MAX_INTERACTIONS
    )
    not_found = _RefusedError(_error(404, "not_found", "no such customer"))
    if profiles.is_pseudonym(customer_id):
        raise not_found  # a pseudonymised customer's history stays where it was recorded
    facts = await request.app[BACKEND].profile_facts(customer_id, profiles.INTERACTION_TYPES, limit)
    flags = profiles.resolved_flags(facts.consent)
    if flags is None or not profiles.shares_profile(flags):
        raise not_found
    return web.json_response(
        profiles.agent_profile_document(customer_id, flags, facts, datetime.now(UTC))
    )


async def _get_feed(request: web.Request) -> web.StreamResponse:
    principal = await _principal(request, auth.may_read_events)
    cursor = feed.start_cursor(request.query.get("after"), request.headers.get("Last-Event-ID"))
    if cursor is None:
        raise BadRequestError(400, "bad_cursor", "after / Last-Event-ID: an event's id")
    who = f"{principal.kind}:{principal.name}"
    app = request.app
    return await feed.stream(
        request,
        backend=app[BACKEND],
        high_water=app[HIGH_WATER],
        cursor=cursor,
        settings=app[FEED],
        who=who,
        closing=app[CLOSING],
    )


async def _closing(app: web.Application) -> None:
    """Shutdown: long-lived responses (the partner feed) end now."""
    app[CLOSING].set()


async def _get_model_performance(request: web.Request) -> web.Response:
    await _principal(request, auth.is_admin)
    version = _id_param(request.match_info["version"], "version")
    backend = request.app[BACKEND]
    if await backend.model_record(version) is None:
        return _error(404, "not_found", "no such model version")
    performance = await backend.shown_performance(version, None)
    return web.json_response(performance.as_json())


async def _get_latest_model(request: web.Request) -> web.Response:
    principal = await _principal(request, auth.may_read_feeds)
    backend = request.app[BACKEND]
    version = rollout.version_for(await backend.rollout(), principal.store_id)
    record = None if version is None else await backend.model_record(version)
    if record is None:
        return _error(404, "not_found", "no model published yet")
    etag = record.etag
    headers = {"ETag": etag, "X-Model-Version": record.version}
    if request.headers.get("If-None-Match") == etag:
        return web.Response(status=304, headers=headers)
    return web.json_response(record.manifest, headers=headers)


async def _get_model_artifact(request: web.Request) -> web.Response:
    await _principal(request, auth.may_read_feeds)
    version = _id_param(request.match_info["version"], "version")
    found = await request.app[BACKEND].model(version)
    if found is None:
        return _error(404, "not_found", "no such model version")
    record, artifact = found
    return web.Response(
        body=artifact,
        content_type="application/octet-stream",
        headers={
            "ETag": f'"{record.sha256}"',
            "X-Model-Sha256": record.sha256,
            "X-Model-Version": record.version,
        },
    )


async def _get_aggregates(request: web.Request) -> web.Response:
    await _principal(request, auth.may_read_aggregates)
    since, until = _date_param(request, "from"), _date_param(request, "to")
    store_id = request.query.get("store_id")
    if store_id is not None:
        store_id = _id_param(store_id, "store_id")
    rows = await request.app[BACKEND].aggregates(since, until, store_id)
    return web.json_response(
        {
            "aggregates": [
                {
                    "day": r.day.isoformat(),
                    "store_id": r.store_id,
                    "type": r.type,
                    "events": r.events,
                }
                for r in rows
            ]
        }
    )


def _id_param(text: str, name: str) -> str:
    """An id as envelopes carry them; anything else is refused before it reaches SQL."""
    try:
        text.encode("utf-8")  # a lone surrogate from a bad %-escape cannot reach the driver
    except UnicodeEncodeError as exc:
        raise BadRequestError(400, "bad_parameter", f"{name} is not valid UTF-8") from exc
    if not 0 < len(text) <= MAX_ID_LENGTH or "\x00" in text:
        raise BadRequestError(400, "bad_parameter", f"{name} is not a valid id")
    return text


def _int_param(request: web.Request, name: str, default: int, low: int, high: int) -> int:
    text = request.query.get(name)
    if text is None or text == "":
        return default
    try:
        value = int(text)
    except ValueError as exc:
        raise BadRequestError(400, "bad_parameter", f"{name} must be an integer") from exc
    if not low <= value <= high:
        raise BadRequestError(400, "bad_parameter", f"{name} must be within {low}..{high}")
    return value


def _date_param(request: web.Request, name: str) -> date | None:
    text = request.query.get(name)
    if not text:
        return None
    try:
        return date.fromisoformat(text)
    except ValueError as exc:
        raise BadRequestError(400, "bad_parameter", f"{name} must be YYYY-MM-DD") from exc


# ---- the fleet view and the store's metrics (issue 13) --------------------------------


def _add_fleet_routes(app: web.Application) -> None:
    app.router.add_get("/metrics", _get_metrics)
    app.router.add_post("/v1/heartbeat", _post_heartbeat)
    app.router.add_get("/v1/fleet", _get_fleet)


async def _get_metrics(request: web.Request) -> web.Response:
    """Prometheus text; counts only (no ids), so unauthenticated like /healthz."""
    body = await request.app[METRICS].render(request.app[BACKEND])
    return web.Response(
        body=body,
        content_type="text/plain",
        charset="utf-8",
        headers={"X-Content-Format": "prometheus-0.0.4"},
    )


async def _post_heartbeat(request: web.Request) -> web.Response:
    """An agent's latest figures; the answer carries the store's time and the measured skew."""
    principal = await _principal(request, auth.may_upload)
    counter = request.app[METRICS].heartbeats
    try:
        body = await _small_json(request)
        heartbeat = fleet.parse_heartbeat(
            body, principal.store_id or "", principal.credential_id, datetime.now(UTC)
        )
    except BadRequestError:
        counter.labels("refused").inc()
        raise
    await request.app[BACKEND].record_heartbeat(heartbeat)
    counter.labels("recorded").inc()
    return web.json_response(
        {
            "received_at": format_ts(heartbeat.received_at),
            "clock_skew_s": heartbeat.clock_skew_s,
        }
    )


async def _get_fleet(request: web.Request) -> web.Response:
    await _principal(request, lambda p: p.kind == "admin")
    metrics = request.app[METRICS]
    stale_after = float(_int_param(request, "stale_after_s", int(metrics.stale_after_s), 1, 10**7))
    now = datetime.now(UTC)
    heartbeats = await request.app[BACKEND].heartbeats()
    return web.json_response(
        {
            "now": format_ts(now),
            "stale_after_s": stale_after,
            "agents": fleet.fleet_view(heartbeats, now, stale_after),
        }
    )
