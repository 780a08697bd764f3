"""The building blocks of the OpenAPI document: answers, parameters, and the schemas of every body,
used by :mod:`ingest_gateway.openapi` and by route groups that describe their own operations."""

from __future__ import annotations

from typing import Any

JSON = "application/json"

_ERROR_TEXT = {
    400: "The request is invalid; `details` say how.",
    401: "No API key, or an unknown or revoked one.",
    403: "The key's scopes do not allow this route (or this customer's data).",
    404: "Not found.",
    413: "The body is too large.",
    415: "The content type or content encoding is not supported.",
    429: "The key is over its rate; retry after `Retry-After` seconds.",
    503: "A dependency (NATS, PostgreSQL) cannot answer now; retry after `Retry-After` seconds.",
}


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _errors(*codes: int) -> dict[str, Any]:
    return {str(c): {"$ref": f"#/components/responses/E{c}"} for c in codes}


def _ok(description: str, schema: dict[str, Any], status: int = 200, media: str = JSON) -> dict[str, Any]:
    return {str(status): {"description": description, "content": {media: {"schema": schema}}}}


def _q(name: str, description: str, schema: dict[str, Any] | None = None, **extra: Any) -> dict[str, Any]:
    return {
        "name": name,
        "in": "query",
        "description": description,
        "schema": schema or {"type": "string"},
        **extra,
    }


def _p(name: str, description: str) -> dict[str, Any]:
    return {
        "name": name,
        "in": "path",
        "required": True,
        "description": description,
        "schema": {"type": "string"},
    }


def _obj(required: list[str] | None = None, **properties: Any) -> dict[str, Any]:
    return {"type": "object", "required": required or list(properties), "properties": properties}


_STR, _INT, _NUM = {"type": "string"}, {"type": "integer"}, {"type": "number"}
_NULLABLE_STR = {"type": ["string", "null"]}
_NULLABLE_INT = {"type": ["integer", "null"]}
_TIME = {"type": "string", "pattern": r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{6}Z$"}
_PAGING = [
    _q("limit", "At most this many (1 to 1000).", {"type": "integer", "minimum": 1, "maximum": 1000}),
    _q("offset", "Skip this many.", {"type": "integer", "minimum": 0}),
]
_ADMIN = (400, 401, 403, 429, 503)
_READ = (401, 403, 429, 503)

_SCHEMAS: dict[str, Any] = {
    "Error": {
        "type": "object",
        "description": "Every error answer: one sentence, and the details (for a 400: the bad items).",
        "required": ["error", "details"],
        "properties": {"error": _STR, "details": {"type": "array"}},
        "additionalProperties": False,
    },
    "Event": {
        "type": "object",
        "required": ["event_type", "customer_id"],
        "properties": {
            "event_type": {"type": "string", "minLength": 1, "maxLength": 128},
            "customer_id": {"type": "string", "minLength": 1, "maxLength": 256},
            "id": {"type": "string", "minLength": 1, "maxLength": 128, "description": "The idempotency key."},
            "timestamp": {"type": "string", "description": "RFC 3339 with an offset; default: receive time."},
            "properties": {"type": "object"},
            "metadata": {"type": "object"},
        },
    },
    "ItemError": _obj(index=_INT, field=_STR, message=_STR),
    "StoredEvent": {
        "type": "object",
        "required": ["id", "event_type", "customer_id", "state"],
        "properties": {
            "id": _STR,
            "event_type": _NULLABLE_STR,
            "customer_id": _NULLABLE_STR,
            "timestamp": _NULLABLE_STR,
            "received_at": _NULLABLE_STR,
            "properties": {},
            "metadata": {},
            "state": {"enum": ["stored", "quarantined", "pending"]},
            "reasons": {"type": "array"},
            "stream_seq": _NULLABLE_INT,
        },
    },
    "Meter": {
        "type": "object",
        "required": ["slug", "event_type", "aggregation", "group_by"],
        "properties": {
            "slug": _STR,
            "event_type": _STR,
            "aggregation": _STR,
            "value_property": _NULLABLE_STR,
            "group_by": {"type": "array", "items": _STR},
            "filter": {"type": "object"},
        },
    },
    "Usage": {
        "type": "object",
        "required": ["meter", "window", "data"],
        "properties": {
            "meter": _STR,
            "window": _STR,
            "data": {
                "type": "array",
                "items": {
                    "type": "object",
                    "required": ["window_start", "window_end", "group", "value"],
                    "properties": {
                        "customer_id": _NULLABLE_STR,
                        "window_start": _TIME,
                        "window_end": _TIME,
                        "group": {"type": "object"},
                        "value": {"type": ["number", "null"]},
                    },
                },
            },
        },
    },
    "Page": {
        "type": "object",
        "required": ["data"],
        "properties": {"data": {"type": "array", "items": {"type": "object"}}, "next_offset": _INT},
    },
    "Customer": _obj(
        id=_STR,
        name=_NULLABLE_STR,
        email=_NULLABLE_STR,
        subscriptions={
            "type": "array",
            "items": _obj(plan=_STR, starts_at=_STR, ends_at=_NULLABLE_STR),
        },
    ),
    "Invoice": {
        "type": "object",
        "required": ["id", "customer_id", "period", "status", "currency", "total", "lines"],
        "properties": {
            "id": _STR,
            "number": _NULLABLE_STR,
            "customer_id": _STR,
            "period": _STR,
            "status": {"enum": ["draft", "final"]},
            "currency": _STR,
            "total": {"type": "string", "description": "An exact decimal."},
            "lines": {"type": "array", "items": {"type": "object"}},
        },
    },
    "ApiKey": {
        "type": "object",
        "required": ["id", "prefix", "scopes"],
        "properties": {
            "id": _STR,
            "prefix": _STR,
            "name": _NULLABLE_STR,
            "scopes": {"type": "array", "items": _STR},
            "customer_id": _NULLABLE_STR,
            "events_per_second": _NUM,
            "requests_per_second": _NUM,
            "created_at": _STR,
            "last_used_at": _NULLABLE_STR,
            "revoked_at": _NULLABLE_STR,
            "key": {"type": "string", "description": "The secret: shown once, when the key is created."},
        },
    },
    "IngestStatus": {
        "type": "object",
        "required": ["stream", "consumer", "events", "degraded"],
        "properties": {
            "stream": {"type": "object"},
            "consumer": {"type": "object"},
            "events": {"type": "object"},
            "degraded": {"type": "array", "items": _STR},
        },
    },
}
