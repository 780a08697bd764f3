"""The ``/stripe`` routes' entries of /openapi.json (see :mod:`ingest_gateway.peers.stripe`).

Their errors are in Stripe's shape, not the contract's: Stripe's SDKs read no other.
"""

from __future__ import annotations

from typing import Any

JSON = "application/json"
FORM = "application/x-www-form-urlencoded"
_STR = {"type": "string"}
_PAYLOAD_DOC = (
    "stripe_customer_id (the customer), value (a number, summed by meters), and any other keys "
    "(string properties)."
)

_STRIPE_ERROR = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["type", "message"],
            "properties": {
                "type": {"enum": ["invalid_request_error", "api_error"]},
                "message": _STR,
                "param": _STR,
                "code": _STR,
            },
        }
    },
}
_ERROR_TEXT = {
    400: "Invalid (nothing of the request kept): `param` names the first bad field.",
    401: "No API key (or session token), or an unknown or revoked one.",
    403: "The key may not send events (or not for this customer).",
    413: "The body is too large.",
    415: "The content type or content encoding is not supported.",
    429: "The key is over its rate; retry after `Retry-After` seconds.",
    503: "The events could not be made durable; retry the same request.",
}
_ERRORS = {
    str(code): {"description": text, "content": {JSON: {"schema": _STRIPE_ERROR}}}
    for code, text in _ERROR_TEXT.items()
}


def _ok(description: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {"200": {"description": description, "content": {JSON: {"schema": schema}}}, **_ERRORS}


_EVENT_FIELDS: dict[str, Any] = {
    "created": {"type": "integer"},
    "event_name": _STR,
    "identifier": _STR,
    "livemode": {"type": "boolean"},
    "payload": {"type": "object", "additionalProperties": _STR},
    "timestamp": {"type": "integer"},
}
_EVENT_REQUIRED = ["object", "created", "event_name", "identifier", "livemode", "payload", "timestamp"]
_V1_EVENT = {
    "type": "object",
    "required": _EVENT_REQUIRED,
    "properties": {**_EVENT_FIELDS, "object": {"const": "billing.meter_event"}},
}
_V2_EVENT = {
    "type": "object",
    "required": _EVENT_REQUIRED,
    "properties": {
        **_EVENT_FIELDS,
        "object": {"const": "v2.billing.meter_event"},
        "created": _STR,
        "timestamp": _STR,
    },
}
_V2_INPUT = {
    "type": "object",
    "required": ["event_name", "payload"],
    "properties": {
        "event_name": {**_STR, "description": "The event type of the catalog."},
        "payload": {"type": "object", "additionalProperties": _STR, "description": _PAYLOAD_DOC},
        "identifier": {**_STR, "description": "The idempotency key: counted once, by v1 or v2."},
        "timestamp": {**_STR, "description": "RFC 3339; default: receive time."},
    },
}
_V1_INPUT = {
    "type": "object",
    "required": ["event_name", "payload[stripe_customer_id]"],
    "properties": {
        "event_name": {**_STR, "description": "The event type of the catalog."},
        "payload[stripe_customer_id]": {**_STR, "description": "The customer."},
        "payload[value]": {**_STR, "description": "A number, e.g. 25 or 0.5."},
        "identifier": {**_STR, "description": "The idempotency key: counted once, by v1 or v2."},
        "timestamp": {"type": "integer", "description": "Seconds since the Unix epoch; default: now."},
    },
    "patternProperties": {r"^payload\[[^\[\]]+\]$": _STR},
    "description": f"Form fields; payload[<key>] for each payload key: {_PAYLOAD_DOC}",
}

#: This API's entries of /openapi.json: {path: {method: operation}}.
OPENAPI_PATHS: dict[str, dict[str, Any]] = {
    "/stripe/v1/billing/meter_events": {
        "post": {
            "summary": "Stripe v1: one meter event (form-encoded); answered once durable.",
            "requestBody": {"required": True, "content": {FORM: {"schema": _V1_INPUT}}},
            "responses": _ok("The billing.meter_event.", _V1_EVENT),
        }
    },
    "/stripe/v2/billing/meter_events": {
        "post": {
            "summary": "Stripe v2: one meter event (JSON); answered once durable.",
            "requestBody": {"required": True, "content": {JSON: {"schema": _V2_INPUT}}},
            "responses": _ok("The v2.billing.meter_event.", _V2_EVENT),
        }
    },
    "/stripe/v2/billing/meter_event_session": {
        "post": {
            "summary": "Stripe v2: a session for the meter event stream; its token is the caller's key.",
            "requestBody": {"content": {JSON: {"schema": {"type": "object"}}}},
            "responses": _ok(
                "The v2.billing.meter_event_session.",
                {
                    "type": "object",
                    "required": ["id", "object", "authentication_token", "created", "expires_at", "livemode"],
                    "properties": {
                        "id": _STR,
                        "object": {"const": "v2.billing.meter_event_session"},
                        "authentication_token": _STR,
                        "created": _STR,
                        "expires_at": _STR,
                        "livemode": {"type": "boolean"},
                    },
                },
            ),
        }
    },
    "/stripe/v2/billing/meter_event_stream": {
        "post": {
            "summary": "Stripe v2: many meter events (session token as the key); kept or refused whole.",
            "requestBody": {
                "required": True,
                "content": {
                    JSON: {
                        "schema": {
                            "type": "object",
                            "required": ["events"],
                            "properties": {"events": {"type": "array", "minItems": 1, "items": _V2_INPUT}},
                        }
                    }
                },
            },
            "responses": _ok("Durable: `{}`.", {"type": "object", "maxProperties": 0}),
        }
    },
}
