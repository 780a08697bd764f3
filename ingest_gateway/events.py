"""POST /v1/events (the write side: checked at the door, 202 once durable) and GET /v1/events/{id}."""

from __future__ import annotations

from typing import Any, cast

import msgspec
from starlette.requests import Request
from starlette.responses import Response

from ingest_gateway.archived import archived_event
from ingest_gateway.gateway import Gateway, gateway_of
from ingest_gateway.http import ApiError, invalid_items, json_response, read_body, refuse
from meter_platform.capture.envelope import (
    Event,
    ItemError,
    check_times,
    decode_events,
    decode_ndjson,
    format_timestamp,
    forward_as_sent,
    new_event_id,
    now_us,
    sent_unchanged,
)

_CONTENT_TYPES = ("application/json", "application/x-ndjson", "application/ndjson")


async def post_events(request: Request) -> Response:
    """POST /v1/events: one event, a JSON array, or NDJSON; 202 once durable in JetStream."""
    gw = gateway_of(request)
    content_type = request.headers.get("content-type", "application/json").split(";")[0].strip().lower()
    if content_type not in _CONTENT_TYPES:
        await refuse(
            request,
            ApiError(
                415,
                f"Content type {content_type!r} is not supported; send application/json "
                "(one event or an array) or application/x-ndjson.",
            ),
        )
    body = await read_body(request, gw.settings.max_body_bytes)
    received_us = now_us()
    if not body.strip():
        raise ApiError(400, "The body is empty; send one event, an array of events, or NDJSON.")
    errors: list[ItemError]
    was_array = False
    if content_type == "application/json":
        events, errors, was_array = decode_events(body)
    else:
        events, errors = decode_ndjson(body)
    if not events and not errors:
        raise ApiError(400, "The request holds no events.")
    # Events with ids and canonical timestamps need no change: their JSON goes on as it came. Not
    # with escapes in it, so an id is in the message as the lookup of pending events searches for it.
    as_sent = (
        content_type == "application/json"
        and not errors
        and b"\\" not in body
        and sent_unchanged(cast(list[Event], events))
    )
    errors += check_times(events, received_us)
    if errors:
        raise invalid_items(errors, len(events), msgspec.to_builtins)
    good = cast(list[Event], events)  # no None left: a bad item is a 400 above
    if as_sent:
        forward_as_sent(good, body if was_array else b"[" + body + b"]")
    else:
        for event in good:
            if event.id is None:
                event.id = new_event_id()
    await gw.publish(good, received_us)
    return json_response({"accepted": len(good), "ids": [e.id for e in good]}, status=202)


def _stored(r: Any) -> dict[str, Any]:
    """A usage_events row as the contract shows it."""
    return {
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


def _quarantined(r: Any) -> dict[str, Any]:
    """A quarantined_events row as the contract shows it, with its reasons."""
    payload = r.payload if isinstance(r.payload, dict) else {}
    return {
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


async def lookup_event(gw: Gateway, event_id: str) -> dict[str, Any] | None:
    """The event ``event_id`` as ``GET /v1/events/{id}`` shows it (stored, quarantined with its reasons,
    or still pending in the stream), or None if it was never accepted (or is far back in the backlog).

    The peers' read routes (e.g. Lago's ``GET /api/v1/events/{transaction_id}``) use it too, with the
    scoped id, so every API sees an event in the same state.
    """
    if "\x00" in event_id:
        return None
    rows = await gw.query(
        "SELECT id, event_type, customer_id, ts, received_at, properties, metadata, stream_seq"
        " FROM usage_events WHERE id = :id AND ts = (SELECT ts FROM event_ids WHERE id = :id)",
        {"id": event_id},
    )
    if rows:
        return _stored(rows[0])
    archived = await archived_event(gw, event_id)  # its day's partition was archived and dropped
    if archived is not None:
        return _stored(archived)
    rows = await gw.query(
        "SELECT event_id, event_type, customer_id, ts, received_at, payload, reasons, stream_seq, status"
        " FROM quarantined_events WHERE event_id = :id",
        {"id": event_id},
    )
    if rows:
        return _quarantined(rows[0])
    return await gw.find_pending(event_id)


async def get_event(request: Request) -> Response:
    """GET /v1/events/{id}: the event as the pipeline saw it, and its state."""
    event_id = request.path_params["event_id"]
    found = await lookup_event(gateway_of(request), event_id)
    # An archived event's customer is known only once it is read: a customer-bound key is checked here.
    caller = request.scope.get("meter.api_key")  # auth.SCOPE_KEY
    if found is not None and getattr(caller, "customer_id", None) in (None, found["customer_id"]):
        return json_response(found)
    raise ApiError(
        404, f"No event with id {event_id!r} was accepted (or it is still far back in the backlog)."
    )
