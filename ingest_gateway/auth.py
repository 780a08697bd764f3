"""API keys at the door: who may call which route, for which customer, how often; and the audit log.

:class:`AuthMiddleware` (plain ASGI, so the capture path pays one dict lookup per request) checks
``Authorization: Bearer <key>`` on every ``/v1`` route: 401 when the key is missing, unknown or
revoked, 403 when its scopes do not allow the route, 429 + ``Retry-After`` over its request rate.
Verified keys are cached for ``Settings.auth_cache_seconds`` (default 5 s): a revocation takes effect
within that time. A key bound to a customer sees only that customer: its usage, quarantine and invoice
listings get ``customer_id`` forced (another customer's is a 403), another customer's invoice or event
is a 404. Events are checked as a whole batch by :func:`admit_events` before anything is published
(another customer's event: 403; over the key's events rate: 429), so nothing refused is half-kept.

Keys never appear in logs or error messages: only their id does.
"""

from __future__ import annotations

import contextvars
import logging
import math
from collections.abc import Callable
from typing import Any, TypeVar
from urllib.parse import parse_qsl, urlencode

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ingest_gateway.gateway import Gateway, in_transaction
from ingest_gateway.http import ApiError, json_response
from ingest_gateway.key_access import Access, Caller
from meter_platform.access import audit
from meter_platform.capture.envelope import Event

log = logging.getLogger("ingest_gateway")
T = TypeVar("T")

#: Scopes that may call each kind of route.
INGEST = frozenset({"ingest", "admin"})
READ = frozenset({"read", "admin"})
ADMIN = frozenset({"admin"})
#: Routes anyone may call (outside /v1 everything is public: /healthz, /readyz, /openapi.json, /docs).
PUBLIC = frozenset({"/v1/healthz", "/v1/readyz"})
#: Routes that check a signature of their own instead of an API key (inbound webhooks).
SIGNED = "/v1/webhooks/"
#: The peers' ingest APIs, served under their own prefixes (ingest_gateway/peers).
PEER_PREFIXES = ("/openmeter/", "/lago/", "/stripe/")
#: A peer API whose SDK reads only its own error shape registers it here, by path prefix: the key
#: checks' 401/403/429 under that prefix are answered in it (default: the contract's error shape).
PEER_ERROR_BODIES: dict[str, Callable[[ApiError], Any]] = {}
#: Listings whose ``customer_id`` parameter a customer-bound key has forced to its customer.
_CUSTOMER_FILTERED = ("/v1/invoices", "/v1/invoices.csv", "/v1/quarantine")
SCOPE_KEY = "meter.api_key"
#: The key (and the gateway's Access) of the request being served, for :func:`admit_events`.
_CURRENT: contextvars.ContextVar[tuple[Caller, Access] | None] = contextvars.ContextVar(
    "meter_api_key", default=None
)


def allowed_scopes(method: str, path: str) -> frozenset[str] | None:
    """The scopes that may call ``method path`` (None: public)."""
    if path.startswith(PEER_PREFIXES):
        # The peers' ingest APIs (their SDKs send our key as their own): writes ingest, reads read.
        return READ if method in ("GET", "HEAD") else INGEST
    if not path.startswith("/v1/") or path in PUBLIC or path.startswith(SIGNED):
        return None
    if path == "/v1/events" and method == "POST":
        return INGEST
    if method in ("GET", "HEAD") and (
        path.startswith(("/v1/events/", "/v1/meters", "/v1/invoices", "/v1/quarantine"))
        or path == "/v1/ingest/status"
    ):
        return READ
    return ADMIN


def _retry_after(seconds: float) -> dict[str, str]:
    return {"Retry-After": str(max(1, math.ceil(seconds)))}


def _bearer(scope: Scope) -> str | None:
    for name, value in scope["headers"]:
        if name == b"authorization":
            kind, _, token = value.decode("latin-1").partition(" ")
            return token.strip() or None if kind.lower() == "bearer" else None
    return None


#: Admin API actions recorded in the audit log once they succeed: (method, path test, action).
_AUDITED: tuple[tuple[str, Callable[[list[str]], bool], str], ...] = (
    ("PUT", lambda p: len(p) == 3 and p[1] == "customers", "customer.put"),
    (
        "POST",
        lambda p: len(p) == 4 and p[1] == "customers" and p[3] == "subscriptions",
        "subscription.create",
    ),
)
#: Every audited route is under this prefix (a request elsewhere skips the search above).
_AUDITED_PREFIX = "/v1/customers/"


class AuthMiddleware:
    """Checks the key of every /v1 request (see the module's docstring)."""

    def __init__(self, app: ASGIApp):
        self.app = app
        self.access: Access | None = None

    def _access(self, gw: Gateway) -> Access:
        if self.access is None:
            self.access = Access(gw.settings.auth_cache_seconds)
            gw.before_publish = admit_events
        return self.access

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self.app(scope, receive, self._after_startup(scope, send))
            return
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        gw: Gateway = scope["app"].state.gateway
        access = self._access(gw)
        method, path = scope["method"], scope["path"]
        allowed = allowed_scopes(method, path)
        if allowed is None:
            await self.app(scope, receive, send)
            return
        scope = dict(scope)
        if not gw.settings.auth_enabled:
            scope[SCOPE_KEY] = None
            await self._call_audited(scope, receive, send, "auth-disabled")
            return
        try:
            caller = await self._check(gw, scope, allowed)
        except ApiError as exc:
            shape = next((f for p, f in PEER_ERROR_BODIES.items() if path.startswith(p)), None)
            body = shape(exc) if shape else {"error": exc.error, "details": exc.details}
            await json_response(body, status=exc.status, headers=exc.headers)(scope, receive, send)
            return
        scope[SCOPE_KEY] = caller
        token = _CURRENT.set((caller, access))
        try:
            await self._call_audited(scope, receive, send, caller.id)
        finally:
            _CURRENT.reset(token)

    def _after_startup(self, scope: Scope, send: Send) -> Send:
        """Load the keys once the gateway is connected, before the server takes requests."""

        async def send_after_load(message: Message) -> None:
            if message["type"] == "lifespan.startup.complete":
                gw: Gateway = scope["app"].state.gateway
                if gw.settings.auth_enabled:
                    await self._access(gw).load(gw)
            await send(message)

        return send_after_load

    async def _check(self, gw: Gateway, scope: Scope, allowed: frozenset[str]) -> Caller:
        assert self.access is not None
        secret = _bearer(scope)
        if secret is None:
            raise ApiError(401, "This route needs an API key: send 'Authorization: Bearer <key>'.",
                           headers={"WWW-Authenticate": "Bearer"})  # fmt: skip
        caller = await self.access.caller(gw, secret)
        if caller is None:
            raise ApiError(401, "The API key is unknown or revoked.", headers={"WWW-Authenticate": "Bearer"})
        if not caller.scopes & allowed:
            raise ApiError(
                403,
                f"Key {caller.id} (scopes: {', '.join(sorted(caller.scopes))}) may not call this route; "
                f"it needs one of: {', '.join(sorted(allowed))}.",
            )
        wait = self.access.take_request(caller)
        if wait:
            raise ApiError(429, f"Key {caller.id} is over its rate of {caller.requests_per_second:g} "
                           "requests/s; retry after the time in Retry-After.", headers=_retry_after(wait))  # fmt: skip
        if caller.customer_id is not None:
            await _scope_to_customer(gw, scope, caller.customer_id, allowed)
        return caller

    async def _call_audited(self, scope: Scope, receive: Receive, send: Send, actor: str) -> None:
        if not scope["path"].startswith(_AUDITED_PREFIX):
            await self.app(scope, receive, send)
            return
        method = scope["method"]
        parts = scope["path"].strip("/").split("/")
        action = next((a for m, test, a in _AUDITED if m == method and test(parts)), None)
        if action is None:
            await self.app(scope, receive, send)
            return
        status = 0

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        await self.app(scope, receive, send_status)
        if 200 <= status < 300:
            gw: Gateway = scope["app"].state.gateway
            await in_transaction(
                gw, lambda conn: audit.record(conn, actor, action, parts[2], {"path": scope["path"]})
            )


async def _scope_to_customer(gw: Gateway, scope: Scope, customer_id: str, allowed: frozenset[str]) -> None:
    """Limit a customer-bound key's request to its customer (403 / 404 otherwise)."""
    path = scope["path"]
    if allowed == ADMIN:
        raise ApiError(403, "A key bound to a customer may not call administrative routes.")
    if allowed == INGEST:
        return  # each event's customer is checked by admit_events
    if path.startswith(PEER_PREFIXES):
        raise ApiError(
            403, "A key bound to a customer reads through the /v1 routes, not the compatible APIs."
        )
    if path in _CUSTOMER_FILTERED or (path.startswith("/v1/meters/") and path.endswith("/usage")):
        params = parse_qsl(scope["query_string"].decode("latin-1"), keep_blank_values=True)
        asked = {v for k, v in params if k == "customer_id" and v}
        if asked - {customer_id}:
            raise ApiError(403, "This key reads only its own customer's data.")
        if not asked:
            params = [(k, v) for k, v in params if k != "customer_id"] + [("customer_id", customer_id)]
            scope["query_string"] = urlencode(params).encode("latin-1")
        return
    owner: str | None = None
    if path.startswith("/v1/invoices/"):
        invoice_id = path.removeprefix("/v1/invoices/").removesuffix(".html")
        rows = await gw.query("SELECT customer_id FROM invoices WHERE id = :id", {"id": invoice_id})
        if rows and rows[0][0] != customer_id:
            raise ApiError(404, "No such invoice for this key's customer.")
    elif path.startswith("/v1/events/"):
        event_id = path.removeprefix("/v1/events/")
        rows = await gw.query(
            "SELECT customer_id FROM usage_events WHERE id = :id"
            " AND ts = (SELECT ts FROM event_ids WHERE id = :id)"
            " UNION ALL SELECT customer_id FROM quarantined_events WHERE event_id = :id LIMIT 1",
            {"id": event_id},
        )
        owner = rows[0][0] if rows else None
        if owner is not None and owner != customer_id:
            raise ApiError(404, "No such event for this key's customer.")


def admit_events(events: list[Event]) -> None:
    """Check a request's whole batch against its key's customer and events rate before it is published
    (``Gateway.before_publish``)."""
    current = _CURRENT.get()
    if current is None:
        return
    caller, access = current
    if caller.customer_id is not None:
        foreign = [i for i, e in enumerate(events) if e.customer_id != caller.customer_id]
        if foreign:
            raise ApiError(
                403,
                f"This key sends events of customer {caller.customer_id!r} only; "
                f"{len(foreign)} event(s) are for another customer. Nothing of this request was kept.",
                [{"index": i, "field": "customer_id", "message": "another customer"} for i in foreign[:100]],
            )
    wait = access.take_events(caller, len(events))
    if wait:
        raise ApiError(
            429,
            f"Key {caller.id} is over its rate of {caller.events_per_second:g} events/s; "
            "nothing of this request was kept. Retry after the time in Retry-After.",
            headers=_retry_after(wait),
        )
