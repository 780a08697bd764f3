"""The API keys' admin routes: ``/v1/keys`` (create, list, revoke) and ``/v1/audit`` (admin actions).

Who may call them is decided at the door (:mod:`ingest_gateway.auth`); the keys themselves live in
:mod:`meter_platform.access`.
"""

from __future__ import annotations

from typing import Any

import psycopg
from starlette.requests import Request
from starlette.responses import Response

from ingest_gateway.auth import SCOPE_KEY
from ingest_gateway.gateway import gateway_of, in_transaction
from ingest_gateway.http import ApiError, json_response, paging, read_json_object
from ingest_gateway.key_access import Caller
from meter_platform.access import audit, keys
from meter_platform.errors import PlatformError


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
