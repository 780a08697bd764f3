"""The OpenMeter ingest API, under ``/openmeter``: its official SDK works pointed at
``<gateway>/openmeter`` with one of our API keys as its token.

``POST /openmeter/api/v1/events`` takes CloudEvents (one, or a batch) and answers 204 once they are
durable in JetStream, like ``POST /v1/events`` does with 202. A CloudEvent maps to a platform event:

=================  ==================================================================================
CloudEvent         platform event
=================  ==================================================================================
``type``           ``event_type``
``subject``        ``customer_id``
``data``           ``properties`` (a JSON object; absent or null: ``{}``)
``time``           ``timestamp`` (RFC 3339; absent: the receive time)
``source``, ``id``  ``id`` = ``openmeter:<source>:<id>`` (``%`` and ``:`` in the source escaped as
                   ``%25`` and ``%3A``, so no two (source, id) pairs share an id), the idempotency key
everything else    ``metadata.cloudevents`` (``id``, ``source``, ``specversion``, extensions)
=================  ==================================================================================

The meters and their usage query are in :mod:`ingest_gateway.peers.openmeter_query`.
"""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from ingest_gateway.gateway import gateway_of
from ingest_gateway.http import ApiError, invalid_items
from ingest_gateway.peers import openmeter_query
from ingest_gateway.peers.bodies import read_json, rename
from ingest_gateway.peers.common import accept, scoped_id
from ingest_gateway.peers.openmeter_problems import problems, with_problems
from meter_platform.capture.envelope import Event, ItemError, check_times, convert_event, now_us

PEER = "openmeter"
ONE = "application/cloudevents+json"
BATCH = "application/cloudevents-batch+json"
JSON = "application/json"
#: The CloudEvents attributes every event must carry (OpenMeter requires ``subject`` too).
REQUIRED = ("specversion", "id", "source", "type", "subject")
#: The platform's field names as a CloudEvent names them (for the item errors of a 400).
NAMES = {"event_type": "type", "customer_id": "subject", "timestamp": "time", "properties": "data",
         "id": "id", "metadata": ""}  # fmt: skip


def event_id(source: str, raw_id: str) -> str:
    """The platform id of the CloudEvent ``(source, id)``: scoped to OpenMeter, the pair kept apart."""
    return scoped_id(PEER, source.replace("%", "%25").replace(":", "%3A"), raw_id)


def _attribute_errors(index: int, item: dict[str, Any]) -> list[ItemError]:
    """What is wrong with a CloudEvent's own attributes (before it becomes a platform event)."""
    errors = [
        ItemError(index, name, "is required: a non-empty string")
        for name in REQUIRED
        if not isinstance(item.get(name), str) or not item[name]
    ]
    if isinstance(item.get("specversion"), str) and item["specversion"] and item["specversion"] != "1.0":
        errors.append(ItemError(index, "specversion", 'must be "1.0" (CloudEvents 1.0)'))
    if item.get("data") is not None and not isinstance(item["data"], dict):
        errors.append(ItemError(index, "data", "must be a JSON object (or absent)"))
    if item.get("time") is not None and not isinstance(item["time"], str):
        errors.append(ItemError(index, "time", "must be an RFC 3339 timestamp string"))
    content_type = item.get("datacontenttype")
    if content_type is not None and (
        not isinstance(content_type, str) or content_type.split(";")[0].strip().lower() != JSON
    ):
        errors.append(ItemError(index, "datacontenttype", 'must be "application/json" (or absent)'))
    return errors


def to_event(index: int, item: Any) -> tuple[Event | None, list[ItemError]]:
    """The platform event of one CloudEvent, or what is wrong with it."""
    if not isinstance(item, dict):
        return None, [ItemError(index, "", "a CloudEvent must be a JSON object")]
    errors = _attribute_errors(index, item)
    if errors:
        return None, errors
    attributes = {k: v for k, v in item.items() if k not in ("type", "subject", "time", "data")}
    event, error = convert_event(
        {
            "event_type": item["type"],
            "customer_id": item["subject"],
            "id": event_id(item["source"], item["id"]),
            "timestamp": item.get("time"),
            "properties": item.get("data") or {},
            "metadata": {"cloudevents": attributes},
        }
    )
    return event, [rename(error, index, NAMES)] if error else []


async def ingest(request: Request) -> Response:
    """POST /openmeter/api/v1/events: one CloudEvent or a batch; 204 once durable in JetStream."""
    gw = gateway_of(request)
    kind, body = await read_json(request, gw, (ONE, BATCH, JSON), JSON)  # no type: either
    received_us = now_us()
    if kind == ONE and not isinstance(body, dict):
        raise ApiError(400, f"{ONE} is one CloudEvent (a JSON object); send a batch as {BATCH}.")
    if kind == BATCH and not isinstance(body, list):
        raise ApiError(400, f"{BATCH} is a JSON array of CloudEvents.")
    items = body if isinstance(body, list) else [body]
    if not items:
        raise ApiError(400, "The request holds no events.")
    converted: list[Event | None] = []
    errors: list[ItemError] = []
    for index, item in enumerate(items):
        event, found = to_event(index, item)
        converted.append(event)
        errors += found
    # Every bad time is reported too, not only those of a request whose events all converted.
    errors += [rename(e, e.index, NAMES) for e in check_times(converted, received_us)]
    if not errors:
        events = [e for e in converted if e is not None]
        errors = [rename(e, e.index, NAMES) for e in await accept(gw, events, received_us)]
    if errors:
        raise invalid_items(errors, len(items))
    return Response(status_code=204)


ROUTES: list[Route] = [
    Route("/openmeter/api/v1/events", with_problems(ingest), methods=["POST"]),
    *openmeter_query.ROUTES,
]

_CLOUDEVENT: dict[str, Any] = {
    "type": "object",
    "description": "A CloudEvent 1.0: `type` is the event type, `subject` the customer, `data` the "
    "properties; (`source`, `id`) is the idempotency key.",
    "required": list(REQUIRED),
    "properties": {
        "specversion": {"const": "1.0"},
        "id": {"type": "string", "minLength": 1},
        "source": {"type": "string", "minLength": 1},
        "type": {"type": "string", "minLength": 1, "maxLength": 128},
        "subject": {"type": "string", "minLength": 1, "maxLength": 256},
        "time": {"type": ["string", "null"], "description": "RFC 3339; default: receive time."},
        "datacontenttype": {"type": ["string", "null"], "enum": ["application/json", None]},
        "dataschema": {"type": ["string", "null"]},
        "data": {"type": ["object", "null"]},
    },
}
_BATCH_SCHEMA = {"type": "array", "items": _CLOUDEVENT}

#: This API's entries of /openapi.json: {path: {method: operation}}.
OPENAPI_PATHS: dict[str, dict[str, Any]] = {
    "/openmeter/api/v1/events": {
        "post": {
            "summary": "OpenMeter: send CloudEvents (one, or a batch); 204 once durable in JetStream.",
            "tags": ["openmeter"],
            "requestBody": {
                "required": True,
                "content": {
                    ONE: {"schema": _CLOUDEVENT},
                    BATCH: {"schema": _BATCH_SCHEMA},
                    JSON: {"schema": {"oneOf": [_CLOUDEVENT, _BATCH_SCHEMA]}},
                },
            },
            "responses": {
                "204": {"description": "Accepted: fsync'd in JetStream."},
                **problems(400, 401, 403, 413, 415, 429, 503),
            },
        }
    },
    **openmeter_query.OPENAPI_PATHS,
}

__all__ = ["OPENAPI_PATHS", "ROUTES", "event_id", "to_event"]
