"""The ingest gateway (ASGI): checks events at the door, stamps their receive time, and answers 202
only once JetStream has them on disk. Also serves the read side of the contract (events, meters,
usage, ingest status).

Run it with ``meter up``, or ``uvicorn --factory ingest_gateway.app:create_app``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import msgspec
from nats.aio.client import Client
from nats.js import JetStreamContext
from nats.js.errors import NotFoundError
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from meter_platform.capture import jetstream
from meter_platform.capture.envelope import (
    Event,
    GatewayBatch,
    ItemError,
    check_times,
    datetime_to_us,
    decode_events,
    decode_ndjson,
    encode_batch,
    format_timestamp,
    new_event_id,
    now_us,
)
from meter_platform.capture.messages import Message, find_event
from meter_platform.catalog import Catalog, load_catalog
from meter_platform.config import (
    BATCH_HEADER,
    CONSUMER_NAME,
    GATEWAY_SUBJECT,
    STREAM_NAME,
    Settings,
    load_settings,
    require_url,
)
from meter_platform.ingestion.ledger import LEDGER_TOTALS_SQL, LedgerTotals
from meter_platform.ingestion.quarantine import (
    QuarantineQueryError,
    list_answer,
    list_sql,
    parse_list_params,
)
from meter_platform.meters.aggregates import sqlalchemy_bind
from meter_platform.meters.usage import UsageQueryError, build_query, usage_answer, usage_sql
from meter_platform.storage import db

log = logging.getLogger("ingest_gateway")
_encoder = msgspec.json.Encoder(decimal_format="number")
#: How long to wait for JetStream's ack (its fsync) before answering 503.
PUBLISH_TIMEOUT = 5.0
#: GET /v1/events/{id} looks for a not-yet-processed id among at most this many pending messages.
PENDING_SCAN_LIMIT = 500
#: ... and for at most this long (newest first: a client usually asks about what it just sent).
PENDING_SCAN_SECONDS = 0.25


class ApiError(Exception):
    """An answer with the contract's error shape."""

    def __init__(
        self, status: int, error: str, details: list[Any] | None = None, headers: dict[str, str] | None = None
    ):
        super().__init__(error)
        self.status, self.error, self.details, self.headers = status, error, details or [], headers


def json_response(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    """A JSON answer encoded with msgspec (Decimal as JSON numbers)."""
    return Response(_encoder.encode(body), status_code=status, headers=headers, media_type="application/json")


class Gateway:
    """The gateway's connections, owned by the app's lifespan."""

    def __init__(self, settings: Settings, catalog: Catalog):
        self.settings = settings
        self.catalog = catalog
        self.nc: Client | None = None
        self.js: JetStreamContext | None = None
        self.engine: AsyncEngine | None = None

    async def start(self) -> None:
        """Connect to NATS (making sure the stream exists) and create the database pool."""
        nats_url = require_url(self.settings.nats_url, "METER_NATS_URL")
        database_url = require_url(self.settings.database_url, "METER_DATABASE_URL")
        # Reconnect forever: while NATS is away, publishes fail fast into 503s, and come back with it.
        self.nc = await jetstream.connect(nats_url, name="meter-gateway", max_reconnect_attempts=-1)
        self.js = self.nc.jetstream(timeout=PUBLISH_TIMEOUT)
        await jetstream.ensure_stream_and_consumer(self.js)
        self.engine = db.async_engine(database_url)

    async def stop(self) -> None:
        """Flush and close NATS; dispose of the pool."""
        if self.nc is not None and not self.nc.is_closed:
            await self.nc.drain()
        if self.engine is not None:
            await self.engine.dispose()

    # --- capture ---------------------------------------------------------------------------------

    def _chunks(self, events: list[Event], received_us: int) -> list[bytes]:
        """One message per request; split in halves only when it exceeds the server's max payload."""
        assert self.nc is not None
        limit = self.nc.max_payload - 4096
        pending = [events]
        out: list[bytes] = []
        while pending:
            part = pending.pop()
            payload = encode_batch(GatewayBatch(received_at=received_us, events=part))
            if len(payload) <= limit or len(part) == 1:
                out.append(payload)
            else:
                half = len(part) // 2
                pending += [part[half:], part[:half]]
        return out

    async def publish(self, events: list[Event], received_us: int) -> None:
        """Publish the events durably; raise ApiError(503) when JetStream does not confirm them."""
        assert self.js is not None and self.nc is not None
        if not self.nc.is_connected:
            raise ApiError(
                503,
                "The event broker is unreachable; nothing was stored. Retry shortly.",
                headers={"Retry-After": "2"},
            )
        request_id = new_event_id()
        payloads = self._chunks(events, received_us)
        try:
            acks = await asyncio.gather(
                *(
                    self.js.publish(
                        GATEWAY_SUBJECT,
                        payload,
                        stream=STREAM_NAME,
                        # Our own retry of this publish is dropped by JetStream, not stored twice.
                        headers={"Nats-Msg-Id": f"{request_id}-{i}", BATCH_HEADER: "1"},
                    )
                    for i, payload in enumerate(payloads)
                )
            )
        except Exception as exc:  # any failure means "not durable": the client must retry
            log.warning("JetStream did not confirm a publish: %r", exc)
            detail = str(exc) or type(exc).__name__
            raise ApiError(
                503,
                "Events could not be made durable (broker unavailable or stream full); "
                "nothing is guaranteed stored. Retry with the same ids.",
                # The ids (made here for events sent without one) let a retry be recognised: part of
                # a split request may have been stored before the failure.
                [{"reason": detail, "ids": [e.id for e in events]}],
                headers={"Retry-After": "1"},
            ) from exc
        log.debug("stored %d events in %d message(s), last seq %s", len(events), len(acks), acks[-1].seq)

    # --- read side -------------------------------------------------------------------------------

    async def query(self, sql: str, params: dict[str, Any] | None = None) -> list[Any]:
        """Run a read query; a database outage becomes a 503."""
        assert self.engine is not None
        try:
            async with self.engine.connect() as conn:
                return list((await conn.execute(text(sql), params or {})).all())
        except Exception as exc:
            from sqlalchemy.exc import DBAPIError, OperationalError

            if isinstance(exc, OperationalError) or (
                isinstance(exc, DBAPIError) and exc.connection_invalidated
            ):
                raise ApiError(
                    503, "The database is unreachable. Retry shortly.", headers={"Retry-After": "2"}
                ) from exc
            raise

    async def find_pending(self, event_id: str) -> dict[str, Any] | None:
        """Look for an accepted, not yet processed event among the messages still in the stream."""
        assert self.js is not None
        backlog = await jetstream.backlog(self.js)
        first = backlog.ack_floor + 1
        deadline = time.monotonic() + PENDING_SCAN_SECONDS
        for seq in range(backlog.last_seq, max(first, backlog.last_seq - PENDING_SCAN_LIMIT + 1) - 1, -1):
            if time.monotonic() > deadline:
                break
            try:
                msg = await self.js.get_msg(STREAM_NAME, seq)
            except NotFoundError:
                continue
            data = msg.data or b""
            header_id = (msg.headers or {}).get("Nats-Msg-Id")
            # A cheap test first: the id is in the body or the header, or the message may hold events
            # published without ids (whose ids are made from the sequence when they are read).
            if (
                header_id != event_id
                and event_id.encode() not in data
                and msgspec.json.encode(event_id)[1:-1] not in data
                and not event_id.startswith(f"nats-{seq}-")
            ):
                continue
            message = Message(
                seq=seq,
                subject=msg.subject or "",
                data=data,
                headers=msg.headers,
                timestamp_us=datetime_to_us(msg.time) if msg.time else now_us(),
            )
            found = find_event(message, event_id)
            if found is not None:
                return {**found, "state": "pending", "stream_seq": seq}
        return None


def _gateway(request: Request) -> Gateway:
    return request.app.state.gateway


async def _read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise ApiError(413, f"The body is larger than {limit} bytes; split it into several requests.")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(413, f"The body is larger than {limit} bytes; split it into several requests.")
        chunks.append(chunk)
    return b"".join(chunks)


async def post_events(request: Request) -> Response:
    """POST /v1/events: one event, a JSON array, or NDJSON; 202 once durable in JetStream."""
    gw = _gateway(request)
    content_type = request.headers.get("content-type", "application/json").split(";")[0].strip().lower()
    if content_type not in ("application/json", "application/x-ndjson", "application/ndjson"):
        raise ApiError(
            415,
            f"Content type {content_type!r} is not supported; send application/json "
            "(one event or an array) or application/x-ndjson.",
        )
    body = await _read_body(request, gw.settings.max_body_bytes)
    received_us = now_us()
    if not body.strip():
        raise ApiError(400, "The body is empty; send one event, an array of events, or NDJSON.")
    errors: list[ItemError]
    if content_type == "application/json":
        events, errors, _ = decode_events(body)
    else:
        events, errors = decode_ndjson(body)
    if not events and not errors:
        raise ApiError(400, "The request holds no events.")
    errors += check_times(events, received_us)
    if errors:
        errors.sort(key=lambda e: e.index)
        raise ApiError(
            400,
            f"{len({e.index for e in errors})} of {len(events)} event(s) are invalid; "
            "nothing of this request was kept.",
            [msgspec.to_builtins(e) for e in errors],
        )
    good: list[Event] = [e for e in events if e is not None]
    for event in good:
        if event.id is None:
            event.id = new_event_id()
    await gw.publish(good, received_us)
    return json_response({"accepted": len(good), "ids": [e.id for e in good]}, status=202)


async def get_event(request: Request) -> Response:
    """GET /v1/events/{id}: the event as the pipeline saw it, and its state."""
    gw = _gateway(request)
    event_id = request.path_params["event_id"]
    if "\x00" in event_id:
        raise ApiError(404, f"No event with id {event_id!r} was accepted.")
    rows = await gw.query(
        "SELECT id, event_type, customer_id, ts, received_at, properties, metadata, stream_seq"
        " FROM usage_events WHERE id = :id",
        {"id": event_id},
    )
    if rows:
        r = rows[0]
        return json_response(
            {
                "id": r.id,
                "event_type": r.event_type,
                "customer_id": r.customer_id,
                "timestamp": format_timestamp(r.ts),
                "received_at": format_timestamp(r.received_at),
                "properties": r.properties,
                "metadata": r.metadata,
                "state": "stored",
                "stream_seq": r.stream_seq,
            }
        )
    rows = await gw.query(
        "SELECT event_id, event_type, customer_id, ts, received_at, payload, reasons, stream_seq, status"
        " FROM quarantined_events WHERE event_id = :id",
        {"id": event_id},
    )
    if rows:
        r = rows[0]
        payload = r.payload if isinstance(r.payload, dict) else {}
        return json_response(
            {
                "id": r.event_id,
                "event_type": r.event_type,
                "customer_id": r.customer_id,
                "timestamp": format_timestamp(r.ts) if r.ts else payload.get("timestamp"),
                "received_at": format_timestamp(r.received_at),
                "properties": payload.get("properties", {}),
                "metadata": payload.get("metadata", {}),
                "state": "quarantined",
                "reasons": r.reasons,
                "stream_seq": r.stream_seq,
            }
        )
    pending = await gw.find_pending(event_id)
    if pending is not None:
        return json_response(pending)
    raise ApiError(
        404, f"No event with id {event_id!r} was accepted (or it is still far back in the backlog)."
    )


async def list_meters(request: Request) -> Response:
    """GET /v1/meters."""
    return json_response({"meters": [m.as_json() for m in _gateway(request).catalog.meters]})


async def meter_usage(request: Request) -> Response:
    """GET /v1/meters/{slug}/usage: the contract's usage query."""
    gw = _gateway(request)
    slug = request.path_params["slug"]
    meter = gw.catalog.meter(slug)
    if meter is None:
        raise ApiError(400, f"There is no meter {slug!r}; GET /v1/meters lists them.")
    try:
        q = build_query(meter, dict(request.query_params))
    except UsageQueryError as exc:
        raise ApiError(400, str(exc)) from exc
    sql, params = usage_sql(q)
    return json_response(usage_answer(q, await gw.query(sql, params)))


async def list_quarantine(request: Request) -> Response:
    """GET /v1/quarantine: quarantined events with their reasons, newest first, filtered and paged."""
    gw = _gateway(request)
    try:
        filters, limit, offset = parse_list_params(request.query_params.multi_items())
    except QuarantineQueryError as exc:
        raise ApiError(400, str(exc), list(exc.details)) from exc
    sql, params = list_sql(filters, limit, offset, sqlalchemy_bind)
    return json_response(list_answer(await gw.query(sql, params), limit, offset))


async def ingest_status(request: Request) -> Response:
    """GET /v1/ingest/status: the ledger that proves nothing was lost."""
    gw = _gateway(request)
    assert gw.js is not None
    try:
        backlog = await jetstream.backlog(gw.js)
    except Exception as exc:
        raise ApiError(
            503, "The event broker is unreachable. Retry shortly.", headers={"Retry-After": "2"}
        ) from exc
    totals = LedgerTotals.from_row(tuple((await gw.query(LEDGER_TOTALS_SQL))[0]))
    return json_response(
        {
            "stream": {"name": STREAM_NAME, "last_seq": backlog.last_seq, "messages": backlog.messages},
            "consumer": {
                "name": CONSUMER_NAME,
                "pending": backlog.pending + backlog.ack_pending,
                "ack_pending": backlog.ack_pending,
                "ack_floor": backlog.ack_floor,
            },
            "events": {
                "processed": totals.processed,
                "stored": totals.stored,
                "duplicates": totals.duplicates,
                "quarantined": totals.quarantined,
                "balanced": totals.balanced,
                "replayed_from_quarantine": totals.replayed,
                "duplicates_from_quarantine": totals.replay_duplicates,
            },
            "quarantine_replays": {
                "replays": totals.replays,
                "last_finished_at": format_timestamp(totals.last_replay) if totals.last_replay else None,
            },
            "ledger": {
                "messages": totals.messages,
                "last_commit": format_timestamp(totals.last_commit) if totals.last_commit else None,
            },
        }
    )


async def healthz(request: Request) -> Response:
    """GET /healthz: the process is up."""
    return json_response({"status": "ok"})


async def readyz(request: Request) -> Response:
    """GET /readyz: NATS, the stream and PostgreSQL answer."""
    gw = _gateway(request)
    checks: dict[str, str] = {}
    try:
        assert gw.js is not None and gw.nc is not None
        if not gw.nc.is_connected:  # fail fast instead of waiting for a JetStream timeout
            raise ConnectionError("not connected to NATS")
        await gw.js.stream_info(STREAM_NAME)
        checks["nats"] = checks["stream"] = "ok"
    except Exception as exc:
        checks["nats"] = f"failed: {exc!r}"
    try:
        await gw.query("SELECT 1")
        checks["postgres"] = "ok"
    except Exception as exc:
        checks["postgres"] = f"failed: {exc!r}"
    ok = all(v == "ok" for v in checks.values()) and len(checks) == 3
    if not ok:
        return json_response(
            {"error": "Not ready: a dependency does not answer.", "details": [checks]},
            status=503,
            headers={"Retry-After": "2"},
        )
    return json_response({"status": "ready", "checks": checks})


async def _api_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ApiError)
    return json_response({"error": exc.error, "details": exc.details}, status=exc.status, headers=exc.headers)


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    message = {
        404: "No such endpoint; see the README for the API.",
        405: "Method not allowed on this endpoint.",
    }.get(exc.status_code, str(exc.detail))
    headers = dict(exc.headers) if exc.headers else None
    return json_response({"error": message, "details": []}, status=exc.status_code, headers=headers)


async def _server_error(request: Request, exc: Exception) -> Response:
    log.exception("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return json_response({"error": "Internal error; it has been logged.", "details": []}, status=500)


def create_app(settings: Settings | None = None, catalog: Catalog | None = None) -> Starlette:
    """Build the gateway app; connections open in its lifespan (use ``with TestClient(app)``)."""
    settings = settings or load_settings()
    catalog = catalog or load_catalog(settings.catalog_dir)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        gateway = Gateway(settings, catalog)
        await gateway.start()
        app.state.gateway = gateway
        try:
            yield
        finally:
            await gateway.stop()

    routes = [
        Route("/v1/events", post_events, methods=["POST"]),
        Route("/v1/events/{event_id:path}", get_event, methods=["GET"]),
        Route("/v1/meters", list_meters, methods=["GET"]),
        Route("/v1/meters/{slug}/usage", meter_usage, methods=["GET"]),
        Route("/v1/ingest/status", ingest_status, methods=["GET"]),
        Route("/v1/quarantine", list_quarantine, methods=["GET"]),
        Route("/healthz", healthz, methods=["GET"]),
        Route("/readyz", readyz, methods=["GET"]),
    ]
    return Starlette(
        routes=routes,
        lifespan=lifespan,
        exception_handlers={ApiError: _api_error, HTTPException: _http_error, Exception: _server_error},
    )
