"""The HTTP plumbing every route group shares: the contract's error, JSON answers, bounded bodies."""

from __future__ import annotations

from typing import Any

import msgspec
from starlette.requests import Request
from starlette.responses import Response

_encoder = msgspec.json.Encoder(decimal_format="number")


class ApiError(Exception):
    """An answer with the contract's error shape."""

    def __init__(
        self, status: int, error: str, details: list[Any] | None = None, headers: dict[str, str] | None = None
    ):
        super().__init__(error)
        self.status, self.error, self.details, self.headers = status, error, details or [], headers


def json_response(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    """A JSON answer encoded with msgspec (Decimal as JSON numbers)."""
    return Response(_encoder.encode(body), status_code=status, headers=headers, media_type="application/json")


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 as soon as it is known to exceed ``limit`` bytes."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise ApiError(413, f"The body is larger than {limit} bytes; split it into several requests.")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(413, f"The body is larger than {limit} bytes; split it into several requests.")
        chunks.append(chunk)
    return b"".join(chunks)
