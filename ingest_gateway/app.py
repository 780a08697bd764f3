"""The ingest gateway (ASGI): checks events at the door, stamps their receive time, and answers 202
only once JetStream has them on disk. Also serves the read side of the contract (events, meters,
usage, quarantine, ingest status).

Run it with ``meter up``, or ``uvicorn --factory ingest_gateway.app:create_app``.

This module only assembles the app: the routes table, the lifespan that owns the
:class:`~ingest_gateway.gateway.Gateway`, and the mapping of errors to the contract's error shape.
Each route group lives in its own module (``events``, ``meters``, ``quarantine``, ``billing``, ``status``).
"""

from __future__ import annotations

import contextlib
import gc
import logging
from collections.abc import AsyncIterator, Iterator

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from ingest_gateway import auth, billing, events, keys, meters, metrics, peers, quarantine, status, webhooks
from ingest_gateway.gateway import Gateway
from ingest_gateway.http import ApiError, json_response
from ingest_gateway.metrics_http import RequestMetrics
from ingest_gateway.openapi import docs_page, openapi_json
from meter_platform.catalog import Catalog, load_catalog
from meter_platform.config import Settings, load_settings
from meter_platform.errors import PlatformError

log = logging.getLogger("ingest_gateway")

#: The collector's first threshold while the gateway serves (Python's default: 700). A request of 100
#: events allocates a few hundred containers, so at 700 the collector ran after every other request,
#: and every tenth of those runs went on into the older generations.
GC_THRESHOLD = 10_000


@contextlib.contextmanager
def _settled_heap() -> Iterator[None]:
    """Serve with the start-up heap frozen and young collections rarer; as before afterwards.

    Profiled under load, a third of the gateway's CPU went to the cyclic garbage collector: each full
    collection walked the ~100k objects of the imported modules (Starlette, SQLAlchemy, NATS, the
    catalog), which never become garbage. ``gc.freeze()`` moves them out of the collector's sight, and
    a higher first threshold makes the collections of the requests' short-lived objects rarer (each
    collects more of them at once). Nothing is left uncollected: garbage made while serving is
    collected as ever, and the frozen objects go back to the collector when the app stops (tests
    start many apps in one process).
    """
    threshold = gc.get_threshold()
    gc.collect()
    gc.freeze()
    gc.set_threshold(GC_THRESHOLD, *threshold[1:])
    try:
        yield
    finally:
        gc.set_threshold(*threshold)
        gc.unfreeze()


#: The capture route, served by :class:`CaptureShortcut` (and listed in ROUTES like every route).
CAPTURE_PATH = "/v1/events"

#: Every endpoint, one block per route group.
ROUTES = [
    # capture, and the events' state
    Route(CAPTURE_PATH, events.post_events, methods=["POST"]),
    Route("/v1/events/{event_id:path}", events.get_event, methods=["GET"]),
    # meters and usage
    Route("/v1/meters", meters.list_meters, methods=["GET"]),
    Route("/v1/meters/{slug}/usage", meters.meter_usage, methods=["GET"]),
    # quarantine
    Route("/v1/quarantine", quarantine.list_quarantine, methods=["GET"]),
    # billing: customers, subscriptions, invoices
    Route("/v1/customers", billing.list_customers, methods=["GET"]),
    Route("/v1/customers/{customer_id}", billing.put_customer, methods=["PUT"]),
    Route("/v1/customers/{customer_id}", billing.get_customer, methods=["GET"]),
    Route("/v1/customers/{customer_id}/subscriptions", billing.post_subscription, methods=["POST"]),
    Route("/v1/invoices", billing.list_invoices, methods=["GET"]),
    Route("/v1/invoices.csv", billing.invoices_csv, methods=["GET"]),
    Route("/v1/invoices/{invoice_id}.html", billing.invoice_html, methods=["GET"]),
    Route("/v1/invoices/{invoice_id}", billing.get_invoice, methods=["GET"]),
    # API keys and the audit log (admin)
    Route("/v1/keys", keys.list_keys, methods=["GET"]),
    Route("/v1/keys", keys.create_key, methods=["POST"]),
    Route("/v1/keys/{key_id}", keys.revoke_key, methods=["DELETE"]),
    Route("/v1/audit", keys.list_audit, methods=["GET"]),
    # operations
    Route("/v1/ingest/status", status.ingest_status, methods=["GET"]),
    Route("/healthz", status.healthz, methods=["GET"]),
    Route("/readyz", status.readyz, methods=["GET"]),
    # the API description (public)
    Route("/openapi.json", openapi_json, methods=["GET"]),
    Route("/docs", docs_page, methods=["GET"]),
    # signed webhooks, Prometheus metrics, and the peers' ingest APIs under their own prefixes
    *webhooks.ROUTES,
    *metrics.ROUTES,
    *peers.ROUTES,
]


class CaptureShortcut:
    """Innermost middleware: ``POST /v1/events`` goes straight to its handler.

    Capture is nearly all the gateway's traffic, and each request through Starlette's exception
    middleware, router and per-request wrappers cost about a sixth of the CPU of a single-event request
    (profiled under load). The handler's errors are answered here exactly as the exception handlers
    below answer them (the contract's error shape); anything else goes on up to the server-error
    middleware, which answers 500 and logs it, as before. Every other request takes the usual path.
    The metrics and API-key middleware around it see every request as before.
    """

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or scope["path"] != CAPTURE_PATH:
            await self.app(scope, receive, send)
            return
        request = Request(scope, receive)
        try:
            response = await events.post_events(request)
        except ApiError as exc:
            response = await _api_error(request, exc)
        except PlatformError as exc:
            response = await _platform_error(request, exc)
        await response(scope, receive, send)


async def _api_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ApiError)
    return json_response({"error": exc.error, "details": exc.details}, status=exc.status, headers=exc.headers)


async def _platform_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, PlatformError)
    return json_response({"error": exc.message, "details": exc.details}, status=exc.status)


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
            with _settled_heap():
                yield
        finally:
            await gateway.stop()

    return Starlette(
        routes=list(ROUTES),
        lifespan=lifespan,
        middleware=[
            Middleware(RequestMetrics),  # outermost: counts the requests auth refuses too
            Middleware(auth.AuthMiddleware),  # API keys on every /v1 route
            Middleware(CaptureShortcut),  # POST /v1/events past the router
        ],
        exception_handlers={
            ApiError: _api_error,
            PlatformError: _platform_error,
            HTTPException: _http_error,
            Exception: _server_error,
        },
    )
