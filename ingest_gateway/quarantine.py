"""GET /v1/quarantine: quarantined events with their reasons, newest first, filtered and paged."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response

from ingest_gateway.gateway import gateway_of
from ingest_gateway.http import ApiError, json_response
from meter_platform.ingestion.quarantine import (
    QuarantineQueryError,
    list_answer,
    list_sql,
    parse_list_params,
)
from meter_platform.meters.aggregates import sqlalchemy_bind


async def list_quarantine(request: Request) -> Response:
    """GET /v1/quarantine: quarantined events with their reasons, newest first, filtered and paged."""
    gw = gateway_of(request)
    try:
        filters, limit, offset = parse_list_params(request.query_params.multi_items())
    except QuarantineQueryError as exc:
        raise ApiError(400, str(exc), list(exc.details)) from exc
    sql, params = list_sql(filters, limit, offset, sqlalchemy_bind)
    return json_response(list_answer(await gw.query(sql, params), limit, offset))
