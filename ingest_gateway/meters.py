"""GET /v1/meters and GET /v1/meters/{slug}/usage: the catalog's meters and the usage query."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response

from ingest_gateway.archived import usage_rows
from ingest_gateway.gateway import gateway_of
from ingest_gateway.http import ApiError, bracketed, json_response
from meter_platform.meters.usage import UsageQueryError, build_query, usage_answer


async def list_meters(request: Request) -> Response:
    """GET /v1/meters."""
    return json_response({"meters": [m.as_json() for m in gateway_of(request).catalog.meters]})


def usage_filters(items: list[tuple[str, str]]) -> dict[str, list[str]]:
    """``filter[<dimension>]=<value>`` query parameters (repeated: any of the values), by dimension."""
    filters, bare = bracketed(items, "filter")
    if bare:
        raise ApiError(
            400,
            "Filter usage by dimension as filter[<dimension>]=<value>, e.g. filter[region]=eu-west-1.",
        )
    return filters


async def meter_usage(request: Request) -> Response:
    """GET /v1/meters/{slug}/usage: the contract's usage query."""
    gw = gateway_of(request)
    slug = request.path_params["slug"]
    meter = gw.catalog.meter(slug)
    if meter is None:
        raise ApiError(400, f"There is no meter {slug!r}; GET /v1/meters lists them.")
    try:
        q = build_query(
            meter, dict(request.query_params), filters=usage_filters(request.query_params.multi_items())
        )
    except UsageQueryError as exc:
        raise ApiError(400, str(exc)) from exc
    return json_response(usage_answer(q, await usage_rows(gw, q)))
