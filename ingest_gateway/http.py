"""The HTTP plumbing every route group shares: the contract's error, JSON answers, bounded bodies."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any, NoReturn

import msgspec
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response

from meter_platform.capture.envelope import BAD_UTF8, TOO_DEEP

_encoder = msgspec.json.Encoder(decimal_format="number")


class ApiError(Exception):
    """An answer with the contract's error shape."""

    def __init__(
        self, status: int, error: str, details: list[Any] | None = None, headers: dict[str, str] | None = None
    ):
        super().__init__(error)
        self.status, self.error, self.details, self.headers = status, error, details or [], headers


def invalid_items(errors: list[Any], total: int, as_detail: Callable[[Any], Any] | None = None) -> ApiError:
    """The 400 of a request with bad items (``errors``: ItemError-like, with ``index``), sorted by item,
    each shown as ``as_detail`` makes it (as it is by default): nothing of such a request is kept, so a
    corrected resend is exact."""
    errors.sort(key=lambda e: e.index)
    return ApiError(
        400,
        f"{len({e.index for e in errors})} of {total} event(s) are invalid; nothing of this request was kept.",
        list(errors) if as_detail is None else [as_detail(e) for e in errors],
    )


def bracketed(items: list[tuple[str, str]], name: str) -> tuple[dict[str, list[str]], list[str]]:
    """Query parameters ``name[<key>]=<value>`` by key (a repeated key: every value, in order), and the
    values of a bare ``name`` (whose meaning is the caller's)."""
    by_key: dict[str, list[str]] = {}
    bare: list[str] = []
    for key, value in items:
        if key == name:
            bare.append(value)
        elif key.startswith(name) and key[len(name) : len(name) + 1] == "[" and key.endswith("]"):
            by_key.setdefault(key[len(name) + 1 : -1], []).append(value)
    return by_key, bare


def json_response(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    """A JSON answer encoded with msgspec (Decimal as JSON numbers)."""
    return Response(_encoder.encode(body), status_code=status, headers=headers, media_type="application/json")


#: How much of a refused body is read and thrown away before the answer, beyond what was read.
#: An HTTP/1.1 client that is still sending when the server answers and closes the connection
#: usually sees the connection reset, not the answer (urllib, requests: "connection aborted"):
#: reading the rest first lets every ordinary client read the 413/415. Bodies larger than this are
#: answered at once (the sender may then see a reset): reading 64 MiB on a local network takes well
#: under a second, and a client that sends more than 64 MiB after a 5 MiB limit is not ordinary.
#: A client that sent ``Expect: 100-continue`` has sent nothing yet and waits for the answer.
DISCARD_LIMIT = 64 * 1024 * 1024


async def refuse(
    request: Request, error: ApiError, body: AsyncIterator[bytes] | None = None, already_read: int = 0
) -> NoReturn:
    """Raise ``error`` once the client can read it: the unread body (the rest of ``body`` when it is
    being read already) is discarded, up to :data:`DISCARD_LIMIT` bytes."""
    if body is None and request.headers.get("expect", "").lower() == "100-continue":
        raise error  # the server has not said "100 Continue": the body is not on its way
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) - already_read > DISCARD_LIMIT:
        raise error
    discarded = 0
    try:
        async for chunk in body or request.stream():
            discarded += len(chunk)
            if discarded > DISCARD_LIMIT:
                break
    except ClientDisconnect:
        pass
    raise error


def _too_large(limit: int) -> ApiError:
    return ApiError(413, f"The body is larger than {limit} bytes; split it into several requests.")


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 as soon as it is known to exceed ``limit`` bytes, or with
    415 when it is compressed (``Content-Encoding`` other than identity: not accepted, so no
    decompression bombs)."""
    encoding = request.headers.get("content-encoding")
    if encoding and encoding.strip().lower() != "identity":
        await refuse(
            request,
            ApiError(415, f"Content-Encoding {encoding!r} is not supported; send the body uncompressed."),
        )
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        await refuse(request, _too_large(limit))
    chunks, size = [], 0
    stream = request.stream()
    async for chunk in stream:
        size += len(chunk)
        if size > limit:
            await refuse(request, _too_large(limit), stream, size)
        chunks.append(chunk)
    return b"".join(chunks)


#: Bodies of the administrative routes (customers, subscriptions, keys) are small.
MAX_ADMIN_BODY = 64 * 1024


def decode_json(body: bytes) -> Any:
    """A body as JSON; a clear 400 for anything that is not, however broken (invalid UTF-8, too deep)."""
    try:
        return msgspec.json.decode(body)
    except msgspec.DecodeError as exc:
        raise ApiError(400, f"The body is not valid JSON ({exc}).") from exc
    except RecursionError as exc:  # msgspec's answer to very deep nesting
        raise ApiError(400, f"The body is not usable: {TOO_DEEP}.") from exc
    except UnicodeDecodeError as exc:  # msgspec's answer to invalid UTF-8 inside a string
        raise ApiError(400, f"The body is not usable: {BAD_UTF8}.") from exc


async def read_json_object(request: Request, limit: int = MAX_ADMIN_BODY) -> dict[str, Any]:
    """A JSON object body (an empty body is ``{}``); a clear 400 for anything else, however broken."""
    body = await read_body(request, limit)
    data = decode_json(body) if body.strip() else {}
    if not isinstance(data, dict):
        raise ApiError(400, "The body must be a JSON object.")
    return data


def paging(request: Request, default: int = 100, maximum: int = 1000) -> tuple[int, int]:
    """``limit`` (1 to ``maximum``, default ``default``) and ``offset`` (0 or more) of a listing."""
    try:
        limit = int(request.query_params.get("limit") or default)
        offset = int(request.query_params.get("offset") or 0)
    except ValueError as exc:
        raise ApiError(400, "limit and offset must be integers.") from exc
    if not 1 <= limit <= maximum or offset < 0:
        raise ApiError(400, f"limit must be 1 to {maximum} and offset at least 0.")
    return limit, offset
