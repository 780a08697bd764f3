"""Reading a peer's JSON body: the same limits and refusals as ``POST /v1/events`` (size, compression,
content type, broken JSON), raised as :class:`ApiError` for the peer's route to put in its own shape."""

from __future__ import annotations

from typing import Any

from starlette.requests import Request

from ingest_gateway.gateway import Gateway
from ingest_gateway.http import ApiError, decode_json, read_body, refuse
from meter_platform.capture.envelope import ItemError

#: ItemError fields of the platform's envelope, and what each peer calls them.
FieldNames = dict[str, str]


def media_type(request: Request, default: str) -> str:
    """The request's media type, lower case, without parameters (``default`` when absent)."""
    value = request.headers.get("content-type") or default
    return value.split(";")[0].strip().lower()


async def read_json(
    request: Request, gw: Gateway, accepted: tuple[str, ...], default: str
) -> tuple[str, Any]:
    """The media type and decoded JSON body of ``request``.

    415 for a media type not in ``accepted`` (or a compressed body), 413 above the gateway's body limit,
    400 for an empty body or anything that is not JSON (invalid UTF-8, too deep, numbers out of range).
    """
    kind = media_type(request, default)
    if kind not in accepted:
        await refuse(
            request, ApiError(415, f"Content type {kind!r} is not supported; send {', '.join(accepted)}.")
        )
    body = await read_body(request, gw.settings.max_body_bytes)
    if not body.strip():
        raise ApiError(400, "The body is empty.")
    return kind, decode_json(body)


def rename(error: ItemError, index: int, names: FieldNames) -> ItemError:
    """An envelope error about item ``index``, with the field named as the peer names it."""
    return ItemError(index, names.get(error.field, error.field), error.message)
