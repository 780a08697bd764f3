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

import asyncio
import contextvars
import hashlib
import hmac
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar
from urllib.parse import parse_qsl, urlencode

import psycopg
from sqlalchemy import text
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ingest_gateway.gateway import Gateway, gateway_of, in_transaction
from ingest_gateway.health import DEPENDENCY_TIMEOUT, Dependency, NoAnswer
from ingest_gateway.http import ApiError, json_response, paging, read_json_object
from meter_platform.access import audit, keys
from meter_platform.capture.envelope import Event
from meter_platform.errors import PlatformError

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
#: At most this many keys looked up outside the snapshot (unknown ones too) are remembered.
_CACHE_MAX = 10_000
#: A request waits at most this long for a reload of the keys (a frozen database must not stall capture).
_RELOAD_WAIT = 0.25
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


@dataclass(frozen=True)
class Caller:
    """A verified key as the gateway uses it."""

    id: str
    scopes: frozenset[str]
    customer_id: str | None
    events_per_second: float
    requests_per_second: float


class Bucket:
    """A token bucket holding at most one second of its rate."""

    def __init__(self, rate: float):
        self.rate = rate
        self.tokens = rate
        self.stamp = time.monotonic()

    def take(self, n: float) -> float:
        """Take ``n`` tokens and return 0, or take nothing and return the seconds to wait.

        A request larger than the bucket is admitted when the bucket is full (it then runs into debt),
        so a batch bigger than one second's rate is slowed down, never refused forever."""
        now = time.monotonic()
        self.tokens = min(self.rate, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        need = min(n, self.rate)
        if self.tokens >= need:
            self.tokens -= n
            return 0.0
        return (need - self.tokens) / self.rate


@dataclass
class Access:
    """The gateway's view of the keys: a snapshot of every active key, reloaded when older than ``ttl``
    seconds (so a revocation takes effect within it), plus one-off lookups of keys created since.

    Requests never wait long for PostgreSQL: a reload is awaited at most :data:`_RELOAD_WAIT`; while
    the database does not answer, the last snapshot stays in use. Each key's rate buckets live here too.
    """

    ttl: float
    snapshot: dict[str, Caller] = field(default_factory=dict)
    loaded_at: float = -math.inf
    retry_at: float = 0.0
    misses: dict[str, tuple[float, Caller | None]] = field(default_factory=dict)
    used: set[str] = field(default_factory=set)
    requests: dict[str, Bucket] = field(default_factory=dict)
    events: dict[str, Bucket] = field(default_factory=dict)
    calls: Dependency = field(default_factory=lambda: Dependency("postgres"))
    reloading: asyncio.Future[None] | None = None

    async def caller(self, gw: Gateway, secret: str) -> Caller | None:
        """The active key ``secret`` is, or None."""
        digest = hashlib.sha256(secret.encode()).hexdigest()
        now = time.monotonic()
        if now - self.loaded_at > self.ttl and now >= self.retry_at:
            await self._reload(gw)
        found = self.snapshot.get(digest)
        if found is None:
            hit = self.misses.get(digest)
            if hit is not None and hit[0] > now:
                found = hit[1]
            else:
                found = await self._lookup(gw, digest)
                if len(self.misses) >= _CACHE_MAX:
                    self.misses.clear()
                self.misses[digest] = (now + self.ttl, found)
        if found is not None:
            self.used.add(found.id)
        return found

    async def load(self, gw: Gateway) -> None:
        """Load the snapshot (at start: the keys work even if PostgreSQL stops answering later)."""
        await self._reload(gw, wait=DEPENDENCY_TIMEOUT)

    async def _reload(self, gw: Gateway, wait: float = 0.0) -> None:
        if self.reloading is None or self.reloading.done():
            self.reloading = asyncio.ensure_future(self._fetch(gw))
        done, _ = await asyncio.wait({self.reloading}, timeout=wait or _RELOAD_WAIT)
        if not done:
            self.retry_at = time.monotonic() + 1.0  # keep the last snapshot meanwhile

    async def _fetch(self, gw: Gateway) -> None:
        used, self.used = list(self.used), set()
        try:
            rows = await self.calls.call(lambda: _load_keys(gw, used))
        except Exception as exc:
            self.used.update(used)
            self.retry_at = time.monotonic() + 1.0
            log.warning("cannot reload API keys (keeping the last ones): %s", exc)
            return
        self.snapshot = {r[0]: Caller(r[1], frozenset(r[2]), r[3], float(r[4]), float(r[5])) for r in rows}
        self.misses.clear()
        self.loaded_at = time.monotonic()

    async def _lookup(self, gw: Gateway, digest: str) -> Caller | None:
        """A key not in the snapshot (created since it was loaded)."""
        try:
            rows = await self.calls.call(
                lambda: gw.query(
                    f"SELECT {_KEY_COLUMNS} FROM api_keys WHERE key_hash = :h AND revoked_at IS NULL",
                    {"h": digest},
                )
            )
        except (NoAnswer, ApiError) as exc:
            raise ApiError(503, "Keys cannot be verified: the database does not answer. Retry shortly.",
                           headers={"Retry-After": "2"}) from exc  # fmt: skip
        if not rows or not hmac.compare_digest(rows[0][0], digest):
            return None
        r = rows[0]
        return Caller(r[1], frozenset(r[2]), r[3], float(r[4]), float(r[5]))

    def take_request(self, caller: Caller) -> float:
        bucket = self.requests.get(caller.id)
        if bucket is None or bucket.rate != caller.requests_per_second:
            bucket = self.requests[caller.id] = Bucket(caller.requests_per_second)
        return bucket.take(1)

    def take_events(self, caller: Caller, n: int) -> float:
        bucket = self.events.get(caller.id)
        if bucket is None or bucket.rate != caller.events_per_second:
            bucket = self.events[caller.id] = Bucket(caller.events_per_second)
        return bucket.take(n)


_KEY_COLUMNS = "key_hash, id, scopes, customer_id, events_per_second, requests_per_second"


async def _load_keys(gw: Gateway, used: list[str]) -> list[Any]:
    """Every active key; stamps the last use of the keys used since the previous load."""
    assert gw.engine is not None
    async with gw.engine.begin() as conn:
        if used:
            await conn.execute(
                text("UPDATE api_keys SET last_used_at = now() WHERE id = ANY(:ids)"), {"ids": used}
            )
        result = await conn.execute(text(f"SELECT {_KEY_COLUMNS} FROM api_keys WHERE revoked_at IS NULL"))
        return list(result.all())


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


# --- admin routes: /v1/keys and /v1/audit ------------------------------------------------------------


def _actor(request: Request) -> str:
    caller: Caller | None = request.scope.get(SCOPE_KEY)
    return caller.id if caller else "auth-disabled"


async def list_audit(request: Request) -> Response:
    """GET /v1/audit?limit=&offset=: admin actions, newest first."""
    limit, offset = paging(request)
    rows = await in_transaction(gateway_of(request), lambda conn: audit.list_audit(conn, limit, offset))
    answer: dict[str, Any] = {"data": rows}
    if len(rows) == limit:
        answer["next_offset"] = offset + limit
    return json_response(answer)


async def list_keys(request: Request) -> Response:
    """GET /v1/keys: every key (never the key itself)."""
    found = await in_transaction(gateway_of(request), keys.list_keys)
    return json_response({"keys": [k.as_json() for k in found]})


async def create_key(request: Request) -> Response:
    """POST /v1/keys ``{"scopes", "name"?, "customer_id"?, "events_per_second"?, "requests_per_second"?}``:
    the new key, shown this once."""
    body = await read_json_object(request)
    if not isinstance(body.get("scopes"), list):
        raise ApiError(
            400, 'The body is {"scopes": ["ingest"|"read"|"admin", ...], "name"?, "customer_id"?}.'
        )
    actor = _actor(request)

    def work(conn: psycopg.Connection) -> dict[str, Any]:
        key, secret = keys.create_key(
            conn,
            [str(s) for s in body["scopes"]],
            name=body.get("name"),
            customer_id=body.get("customer_id"),
            events_per_second=float(body.get("events_per_second") or keys.DEFAULT_EVENTS_PER_SECOND),
            requests_per_second=float(body.get("requests_per_second") or keys.DEFAULT_REQUESTS_PER_SECOND),
            actor=actor,
        )
        return {**key.as_json(), "key": secret}

    try:
        return json_response(await in_transaction(gateway_of(request), work), status=201)
    except (TypeError, ValueError) as exc:
        raise ApiError(400, "Rate limits must be numbers and name/customer_id strings.") from exc


async def revoke_key(request: Request) -> Response:
    """DELETE /v1/keys/{key_id}: revoke (effective within the gateway's key cache time)."""
    key_id, actor = request.path_params["key_id"], _actor(request)
    try:
        key = await in_transaction(gateway_of(request), lambda conn: keys.revoke_key(conn, key_id, actor))
    except PlatformError:
        raise
    return json_response(key.as_json())
