"""POST /v1/webhooks/{source}: signed webhooks (Stripe, GitHub, Svix, or any HMAC-SHA256 sender)
turned into usage events.

The sources are declared in the catalog's ``webhooks.yaml`` (:mod:`meter_platform.catalog.webhooks`).
A delivery is answered:

- 404 for a source not declared; 503 when the source's secret is not in the gateway's environment
  (the sender retries; the rest of the gateway works);
- 413 above ``METER_MAX_BODY_BYTES``; 401 for a missing, bad or stale signature (counted in
  ``meter_webhook_rejected_total{source,reason}``);
- 202 once JetStream has it: the events it maps to are published as ``POST /v1/events`` publishes
  them (ids ``webhook:<source>:<delivery id>:<index>``, so a redelivery is counted once), and whatever
  did not map is published whole with its reasons, for the quarantine (never dropped).
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

from prometheus_client import Counter
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from ingest_gateway.gateway import Gateway, gateway_of
from ingest_gateway.http import ApiError, json_response, read_body, refuse
from ingest_gateway.openapi_parts import JSON, _errors, _obj, _ok, _p, _ref
from ingest_gateway.webhook_signatures import SignatureError, secrets_of, verify
from meter_platform.capture.envelope import now_us
from meter_platform.capture.messages import UNMAPPED_HEADER, Failure
from meter_platform.catalog.webhook_mapping import delivery_id, map_delivery, quarantine_id
from meter_platform.config import STREAM_NAME

log = logging.getLogger("ingest_gateway")

#: Deliveries refused (401 for the signature, 503 without a secret), by source and reason.
REJECTED = Counter(
    "meter_webhook_rejected_total",
    "Webhook deliveries refused, by source and reason (missing_signature, bad_signature, bad_timestamp, "
    "stale_timestamp, no_secret).",
    ["source", "reason"],
)
#: Deliveries taken (202), by source and outcome (events, quarantined, partly_quarantined).
ACCEPTED = Counter(
    "meter_webhook_deliveries_total",
    "Signed webhook deliveries taken, by source and outcome (events, quarantined, partly_quarantined).",
    ["source", "outcome"],
)
#: Where unmapped deliveries go (the stream takes every meter.gateway.> subject).
UNMAPPED_SUBJECT = "meter.gateway.webhook"
#: At most this many reasons travel with an unmapped delivery (the rest are summed up in one more).
MAX_REASONS = 100


async def post_webhook(request: Request) -> Response:
    """POST /v1/webhooks/{source}: check the signature, map, publish; 202 once durable."""
    gw = gateway_of(request)
    name = request.path_params["source"]
    source = gw.catalog.webhooks.get(name)
    if source is None:
        await refuse(request, ApiError(404, f"No webhook source {name!r}: declare it in webhooks.yaml."))
    assert source is not None
    keys, why = secrets_of(source)
    if not keys:
        REJECTED.labels(name, "no_secret").inc()
        log.error("webhook source %s refuses deliveries: %s", name, why)
        await refuse(
            request,
            ApiError(
                503,
                f"Webhook source {name!r} has no secret in the gateway's environment ({why}); "
                "nothing was kept. Set it and restart the gateway; the sender's retries will then pass.",
                headers={"Retry-After": "60"},
            ),
        )
    body = await read_body(request, gw.settings.max_body_bytes)
    received_us = now_us()
    delivery = delivery_id(source, body, request.headers.get)
    try:
        verify(source, keys, body, request.headers.getlist, delivery, time.time())
    except SignatureError as exc:
        REJECTED.labels(name, exc.reason).inc()
        raise ApiError(401, exc.message + " Nothing was kept.", [{"reason": exc.reason}]) from exc
    mapped = map_delivery(source, body, delivery, received_us, request.headers.get)
    answer: dict[str, Any] = {"accepted": len(mapped.events), "ids": [e.id for e in mapped.events]}
    if mapped.events:
        # map_delivery checked them as POST /v1/events does (envelope, times): publish as it does.
        await gw.publish(mapped.events, received_us)
    if mapped.problems:
        qid = quarantine_id(name, delivery)
        reasons = capped(mapped.problems)
        await _publish_unmapped(gw, qid, source.events.event_type.const, reasons, body, received_us)
        answer["quarantined"] = {"id": qid, "reasons": reasons}
    outcome = (
        "partly_quarantined"
        if mapped.events and mapped.problems
        else ("quarantined" if mapped.problems else "events")
    )
    ACCEPTED.labels(name, outcome).inc()
    return json_response(answer, status=202)


def capped(problems: list[Failure]) -> list[dict[str, str]]:
    """The reasons as answered and quarantined: at most :data:`MAX_REASONS`, then how many more."""
    reasons = [r.as_json() for r in problems[:MAX_REASONS]]
    if len(problems) > MAX_REASONS:
        more = len(problems) - MAX_REASONS
        reasons.append({"field": "", "reason": "unmapped", "message": f"and {more} more reason(s)"})
    return reasons


async def _publish_unmapped(
    gw: Gateway, qid: str, event_type: Any, reasons: list[dict[str, str]], body: bytes, received_us: int
) -> None:
    """Publish the raw delivery with its reasons; the pipeline quarantines it (never dropped)."""
    assert gw.js is not None and gw.nc is not None
    info = {
        "id": qid,
        "event_type": event_type if isinstance(event_type, str) else None,
        "received_at": received_us,
        "reasons": reasons,
    }
    # ASCII JSON: a NATS header is one line of text.
    headers = {
        "Nats-Msg-Id": qid,
        UNMAPPED_HEADER: json.dumps(info, ensure_ascii=True, separators=(",", ":")),
    }
    if not gw.nc.is_connected:
        raise ApiError(
            503,
            "The event broker is unreachable; nothing was kept. Retry shortly.",
            headers={"Retry-After": "2"},
        )
    try:
        await gw.js.publish(UNMAPPED_SUBJECT, body, stream=STREAM_NAME, headers=headers)
    except Exception as exc:  # not durable: the sender must retry (its events, if any, are deduplicated)
        log.warning("JetStream did not confirm an unmapped webhook delivery: %r", exc)
        gw.publishes.failed(str(exc) or type(exc).__name__)
        raise ApiError(
            503,
            "The delivery could not be made durable; retry it (nothing will be counted twice).",
            [{"reason": str(exc) or type(exc).__name__, "ids": [qid]}],
            headers={"Retry-After": "1"},
        ) from exc
    gw.publishes.succeeded()


ROUTES: list[Route] = [Route("/v1/webhooks/{source}", post_webhook, methods=["POST"])]

_ERROR = {"content": {JSON: {"schema": _ref("Error")}}}
OPENAPI_PATHS: dict[str, dict[str, Any]] = {
    "/v1/webhooks/{source}": {
        "post": {
            "summary": "A signed webhook delivery of a source declared in webhooks.yaml, turned into events.",
            "description": "No API key: the delivery carries the source's HMAC-SHA256 signature "
            "(Stripe-, GitHub- or Svix-style, as webhooks.yaml says). 202 once durable; what did not "
            "map to an event is quarantined with its reasons (`quarantined`).",
            "security": [],
            "parameters": [_p("source", "The source's name in webhooks.yaml.")],
            "requestBody": {
                "required": False,
                "content": {JSON: {"schema": {}}, "*/*": {"schema": {"type": "string"}}},
            },
            "responses": {
                **_ok(
                    "Durable in JetStream: the events' ids, and what was quarantined (if anything).",
                    {
                        **_obj(
                            required=["accepted", "ids"],
                            accepted={"type": "integer"},
                            ids={"type": "array", "items": {"type": "string"}},
                            quarantined=_obj(id={"type": "string"}, reasons={"type": "array"}),
                        ),
                    },
                    status=202,
                ),
                "401": {"description": "The signature is missing, wrong or stale.", **_ERROR},
                **_errors(404, 413, 415, 503),
            },
        }
    }
}
