"""Lago's error shape, as its SDK reads it (``LagoApiError.response`` is the decoded body):
``{"status": 422, "error": "Unprocessable Entity", "code": "validation_errors", "error_details": {...}}``.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Awaitable, Callable
from http import HTTPStatus
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from ingest_gateway import auth
from ingest_gateway.http import ApiError, json_response

Handler = Callable[[Request], Awaitable[Response]]

#: Lago's ``code`` of each status.
CODES = {400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "event_not_found",
         413: "payload_too_large", 415: "unsupported_media_type", 422: "validation_errors",
         429: "too_many_requests", 503: "service_unavailable"}  # fmt: skip


class LagoError(Exception):
    """An answer in Lago's error shape; ``details`` is its ``error_details`` object."""

    def __init__(self, status: int, details: dict[str, Any], headers: dict[str, str] | None = None):
        super().__init__(f"{status}: {details}")
        self.status, self.details, self.headers = status, details, headers


def lago_body(status: int, details: dict[str, Any]) -> dict[str, Any]:
    """The body of a Lago error answer."""
    return {
        "status": status,
        "error": HTTPStatus(status).phrase,
        "code": CODES.get(status, HTTPStatus(status).phrase.lower().replace(" ", "_")),
        "error_details": details,
    }


def lago_error(status: int, details: dict[str, Any], headers: dict[str, str] | None = None) -> Response:
    """A Lago error answer."""
    return json_response(lago_body(status, details), status=status, headers=headers)


def key_check_error(exc: ApiError) -> dict[str, Any]:
    """The key checks' 401/403/429 under /lago/ in Lago's shape."""
    return lago_body(exc.status, {"message": exc.error})


def with_lago_errors(handler: Handler) -> Handler:
    """``handler`` with its :class:`LagoError` and :class:`ApiError` answered in Lago's shape."""

    @functools.wraps(handler)
    async def run(request: Request) -> Response:
        try:
            return await handler(request)
        except LagoError as exc:
            return lago_error(exc.status, exc.details, exc.headers)
        except ApiError as exc:
            headers = dict(exc.headers or {})
            if exc.status == 429 and "Retry-After" in headers:
                # The SDK retries a 429 after x-ratelimit-reset seconds (else after its own backoff).
                headers["x-ratelimit-reset"] = str(math.ceil(float(headers["Retry-After"])))
            details: dict[str, Any] = {"message": exc.error}
            if exc.details:
                details["details"] = exc.details
            return lago_error(exc.status, details, headers or None)

    return run


_ERROR_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["status", "error", "code"],
    "properties": {
        "status": {"type": "integer"},
        "error": {"type": "string"},
        "code": {"type": "string"},
        "error_details": {"type": "object"},
    },
}
_TEXTS = {400: "The body is not JSON, or not the expected object.", 401: "No API key, or an unknown one.",
          403: "The key may not do this.", 404: "No such event.", 413: "The body is too large.",
          415: "The content type or encoding is not supported.",
          422: "Invalid events (nothing of the request kept): `error_details` says which field and why.",
          429: "Over the key's rate.", 503: "Not durable now (broker or database unavailable); retry."}  # fmt: skip


def documented(*codes: int) -> dict[str, Any]:
    """The documented error answers of a Lago operation (the key checks' 401, 403 and 429 included)."""
    return {
        str(code): {"description": _TEXTS[code], "content": {"application/json": {"schema": _ERROR_SCHEMA}}}
        for code in codes
    }


# The key checks (401 / 403 / 429) answer in Lago's shape under /lago/ too.
auth.PEER_ERROR_BODIES["/lago/"] = key_check_error
