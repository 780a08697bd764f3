"""Stripe's billing meter-event API under ``/stripe``, so Stripe's official SDKs work unchanged once
their base addresses point at the gateway and their key is one of ours:

- ``POST /stripe/v1/billing/meter_events`` (form-encoded, as the v1 API): one event, answered with
  the ``billing.meter_event`` object;
- ``POST /stripe/v2/billing/meter_events`` (JSON): one event, answered with the
  ``v2.billing.meter_event`` object;
- ``POST /stripe/v2/billing/meter_event_session``: a session for the stream, answered with
  ``v2.billing.meter_event_session``;
- ``POST /stripe/v2/billing/meter_event_stream`` (JSON ``{"events": [...]}``, the session's token as
  the Bearer key): many events, answered with ``{}``.

Every one is answered only once its events are durable in JetStream (``peers.common.accept``), is
accepted or refused whole, and is held to the envelope rules of ``POST /v1/events``. The session's
``authentication_token`` is the caller's own API key, handed back to the one who sent it: the key
checks then treat the stream like any other route (a revoked key stops the stream within the key
cache time, across every gateway process and restart) and nothing new needs to be stored or signed.
``expires_at`` is 15 minutes on, as Stripe's; the SDKs and clients that renew the session on time
keep working, and the token does not actually lapse before the key does.
"""

from __future__ import annotations

import secrets
from collections.abc import Awaitable, Callable
from datetime import timedelta
from typing import Any
from urllib.parse import parse_qsl

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from ingest_gateway import auth
from ingest_gateway.gateway import Gateway, gateway_of
from ingest_gateway.http import ApiError, json_response, read_body, read_json_object, refuse
from ingest_gateway.peers.common import accept
from ingest_gateway.peers.stripe_events import (
    FIELDS,
    Params,
    Problem,
    StripeError,
    echo,
    error_body,
    from_api_error,
    read_event,
    seconds,
    time_problems,
)
from ingest_gateway.peers.stripe_events import refuse as refuse_events
from ingest_gateway.peers.stripe_openapi import OPENAPI_PATHS
from meter_platform.capture.envelope import Event, format_timestamp, new_event_id, now_us, us_to_datetime

FORM = "application/x-www-form-urlencoded"
JSON = "application/json"
#: How long a session says it lasts (Stripe's: 15 minutes; clients renew it before then).
SESSION_LIFETIME = timedelta(minutes=15)
#: At most this many form fields in a v1 request (a meter event has a handful).
_MAX_FIELDS = 1000

Handler = Callable[[Request], Awaitable[Response]]


def _stripe(handler: Handler) -> Handler:
    """Answer the gateway's own errors (body too large, broker down, key over its rate) in
    Stripe's shape too, so the SDK raises its own exception for them."""

    async def endpoint(request: Request) -> Response:
        try:
            return await handler(request)
        except StripeError as exc:
            return exc.response()
        except ApiError as exc:
            return from_api_error(exc).response()

    endpoint.__doc__ = handler.__doc__
    return endpoint


async def _check_type(request: Request, media: str) -> Gateway:
    """The gateway, once the body is known to be ``media`` (415 otherwise, the body discarded)."""
    content_type = request.headers.get("content-type", media).split(";")[0].strip().lower()
    if content_type != media:
        await refuse(request, ApiError(415, f"Content type {content_type!r} is not supported; send {media}."))
    return gateway_of(request)


async def _json(request: Request) -> dict[str, Any]:
    """A v2 body: a JSON object (413 above the gateway's body limit)."""
    gw = await _check_type(request, JSON)
    return await read_json_object(request, gw.settings.max_body_bytes)


def _form_event(body: bytes) -> dict[str, Any]:
    """A v1 form body as the fields of one meter event (``payload[key]`` → ``payload``)."""
    try:
        pairs = parse_qsl(
            body.decode("utf-8"), keep_blank_values=True, errors="strict", max_num_fields=_MAX_FIELDS
        )
    except ValueError as exc:  # invalid UTF-8 (also once percent-decoded), too many fields
        raise StripeError(400, f"The body is not a usable form: {exc}.") from exc
    raw: dict[str, Any] = {}
    payload: dict[str, str] = {}
    for key, value in pairs:
        if "\x00" in key or "\x00" in value:
            raise StripeError(400, "Parameters must not contain the NUL character.", key.replace("\x00", ""))
        if key.startswith("payload[") and key.endswith("]") and key.count("[") == 1 and len(key) > 9:
            payload[key[8:-1]] = value
        elif key.startswith("payload"):
            raise StripeError(400, "payload must be a flat object of strings: payload[<key>]=<value>.", key)
        elif key == "expand" or key.startswith("expand["):
            continue  # nothing here expands
        else:
            raw[key] = value
    if payload:
        raw["payload"] = payload
    return raw


async def _accept(gw: Gateway, events: list[Event], where: list[Params], received_us: int) -> None:
    """Publish durably, or refuse the whole request with the times that are wrong."""
    errors = await accept(gw, events, received_us)
    if errors:
        raise refuse_events(time_problems(errors, where), len(events))


async def _one(request: Request, raw: dict[str, Any], where: Params) -> tuple[Event, str, int]:
    """Read, check and publish one meter event: ``(event, identifier, received_us)``."""
    received_us = now_us()
    event, problems, identifier = read_event(raw, where, request.headers.get("idempotency-key"), None)
    if problems or event is None:
        raise refuse_events(problems, 1)
    await _accept(gateway_of(request), [event], [where], received_us)
    return event, identifier, received_us


async def v1_meter_events(request: Request) -> Response:
    """POST /stripe/v1/billing/meter_events: one meter event, form-encoded (Stripe's v1 API)."""
    gw = await _check_type(request, FORM)
    raw = _form_event(await read_body(request, gw.settings.max_body_bytes))
    event, identifier, received_us = await _one(request, raw, Params(v1=True))
    assert event.timestamp is not None
    return json_response(
        {
            "object": "billing.meter_event",
            "created": received_us // 1_000_000,
            "event_name": event.event_type,
            "identifier": identifier,
            "livemode": True,
            "payload": echo(raw["payload"]),
            "timestamp": seconds(event.timestamp),
        }
    )


async def v2_meter_events(request: Request) -> Response:
    """POST /stripe/v2/billing/meter_events: one meter event, JSON (Stripe's v2 API)."""
    raw = await _json(request)
    event, identifier, received_us = await _one(request, raw, Params(v1=False))
    return json_response(
        {
            "object": "v2.billing.meter_event",
            "created": format_timestamp(us_to_datetime(received_us)),
            "event_name": event.event_type,
            "identifier": identifier,
            "livemode": True,
            "payload": echo(raw["payload"]),
            "timestamp": event.timestamp,
        }
    )


async def v2_meter_event_session(request: Request) -> Response:
    """POST /stripe/v2/billing/meter_event_session: a session whose token authenticates the stream
    (the caller's own key, see the module's docstring)."""
    await _json(request)  # Stripe takes no parameters here; the body is read (and bounded) all the same
    token = _bearer(request) or secrets.token_urlsafe(32)  # without one, auth is disabled: any token works
    created = us_to_datetime(now_us())
    return json_response(
        {
            "id": f"mes_{new_event_id().replace('-', '')}",
            "object": "v2.billing.meter_event_session",
            "authentication_token": token,
            "created": format_timestamp(created),
            "expires_at": format_timestamp(created + SESSION_LIFETIME),
            "livemode": True,
        }
    )


def _bearer(request: Request) -> str | None:
    kind, _, token = request.headers.get("authorization", "").partition(" ")
    return token.strip() or None if kind.lower() == "bearer" else None


async def v2_meter_event_stream(request: Request) -> Response:
    """POST /stripe/v2/billing/meter_event_stream: many meter events (``{"events": [...]}``), kept or
    refused whole; answered ``{}`` once durable."""
    body = await _json(request)
    received_us = now_us()
    items = body.get("events")
    unknown = sorted(set(body) - {"events"})
    if unknown:
        raise StripeError(400, f"Unknown parameter {unknown[0]!r}; send {{\"events\": [...]}}.", unknown[0],
                          "parameter_unknown")  # fmt: skip
    if not isinstance(items, list) or not items:
        raise StripeError(
            400, "events must be a non-empty array of meter events.", "events", "parameter_missing"
        )
    idempotency_key = request.headers.get("idempotency-key")
    events: list[Event] = []
    where: list[Params] = []
    problems: list[Problem] = []
    for i, item in enumerate(items):
        place = Params(v1=False, prefix=f"events[{i}].")
        if not isinstance(item, dict):
            problems.append(Problem(f"events[{i}]", f"must be an object with {', '.join(sorted(FIELDS))}"))
            continue
        event, found, _ = read_event(item, place, idempotency_key, i)
        problems += found
        if event is not None:
            events.append(event)
            where.append(place)
    if problems:
        raise refuse_events(problems, len(items))
    await _accept(gateway_of(request), events, where, received_us)
    return json_response({})


#: This API's routes, mounted by ingest_gateway.app.
ROUTES: list[Route] = [
    Route("/stripe/v1/billing/meter_events", _stripe(v1_meter_events), methods=["POST"]),
    Route("/stripe/v2/billing/meter_events", _stripe(v2_meter_events), methods=["POST"]),
    Route("/stripe/v2/billing/meter_event_session", _stripe(v2_meter_event_session), methods=["POST"]),
    Route("/stripe/v2/billing/meter_event_stream", _stripe(v2_meter_event_stream), methods=["POST"]),
]

# The key checks (401 / 403 / 429) answer in Stripe's shape under /stripe/ too: the SDK reads no other.
auth.PEER_ERROR_BODIES["/stripe/"] = error_body

__all__ = ["OPENAPI_PATHS", "ROUTES"]
