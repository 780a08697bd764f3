"""The Lago events API, under ``/lago``: Lago's official SDK works with
``Client(api_key=<our key>, api_url="<gateway>/lago/")`` (the trailing slash matters: the SDK joins
``api/v1/events`` onto it).

A Lago event maps to a platform event:

============================  ==========================================================================
Lago                          platform event
============================  ==========================================================================
``transaction_id``            ``id`` = ``lago:<transaction_id>``, the idempotency key
``code``                      ``event_type``
``external_customer_id``      ``customer_id``; when absent, ``external_subscription_id`` (the platform's
                              subscriptions have no external id of their own, so the subscription id
                              itself names the customer)
``timestamp``                 ``timestamp``: unix seconds (integer, float, or a string such as
                              ``"1795821934.202"``; digits beyond microseconds are truncated) or RFC 3339;
                              absent: the receive time
``properties``                ``properties`` (absent or null: ``{}``)
the ids, amount               ``metadata.lago``
============================  ==========================================================================

Answers are Lago's: ``{"event": {...}}``, ``{"events": [...]}``; errors
``{"status", "error", "code", "error_details"}`` (422 ``validation_errors`` for invalid events).
"""

from __future__ import annotations

import re
from decimal import ROUND_FLOOR, Decimal, InvalidOperation
from typing import Any

import msgspec
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from ingest_gateway.events import lookup_event
from ingest_gateway.gateway import gateway_of
from ingest_gateway.http import json_response
from ingest_gateway.peers.bodies import read_json
from ingest_gateway.peers.common import accept, scoped_id
from ingest_gateway.peers.lago_errors import LagoError, documented, with_lago_errors
from meter_platform.capture.envelope import (
    Event,
    check_times,
    convert_event,
    format_timestamp,
    now_us,
    us_to_datetime,
)

PEER = "lago"
JSON = "application/json"
#: Unix seconds as a string: what the SDK sends (``"1795821934.202"``).
_UNIX = re.compile(r"^-?\d{1,15}(\.\d+)?$")
#: What the platform's envelope calls a field, as Lago calls it.
NAMES = {"event_type": "code", "customer_id": "external_customer_id", "id": "transaction_id",
         "timestamp": "timestamp", "properties": "properties", "metadata": "event"}  # fmt: skip
#: Kept in ``metadata.lago`` (for GET /lago/api/v1/events/{transaction_id}).
KEPT = ("transaction_id", "external_subscription_id", "external_customer_id", "precise_total_amount_cents")

#: Who the event is for: one of the two is required.
_WHO = {"external_subscription_id", "external_customer_id"}

Errors = dict[str, list[str]]


def lago_timestamp(value: Any) -> str | None:
    """A Lago ``timestamp`` as RFC 3339 (None when absent); raises ValueError with the reason."""
    if value is None:
        return None
    if isinstance(value, str) and not _UNIX.match(value.strip()):
        return value  # RFC 3339, or not: check_times decides, as for /v1 events
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ValueError("must be unix seconds (a number or a string of one) or an RFC 3339 timestamp")
    try:
        # repr() of a float is its shortest exact decimal: 1795821934.202, not 1795821934.2019999
        seconds = Decimal(repr(value) if isinstance(value, float) else str(value).strip())
        micros = int((seconds * 1_000_000).to_integral_value(rounding=ROUND_FLOOR))
        return format_timestamp(us_to_datetime(micros))
    except (InvalidOperation, OverflowError, ValueError) as exc:
        raise ValueError("is not a time in years 0001-9999 (unix seconds)") from exc


def _text(item: dict[str, Any], name: str, errors: Errors, required: bool = False) -> str | None:
    value = item.get(name)
    if value is None or value == "":
        if required:
            errors[name] = ["value_is_mandatory"]
        return None
    if not isinstance(value, str):
        errors[name] = ["must be a string"]
        return None
    return value


def _check(item: dict[str, Any]) -> tuple[dict[str, Any], Errors]:
    """The fields of one Lago event, checked: (platform event fields, errors by Lago field)."""
    errors: Errors = {}
    transaction_id = _text(item, "transaction_id", errors, required=True)
    code = _text(item, "code", errors, required=True)
    subscription = _text(item, "external_subscription_id", errors)
    customer = _text(item, "external_customer_id", errors)
    if not (subscription or customer) and not errors.keys() & _WHO:
        errors["external_subscription_id"] = ["value_is_mandatory"]
    properties = item.get("properties")
    if properties is not None and not isinstance(properties, dict):
        errors["properties"] = ["must be an object"]
    amount = item.get("precise_total_amount_cents")
    if amount is not None and (isinstance(amount, bool) or not isinstance(amount, str | int | float)):
        errors["precise_total_amount_cents"] = ["must be a number or a string of one"]
    try:
        timestamp = lago_timestamp(item.get("timestamp"))
    except ValueError as exc:
        errors["timestamp"] = [str(exc)]
        timestamp = None
    fields = {
        "event_type": code,
        "customer_id": customer or subscription,
        "id": scoped_id(PEER, transaction_id) if transaction_id else None,
        "timestamp": timestamp,
        "properties": properties or {},
        "metadata": {"lago": {k: item[k] for k in KEPT if item.get(k) is not None}},
    }
    return fields, errors


def to_event(item: Any) -> tuple[Event | None, Errors]:
    """The platform event of one Lago event, or its errors by Lago field name."""
    if not isinstance(item, dict):
        return None, {"event": ["must be an object"]}
    fields, errors = _check(item)
    if errors:
        return None, errors
    event, error = convert_event(fields)
    if error is not None:
        return None, {NAMES.get(error.field) or "event": [error.message]}
    return event, {}


def lago_event(event: dict[str, Any]) -> dict[str, Any]:
    """A platform event (as GET /v1/events/{id} shows it) as Lago shows an event."""
    kept = (event.get("metadata") or {}).get("lago") or {}
    return {
        "lago_id": event["id"],
        "transaction_id": kept.get("transaction_id"),
        "lago_customer_id": event.get("customer_id"),
        "external_customer_id": kept.get("external_customer_id"),
        "lago_subscription_id": None,
        "external_subscription_id": kept.get("external_subscription_id"),
        "code": event.get("event_type"),
        "timestamp": event.get("timestamp"),
        "precise_total_amount_cents": kept.get("precise_total_amount_cents"),
        "properties": event.get("properties") or {},
        "created_at": event.get("received_at"),
    }


async def _accept(request: Request, items: list[Any], batch: bool) -> list[dict[str, Any]]:
    """Check every item, publish them all durably or none; the accepted events as Lago shows them."""
    gw = gateway_of(request)
    received_us = now_us()
    converted: list[Event | None] = []
    errors: dict[str, Any] = {}

    def add(index: int, problems: dict[str, list[str]]) -> None:
        if batch:
            errors.setdefault(str(index), {}).update(problems)
        else:
            errors.update(problems)

    for index, item in enumerate(items):
        event, problems = to_event(item)
        converted.append(event)
        if problems:
            add(index, problems)
    # Every bad time is reported too, not only those of a request whose events all converted.
    for e in check_times(converted, received_us):
        add(e.index, {NAMES.get(e.field) or "event": [e.message]})
    events = [e for e in converted if e is not None]
    if not errors:
        for e in await accept(gw, events, received_us):
            add(e.index, {NAMES.get(e.field) or "event": [e.message]})
    if errors:
        raise LagoError(422, errors)
    received = format_timestamp(us_to_datetime(received_us))
    return [lago_event({**msgspec.structs.asdict(e), "received_at": received}) for e in events]


async def _body(request: Request, key: str) -> Any:
    _, body = await read_json(request, gateway_of(request), (JSON,), JSON)
    if not isinstance(body, dict):
        raise LagoError(400, {"body": [f'must be a JSON object {{"{key}": ...}}']})
    if key not in body:
        raise LagoError(422, {key: ["value_is_mandatory"]})
    return body[key]


async def create_event(request: Request) -> Response:
    """POST /lago/api/v1/events: ``{"event": {...}}``; 200 ``{"event": {...}}`` once durable."""
    item = await _body(request, "event")
    accepted = await _accept(request, [item], batch=False)
    return json_response({"event": accepted[0]})


async def batch_events(request: Request) -> Response:
    """POST /lago/api/v1/events/batch: ``{"events": [...]}``, all or nothing; 200 ``{"events": [...]}``."""
    items = await _body(request, "events")
    if not isinstance(items, list) or not items:
        raise LagoError(422, {"events": ["must be a non-empty array of events"]})
    return json_response({"events": await _accept(request, items, batch=True)})


async def get_event(request: Request) -> Response:
    """GET /lago/api/v1/events/{transaction_id}: the event (stored, quarantined or still pending)."""
    transaction_id = request.path_params["transaction_id"]
    found = await lookup_event(gateway_of(request), scoped_id(PEER, transaction_id))
    if found is None:
        raise LagoError(404, {"transaction_id": ["not_found"]})
    return json_response({"event": lago_event(found)})


ROUTES: list[Route] = [
    Route("/lago/api/v1/events", with_lago_errors(create_event), methods=["POST"]),
    Route("/lago/api/v1/events/batch", with_lago_errors(batch_events), methods=["POST"]),
    Route("/lago/api/v1/events/{transaction_id:path}", with_lago_errors(get_event), methods=["GET"]),
]

_STR, _NSTR = {"type": "string"}, {"type": ["string", "null"]}
_EVENT_IN: dict[str, Any] = {
    "type": "object",
    "required": ["transaction_id", "code"],
    "properties": {
        "transaction_id": {"type": "string", "minLength": 1, "description": "The idempotency key."},
        "code": {"type": "string", "minLength": 1, "maxLength": 128, "description": "The event type."},
        "external_subscription_id": _NSTR,
        "external_customer_id": _NSTR,
        "timestamp": {"type": ["string", "integer", "number", "null"],
                      "description": "Unix seconds (a number or a string of one) or RFC 3339."},
        "properties": {"type": ["object", "null"]},
        "precise_total_amount_cents": {"type": ["string", "number", "null"]},
    },
}  # fmt: skip
_EVENT_OUT: dict[str, Any] = {
    "type": "object",
    "required": ["lago_id", "transaction_id", "code", "timestamp", "properties"],
    "properties": {"lago_id": _STR, "transaction_id": _NSTR, "lago_customer_id": _NSTR,
                   "external_customer_id": _NSTR, "lago_subscription_id": _NSTR,
                   "external_subscription_id": _NSTR, "code": _NSTR, "timestamp": _NSTR,
                   "precise_total_amount_cents": {}, "properties": {"type": "object"},
                   "created_at": _NSTR},
}  # fmt: skip


def _json(schema: dict[str, Any]) -> dict[str, Any]:
    return {"application/json": {"schema": schema}}


def _wrapped(key: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {"type": "object", "required": [key], "properties": {key: schema}}


#: This API's entries of /openapi.json: {path: {method: operation}}.
OPENAPI_PATHS: dict[str, dict[str, Any]] = {
    "/lago/api/v1/events": {
        "post": {
            "summary": "Lago: send one event; 200 once durable in JetStream.",
            "tags": ["lago"],
            "requestBody": {"required": True, "content": _json(_wrapped("event", _EVENT_IN))},
            "responses": {
                "200": {"description": "Accepted.", "content": _json(_wrapped("event", _EVENT_OUT))},
                **documented(400, 401, 403, 413, 415, 422, 429, 503),
            },
        }
    },
    "/lago/api/v1/events/batch": {
        "post": {
            "summary": "Lago: send events, all or nothing; 200 once durable in JetStream.",
            "tags": ["lago"],
            "requestBody": {
                "required": True,
                "content": _json(_wrapped("events", {"type": "array", "items": _EVENT_IN, "minItems": 1})),
            },
            "responses": {
                "200": {
                    "description": "Accepted.",
                    "content": _json(_wrapped("events", {"type": "array", "items": _EVENT_OUT})),
                },
                **documented(400, 401, 403, 413, 415, 422, 429, 503),
            },
        }
    },
    "/lago/api/v1/events/{transaction_id}": {
        "get": {
            "summary": "Lago: an event by transaction_id (stored, quarantined or still pending).",
            "tags": ["lago"],
            "parameters": [
                {
                    "name": "transaction_id",
                    "in": "path",
                    "required": True,
                    "schema": _STR,
                    "description": "The event's transaction_id.",
                }
            ],
            "responses": {
                "200": {"description": "The event.", "content": _json(_wrapped("event", _EVENT_OUT))},
                **documented(401, 403, 404, 429, 503),
            },
        }
    },
}

__all__ = ["OPENAPI_PATHS", "ROUTES", "lago_event", "lago_timestamp", "to_event"]
