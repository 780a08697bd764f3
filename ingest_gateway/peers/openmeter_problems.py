"""OpenMeter's error shape: RFC 7807 problem details (``application/problem+json``), as its SDK reads
them (``type``, ``title``, ``status``, ``detail``, ``instance``; our item errors under ``extensions``)."""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable
from http import HTTPStatus
from typing import Any

import msgspec
from starlette.requests import Request
from starlette.responses import Response

from ingest_gateway import auth
from ingest_gateway.http import ApiError
from meter_platform.capture.envelope import ItemError

PROBLEM = "application/problem+json"
_encoder = msgspec.json.Encoder(decimal_format="number")

Handler = Callable[[Request], Awaitable[Response]]


def problem_body(status: int, detail: str, instance: str) -> dict[str, Any]:
    """The problem-details object of an error."""
    return {"type": "about:blank", "title": HTTPStatus(status).phrase, "status": status, "detail": detail,
            "instance": instance}  # fmt: skip


def key_check_problem(exc: ApiError) -> dict[str, Any]:
    """The key checks' 401/403/429 under /openmeter/ as a problem (the SDK reads ``detail`` from it)."""
    return problem_body(exc.status, exc.error, "/openmeter")


def problem(request: Request, status: int, detail: str, errors: list[Any] | None = None,
            headers: dict[str, str] | None = None) -> Response:  # fmt: skip
    """A problem-details answer for ``request``."""
    body = problem_body(status, detail, request.url.path)
    if errors:
        items = [msgspec.to_builtins(e) if isinstance(e, ItemError) else e for e in errors]
        body["extensions"] = {"validationErrors": items}
    return Response(_encoder.encode(body), status_code=status, headers=headers, media_type=PROBLEM)


def with_problems(handler: Handler) -> Handler:
    """``handler`` with every :class:`ApiError` it raises answered as a problem."""

    @functools.wraps(handler)
    async def run(request: Request) -> Response:
        try:
            return await handler(request)
        except ApiError as exc:
            return problem(request, exc.status, exc.error, exc.details, exc.headers)

    return run


#: The schema of a problem answer, for /openapi.json.
PROBLEM_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["type", "title", "status", "detail", "instance"],
    "properties": {
        "type": {"type": "string"},
        "title": {"type": "string"},
        "status": {"type": "integer"},
        "detail": {"type": "string"},
        "instance": {"type": "string"},
        "extensions": {"type": "object"},
    },
}


def problems(*codes: int, described: dict[int, str] | None = None) -> dict[str, Any]:
    """The documented error answers of an OpenMeter operation: problems from the route; 401, 403 and
    429 may also come from the key check in front of it (a problem too, sent as application/json)."""
    texts = {400: "Invalid request.", 401: "No API key, or an unknown or revoked one.",
             403: "The key may not do this.", 404: "Not found.", 413: "The body is too large.",
             415: "The content type or encoding is not supported.", 429: "Over the key's rate.",
             503: "Not durable now (broker or database unavailable); retry."} | (described or {})  # fmt: skip
    out: dict[str, Any] = {}
    for code in codes:
        content: dict[str, Any] = {PROBLEM: {"schema": PROBLEM_SCHEMA}}
        if code in (401, 403, 429):
            content["application/json"] = {"schema": PROBLEM_SCHEMA}
        out[str(code)] = {"description": texts[code], "content": content}
    return out


# The key checks (401 / 403 / 429) answer in OpenMeter's shape under /openmeter/ too.
auth.PEER_ERROR_BODIES["/openmeter/"] = key_check_problem
