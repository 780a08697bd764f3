"""The gateway's own Prometheus instruments: requests by route template, and publishes to JetStream.

They live in prometheus_client's default registry, so ``GET /metrics`` serves them with anything else
registered there (e.g. the webhooks' rejection counter). When ``PROMETHEUS_MULTIPROC_DIR`` is set
before this module is imported (``meter up`` does it when the gateway runs several workers), each
worker writes its values to files in that folder and ``/metrics`` adds up every worker's, whichever
worker answers the scrape.

This module imports nothing of the gateway, so :mod:`ingest_gateway.gateway` can call its hooks.
"""

from __future__ import annotations

import re
import time
import weakref
from typing import Any

from prometheus_client import Counter, Histogram
from starlette.routing import BaseRoute, Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

#: Request durations: a publish waits for JetStream's fsync (milliseconds); reads may take seconds.
_SECONDS_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

HTTP_REQUESTS = Counter(
    "meter_http_requests",
    "HTTP requests answered by the gateway, by route template (not the raw path), method and status.",
    ["route", "method", "status"],
)
HTTP_SECONDS = Histogram(
    "meter_http_request_duration_seconds",
    "Time from a request's arrival to the end of its answer, by route template and method.",
    ["route", "method"],
    buckets=_SECONDS_BUCKETS,
)
EVENTS_ACCEPTED = Counter(
    "meter_events_accepted",
    "Events made durable: JetStream acknowledged (fsync'd) them and the client got a 202.",
)
PUBLISH_SECONDS = Histogram(
    "meter_publish_seconds",
    "Latency of one request's publish to JetStream, until every message of it is acknowledged.",
    buckets=_SECONDS_BUCKETS,
)
PUBLISH_FAILURES = Counter(
    "meter_publish_failures",
    "Publishes that JetStream did not confirm (the client got a 503 and must retry), by reason: "
    "not_connected (no connection to NATS) or not_confirmed (no ack: timeout, stream full, error).",
    ["reason"],
)
for _reason in ("not_connected", "not_confirmed"):
    PUBLISH_FAILURES.labels(_reason)  # present at 0 from the start, so rate() sees the first failure
PUBLISH_FAILED_EVENTS = Counter(
    "meter_publish_failed_events",
    "Events in publishes that JetStream did not confirm (answered 503; the client retries them).",
)

#: The route label of a request that matched no route (404): one label, whatever the path.
UNMATCHED = "unmatched"
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
_CONVERTER = re.compile(r"\{(\w+):\w+\}")


def publish_succeeded(events: int, seconds: float) -> None:
    """Hook for the publish path: ``events`` are durable; the publish took ``seconds``."""
    EVENTS_ACCEPTED.inc(events)
    PUBLISH_SECONDS.observe(seconds)


def publish_failed(reason: str, events: int) -> None:
    """Hook for the publish path: JetStream did not confirm a publish of ``events`` events."""
    PUBLISH_FAILURES.labels(reason).inc()
    PUBLISH_FAILED_EVENTS.inc(events)


def route_label(route: BaseRoute) -> str:
    """The route's path template without converters: ``/v1/events/{event_id}``."""
    path = getattr(route, "path", None) or type(route).__name__
    return _CONVERTER.sub(r"{\1}", path)


class RouteIndex:
    """Finds the route template of a request, cheaply.

    When the router took the request in this very scope, the scope carries its ``endpoint`` and the
    route is looked up by it (one dict access; a handler serving several routes is matched among those
    only). Otherwise (the API-key check hands /v1 requests on in a copy of the scope, refuses some,
    or no route matched) the request is matched against the routes in order, a few microseconds a
    route; those answers are remembered per (method, path), up to :data:`_SLOW_CACHE` of them, so a
    fixed path such as ``POST /v1/events`` is matched once.
    """

    def __init__(self, routes: list[BaseRoute]):
        self.routes = routes
        self.by_endpoint: dict[Any, list[BaseRoute]] = {}
        self.labels = {id(route): route_label(route) for route in routes}
        for route in routes:
            endpoint = getattr(route, "endpoint", None)
            if endpoint is not None:
                self.by_endpoint.setdefault(endpoint, []).append(route)
        self.slow: dict[tuple[str, str, str], str] = {}

    def label(self, scope: Scope) -> str:
        """The template of the route that took (or refused with 405) the request, else ``unmatched``."""
        candidates = self.by_endpoint.get(scope.get("endpoint"))
        if candidates is not None and len(candidates) == 1:
            return self.labels[id(candidates[0])]
        key = (scope.get("method", ""), scope.get("root_path", ""), scope.get("path", ""))
        found = self.slow.get(key)
        if found is None:
            found = _match(candidates or self.routes, scope)
            if len(self.slow) >= _SLOW_CACHE:
                self.slow.clear()  # ids in paths make this unbounded; start over rather than grow
            self.slow[key] = found
        return found


#: How many answers of the slow path :class:`RouteIndex` remembers.
_SLOW_CACHE = 4096


def _match(routes: list[BaseRoute], scope: Scope) -> str:
    partial = None
    for route in routes:
        match, _ = route.matches(scope)
        if match is Match.FULL:
            return route_label(route)
        if match is Match.PARTIAL and partial is None:
            partial = route  # the path matched but not the method: the answer is a 405
    return route_label(partial) if partial is not None else UNMATCHED


_INDEXES: weakref.WeakKeyDictionary[Any, RouteIndex] = weakref.WeakKeyDictionary()


def route_of(scope: Scope) -> str:
    """The route template of a request (labels are templates, so that ids in paths do not make a
    time series each); ``unmatched`` when no route matched it."""
    app = scope.get("app")
    router = getattr(app, "router", None)
    if router is None:
        return UNMATCHED
    index = _INDEXES.get(app)
    if index is None:
        index = _INDEXES[app] = RouteIndex(list(router.routes))
    return index.label(scope)


class RequestMetrics:
    """ASGI middleware counting every HTTP request by route template, method and status.

    Outermost of the app's middleware, so requests refused by the API-key check (401/403/429) are
    counted too. A request whose handler raised is counted as the 500 it is answered with.
    """

    def __init__(self, app: ASGIApp):
        self.app = app
        # Each label set's child, kept (labels() takes a lock and builds a key on every call; the
        # label values are bounded: route templates, methods, statuses).
        self._counters: dict[tuple[str, str, int], Any] = {}
        self._timers: dict[tuple[str, str], Any] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status: dict[str, Any] = {"code": 500}

        async def send_and_note(message: Message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_note)
        finally:
            route = route_of(scope)
            method = scope.get("method", "")
            method = method if method in _METHODS else "other"
            code = status["code"]
            counter = self._counters.get((route, method, code))
            if counter is None:
                counter = self._counters[route, method, code] = HTTP_REQUESTS.labels(route, method, str(code))
            counter.inc()
            timer = self._timers.get((route, method))
            if timer is None:
                timer = self._timers[route, method] = HTTP_SECONDS.labels(route, method)
            timer.observe(time.perf_counter() - started)
